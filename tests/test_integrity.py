"""Every artefact verified on read: damaged shards, manifests, heads and models stop the reader with one line
naming the file and the command that repairs it; extract run again recomputes only what is damaged."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from featx.cli import main
from featx.errors import IntegrityError
from featx.extract import extract
from featx.finetune import finetune
from featx.fit import fit_head, load_fitted
from featx.maintain import verify
from featx.model import load_model
from featx.store import FORMAT_VERSION, FeatureSet, shard_problem

EXTRACT = dict(weights="random", seed=0, workers=0, batch_size=20, split="test=0.2,val=0.2", shard_size=5)


def _mini_digits(src: Path, dest: Path, classes: int, per_class: int) -> Path:
    for c in range(classes):
        (dest / str(c)).mkdir(parents=True)
        for p in sorted((src / str(c)).glob("*.png"))[:per_class]:
            shutil.copy(p, dest / str(c) / p.name)
    return dest


@pytest.fixture(scope="module")
def made(digits_dir, tmp_path_factory):
    """15 digits of 3 classes -> pool5 in 3 shards of 5 rows -> a logreg head; kept pristine, tests copy it."""
    root = tmp_path_factory.mktemp("integrity")
    data = _mini_digits(digits_dir, root / "data", 3, 5)
    cache = root / "cache"
    fs = extract(data, cache=cache, **EXTRACT)
    head = fit_head(fs.path, "logreg", cache=cache)
    return SimpleNamespace(data=data, cache=cache, key=fs.path.name, head=head.path.name,
                           accuracy=head.metrics["test_accuracy"])


@pytest.fixture
def env(made, tmp_path):
    """A private copy of the cache (paths recorded inside it still point at the original only in command lines)."""
    cache = tmp_path / "cache"
    shutil.copytree(made.cache, cache)
    feats = cache / "features" / made.key
    return SimpleNamespace(data=made.data, cache=cache, feats=feats, head=cache / "heads" / made.head,
                           accuracy=made.accuracy)


def flip_in_dataset(shard: Path, name: str = "pool5") -> None:
    """Flip bytes in the middle of a dataset's stored data (not the file's header)."""
    with h5py.File(shard, "r") as f:
        ds = f[name]
        if ds.chunks:
            info = ds.id.get_chunk_info(ds.id.get_num_chunks() // 2)
            off, size = info.byte_offset, info.size
        else:
            off, size = ds.id.get_offset(), ds.id.get_storage_size()
    flip_bytes(shard, off + size // 2)


def flip_bytes(path: Path, offset: int, n: int = 4) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(x ^ 0xFF for x in b))


def cli(*args):
    try:
        return CliRunner().invoke(main, [*map(str, args)], catch_exceptions=False)
    finally:  # the CLI sets featx's logging up for a terminal; give it back to pytest's caplog
        lg = logging.getLogger("featx")
        lg.handlers.clear()
        lg.propagate = True
        lg.setLevel(logging.NOTSET)


def test_shards_are_format_2_with_a_checksum_on_every_dataset(made):
    feats = made.cache / "features" / made.key
    m = json.loads((feats / "manifest.json").read_text())
    assert m["format_version"] == FORMAT_VERSION == 2 and m["digest"].startswith("sha256:")
    assert len(m["shards"]) == 3
    with h5py.File(feats / "shard-00000.h5", "r") as f:
        for name in ("pool5", "label", "path", "split", "view"):
            assert f[name].fletcher32, name
        assert f["path"].asstr()[0].endswith(".png") and set(f["split"].asstr()[()]) <= {"train", "val", "test"}
    assert json.loads((feats / "command.json").read_text())["argv"][:2] == ["featx", "extract"]


def test_damaged_shard_stops_fit_evaluate_search_and_extract_repairs_only_it(env, tmp_path, caplog):
    shard = env.feats / "shard-00001.h5"
    flip_in_dataset(shard)
    assert shard_problem(shard, ["pool5"]) is not None
    assert shard_problem(env.feats / "shard-00000.h5", ["pool5"]) is None
    for args in (["fit", "logreg", env.feats, "--cache", tmp_path / "h"],
                 ["evaluate", env.head, env.feats, "--cache", tmp_path / "h"],
                 ["search", "logreg", env.feats, "--trials", "1", "--cache", tmp_path / "h"]):
        r = cli(*args)
        assert r.exit_code != 0, (args, r.output)
        err = r.output.strip().splitlines()
        line = [l for l in err if l.startswith("featx: error:")]
        assert len(line) == 1 and str(shard) in line[0], (args, r.output)
        assert "featx extract" in line[0] and "--cache" in line[0] and "Traceback" not in r.output
    assert not (tmp_path / "h" / "heads").exists() or not any((tmp_path / "h" / "heads").iterdir())

    before = {p.name: p.stat().st_mtime_ns for p in env.feats.glob("shard-*.h5")}
    with caplog.at_level(logging.INFO, logger="featx"):
        res = extract(env.data, cache=env.cache, **EXTRACT)
    assert res.computed and res.path == env.feats
    assert "shard-00001.h5 is damaged" in caplog.text and "recomputing only those" in caplog.text
    assert "(1 to compute)" in caplog.text
    after = {p.name: p.stat().st_mtime_ns for p in env.feats.glob("shard-*.h5")}
    assert [n for n in before if before[n] != after[n]] == ["shard-00001.h5"]  # only the damaged one rewritten
    again = fit_head(env.feats, "logreg", cache=tmp_path / "h2")
    assert again.computed and again.metrics["test_accuracy"] == env.accuracy
    assert not verify(cache=env.cache).problems


def test_missing_shard_is_named_and_recomputed(env, caplog):
    (env.feats / "shard-00002.h5").unlink()
    with pytest.raises(IntegrityError, match=r"shard-00002\.h5 is missing.*featx extract"):
        FeatureSet(env.feats)
    with caplog.at_level(logging.INFO, logger="featx"):
        assert extract(env.data, cache=env.cache, **EXTRACT).computed
    assert "shard-00002.h5: missing" in caplog.text
    assert FeatureSet(env.feats).n_rows == 15


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_damaged_manifest_is_detected_and_rewritten(env, damage):
    mpath = env.feats / "manifest.json"
    text = mpath.read_text()
    if damage == "truncate":
        mpath.write_text(text[: len(text) // 2])
    else:
        m = json.loads(text)
        m["classes"] = list(reversed(m["classes"]))  # still valid JSON, another meaning
        mpath.write_text(json.dumps(m, indent=2))
    with pytest.raises(IntegrityError) as e:
        FeatureSet(env.feats)
    msg = str(e.value)
    assert str(mpath) in msg and "featx extract" in msg and "\n" not in msg
    r = cli("fit", "logreg", env.feats, "--cache", env.cache / "x")
    assert r.exit_code != 0 and str(mpath) in r.output
    res = extract(env.data, cache=env.cache, **EXTRACT)
    assert res.computed
    fs = FeatureSet(env.feats)
    assert fs.n_rows == 15 and fs.classes == json.loads(text)["classes"]


def test_damaged_head_is_named_and_refit(env):
    head = fit_head(env.feats, "logreg", cache=env.cache).path  # this copy's own head (the key holds the path)
    npz = head / "head.npz"
    flip_bytes(npz, npz.stat().st_size // 2)
    with pytest.raises(IntegrityError, match=r"head\.npz is damaged.*featx fit logreg"):
        load_fitted(head)
    res = fit_head(env.feats, "logreg", cache=env.cache)  # the same call: the damaged head is a miss
    assert res.computed and res.path == head and res.metrics["test_accuracy"] == env.accuracy
    load_fitted(head)


def test_old_format_1_sets_are_still_read(tmp_path, caplog):
    """A set written before checksums (contiguous datasets, variable-length strings, no digest) reads, with a
    warning that it cannot be verified."""
    root = tmp_path / "old"
    root.mkdir()
    rng = np.random.default_rng(0)
    with h5py.File(root / "shard-00000.h5", "w") as f:
        f.create_dataset("pool5", data=rng.random((6, 4), dtype=np.float32))
        f.create_dataset("label", data=np.array([0, 1, 0, 1, 0, 1]))
        s = h5py.string_dtype("utf-8")
        f.create_dataset("path", data=np.array([f"{i}.png" for i in range(6)], dtype=object), dtype=s)
        f.create_dataset("split", data=np.array(["train"] * 4 + ["test"] * 2, dtype=object), dtype=s)
        f.create_dataset("view", data=np.array(["center"] * 6, dtype=object), dtype=s)
    (root / "manifest.json").write_text(json.dumps({
        "key": "old", "format_version": 1, "config": {"layers": ["pool5"], "backbone": "alexnet"},
        "classes": ["a", "b"], "n_rows": 6, "shards": [{"file": "shard-00000.h5", "rows": 6}]}))
    with caplog.at_level(logging.WARNING, logger="featx"):
        fs = FeatureSet(root)
    assert "format 1" in caplog.text
    assert fs.load("pool5", "train").shape == (4, 4) and list(fs.column("path"))[0] == "0.png"


def test_log_lines_name_the_final_directory_never_a_temporary_one(made, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="featx"):  # what a user sees (--quiet shows less)
        res = fit_head(made.cache / "features" / made.key, "svm", cache=tmp_path)
        extract(made.data, cache=tmp_path, **{**EXTRACT, "shard_size": 7})
    assert res.computed
    assert ".tmp-" not in caplog.text and "partial" not in caplog.text
    assert str(res.path) in caplog.text


def test_verify_finds_every_damaged_item_and_nothing_in_an_intact_cache(env, tmp_path):
    # a fine-tuned model: one epoch of the head alone on the 15 digits
    model = finetune(env.head, epochs=1, unfreeze="head", augment="none", batch_size=8, workers=0,
                     schedule="none", progress=False, cache=env.cache).path
    copy = env.cache / "features" / "copy-of-the-set"
    shutil.copytree(env.feats, copy)
    (env.cache / "studies").mkdir(exist_ok=True)
    rep = verify(cache=env.cache)
    assert rep.problems == [] and {it.kind for it in rep.checked} >= {"features", "head", "model"}
    r = cli("verify", "--cache", env.cache)
    assert r.exit_code == 0 and not [l for l in r.output.splitlines() if l.startswith("damaged ")]

    flip_in_dataset(env.feats / "shard-00000.h5")                       # a shard
    flip_bytes(env.head / "head.npz", (env.head / "head.npz").stat().st_size // 2)  # head weights
    pt = model / "model.pt"
    flip_bytes(pt, pt.stat().st_size // 2)                              # model weights
    text = (copy / "manifest.json").read_text()
    (copy / "manifest.json").write_text(text[: len(text) // 3])         # a truncated manifest
    rep = verify(cache=env.cache)
    damaged = {p.path for p in rep.problems}
    assert damaged == {env.feats, env.head, model, copy}, [p.line() for p in rep.problems]
    lines = {p.path: p.line() for p in rep.problems}
    assert "shard-00000.h5" in lines[env.feats] and "head.npz" in lines[env.head]
    assert "model.pt" in lines[model] and "featx finetune" in lines[model] and "manifest.json" in lines[copy]
    r = cli("verify", "--cache", env.cache)
    assert r.exit_code == 1 and len([l for l in r.output.splitlines() if l.startswith("damaged ")]) == 4
    # one item at a time, by path
    assert [p.path for p in verify(model).problems] == [model]
    assert [p.path for p in verify(env.feats).problems] == [env.feats]
    with pytest.raises(IntegrityError, match=r"model\.pt is damaged.*featx finetune"):
        load_model(model)
