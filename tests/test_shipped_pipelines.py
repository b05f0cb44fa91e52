"""``featx run --dry-run`` of every shipped pipeline on a small copy of its dataset's published layout: the layout
is detected, every case is listed with its stages to compute, and the split counts are the publisher's (or, for a
dataset published without a split, the pipeline's stratified one)."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from featx.pipeline import load
from featx.run import run_pipeline

layouts = pytest.importorskip("layouts", reason="tests/layouts.py (the small published layouts, from the datasets "
                                                "work of issue #9) is not importable")

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
# shipped pipeline -> the published layout it reads
SHIPPED = {
    "oxford-pets": "oxford-pets",
    "dogs-vs-cats": "dogs-vs-cats",
    "tiny-imagenet": "tiny-imagenet",
    "dog-breeds": "stanford-dogs",
    "caltech256": "caltech256",
    "linear-probe": "caltech101",
}


def test_every_shipped_pipeline_has_a_layout_test():
    assert sorted(p.stem for p in PIPELINES.glob("*.toml")) == sorted([*SHIPPED, "digits"])


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_dry_run_on_a_small_copy_of_the_published_layout(name, tmp_path):
    layout = SHIPPED[name]
    data = layouts.BUILDERS[layout](tmp_path / "data")
    expected = layouts.EXPECTED[layout]
    file = PIPELINES / f"{name}.toml"
    plan = run_pipeline(file, data=data, cache=tmp_path / "cache", dry_run=True)
    pipeline = load(file, data=data)
    assert list(plan.cases) == [c.name for c in pipeline.cases]  # every case listed
    for case, stages in plan.cases.items():
        assert all(v == "to compute" for k, v in stages.items() if k in ("extract", "fit", "search", "finetune")), \
            (case, stages)
    assert len(plan.features) == len(pipeline.variants)
    for info in plan.features.values():
        assert info["layout"] == layout and info["status"] == "to compute"
        assert info["classes"] == expected["classes"]
        if expected["counts"] is not None:  # the publisher's split
            assert info["counts"] == expected["counts"]
        else:  # none published: the pipeline's stratified split of every image
            assert sum(info["counts"].values()) == expected["n"]
            assert set(info["counts"]) == {"train", "val", "test"} and all(info["counts"].values())
    text = "\n".join(plan.lines)
    assert f"layout {layout}" in text and all(c in text for c in plan.cases)
    assert not (tmp_path / "cache" / "features").exists()  # nothing computed


def test_dry_run_from_the_command_line(tmp_path):
    data = layouts.BUILDERS["oxford-pets"](tmp_path / "data")
    p = run_cli("run", str(PIPELINES / "oxford-pets.toml"), "--data", str(data), "--cache", str(tmp_path / "c"),
                "--dry-run", "--only", "views=1-normalize=weights-*")
    assert p.returncode == 0, p.stderr
    assert "layout oxford-pets" in p.stdout and "train 12, test 8" in p.stdout
    assert "views=1-normalize=weights-fc7-svm: extract to compute; fit to compute" in p.stdout
