"""``featx run --dry-run`` of every shipped pipeline on a small copy of its dataset's published layout: the layout
is detected, every case is listed with its stages to compute, and the split counts are the publisher's (or, for a
dataset published without a split, the pipeline's stratified one).  And every reference figure a shipped pipeline
draws names the public write-up it comes from."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import run_cli

from featx.pipeline import load
from featx.run import run_pipeline

layouts = pytest.importorskip("layouts", reason="tests/layouts.py (small copies of the published dataset layouts) is "
                                                "not importable")

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
# shipped pipeline -> the published layout it reads
SHIPPED = {
    "oxford-pets": "oxford-pets",
    "dogs-vs-cats": "dogs-vs-cats",
    "tiny-imagenet": "tiny-imagenet",
    "dog-breeds": "stanford-dogs",
    "caltech256": "caltech256",
    "linear-probe": "caltech101",
    "backbones": "caltech101",   # the digits by default; any data of the user's (here, a Caltech-101 copy)
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
        assert all(v == "to compute" for k, v in stages.items()
                   if k in ("extract", "fit", "search", "fewshot", "finetune")), \
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


def test_backbones_dry_run_on_the_digits(tmp_path):
    """The four backbones' curves on the default data, the digits: every case a few-shot curve to compute."""
    file = PIPELINES / "backbones.toml"
    plan = run_pipeline(file, cache=tmp_path / "cache", dry_run=True)
    assert list(plan.cases) == [f"{b}-penultimate-fewshot-logreg" for b in ("alexnet", "vgg16", "resnet50",
                                                                              "vit_b_16")]
    assert all(st == {"extract": "to compute", "fewshot": "to compute"} for st in plan.cases.values())
    assert [v.backbone for v in plan.features] == ["alexnet", "vgg16", "resnet50", "vit_b_16"]
    for info in plan.features.values():
        assert info["layout"] == "class-folders" and info["classes"] == [str(d) for d in range(10)]
        assert info["n_images"] == 1797 and min(info["counts"].values()) > 0
    c = load(file).cases[0]
    assert (c.kind, c.params) == ("logreg", {"shots": (1, 2, 4, 8, 16), "draws": 10, "C": 1.0})
    assert not (tmp_path / "cache" / "features").exists()


@pytest.mark.slow
def test_backbones_end_to_end_with_random_weights(tmp_path):
    """backbones.toml at reduced size: 60 digits, 2 draws of 1 and 2 images per class, every backbone for real."""
    from featx.datasets.digits import write_digits

    data = write_digits(tmp_path / "digits", limit=60)
    res = run_pipeline(PIPELINES / "backbones.toml", data=data, weights="random", cache=tmp_path / "cache",
                       sets=["fewshot.logreg.shots=[1,2]", "fewshot.logreg.draws=2", "features.batch_size=8"],
                       device="cpu", progress=False)
    assert not res.failed and res.computed == {"extract": 4, "fewshot": 4}
    for r in res.rows:
        assert r["status"] == "ok" and r["test_accuracy"] == r["accuracy_k2"] and 0 <= r["full_accuracy"] <= 1
        assert (res.path / "fewshot" / f"{r['case']}.csv").is_file()
    assert {r["backbone"] for r in res.rows} == {"alexnet", "vgg16", "resnet50", "vit_b_16"}
    assert "## Few-shot curves" in (res.path / "report.md").read_text()
    assert (res.path / "fewshot.png").is_file()


# where a public write-up lives: a GitHub owner/repository, an arXiv number, or a web site
PUBLIC_PLACE = re.compile(r"\b[\w.-]+/[\w.-]+\b|arXiv:\d{4}\.\d{4,5}|\b[\w-]+\.(com|org|edu|net|io)\b")
# what a pipeline file must never say: the project's own history instead of the user's work; and a reference's
# source and note speak of the write-up, never of featx
INTERNAL = re.compile(r"issue|seed experiment|#\d|not checked|could not|this machine|session|workplace", re.IGNORECASE)
NOT_THE_WRITE_UP = re.compile(INTERNAL.pattern + "|featx", re.IGNORECASE)


@pytest.mark.parametrize("file", sorted(PIPELINES.glob("*.toml")), ids=lambda f: f.stem)
def test_every_reference_names_its_public_write_up(file):
    pipeline = load(file)
    for ref in pipeline.references:
        assert PUBLIC_PLACE.search(ref.source), f"{file.name}: {ref.source!r} does not say where it was published"
        for text in (ref.source, ref.note):
            assert not NOT_THE_WRITE_UP.search(text), f"{file.name}: {text!r} speaks of featx's own history"
        assert ref.note, f"{file.name}: the reference {ref.source!r} does not say what was measured"
        assert any(ref.applies_to(c.name) for c in pipeline.cases), f"{file.name}: {ref.cases} match no case"
    assert not INTERNAL.search(file.read_text()), f"{file.name} speaks of featx's own history"


def test_the_reference_checks_catch_internal_wording(tmp_path):
    file = tmp_path / "bad.toml"
    file.write_text('[data]\npath = "x"\n[features]\nlayers = ["fc7"]\n[heads.logreg]\n'
                    '[[reference]]\naccuracy = 0.5\nsource = "featx seed experiment (issue #10)"\nnote = "n"\n')
    with pytest.raises(AssertionError, match="does not say where it was published"):
        test_every_reference_names_its_public_write_up(file)
    file.write_text(file.read_text().replace('"featx seed experiment (issue #10)"', '"github.com/x/y, issue #10"'))
    with pytest.raises(AssertionError, match="own history"):
        test_every_reference_names_its_public_write_up(file)
