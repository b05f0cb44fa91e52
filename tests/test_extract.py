"""featx extract end to end: the feature-set format, exactness, reuse, resume after kill -9, concurrency, bad files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli

from featx.backbones import load_backbone
from featx.datasets import open_rgb
from featx.errors import DataError, StrictError
from featx.extract import extract
from featx.store import FeatureSet

KW = dict(weights="random", seed=0, workers=0, batch_size=16)


def _rows(path: Path, layer: str = "pool5") -> dict[str, np.ndarray]:
    fs = FeatureSet(path)
    return {"X": fs.load(layer), "path": fs.column("path"), "split": fs.column("split"), "label": fs.labels()}


def test_feature_set_format_is_plain_h5py(digits_dir, tmp_path):
    res = extract(digits_dir, layers=["fc7", "pool5"], cache=tmp_path, shard_size=25, split="test=0.2,val=0.2", **KW)
    assert res.computed and res.path.parent == tmp_path / "features"
    m = json.loads((res.path / "manifest.json").read_text())
    assert m["config"]["layers"] == ["pool5", "fc7"] and m["classes"] == [str(i) for i in range(10)]
    assert m["n_rows"] == 60 and sum(m["counts"].values()) == 60 and set(m["counts"]) == {"train", "val", "test"}
    assert m["skipped"] == [] and m["featx_version"] and m["timings"]["total_s"] > 0
    shards = sorted(res.path.glob("shard-*.h5"))
    assert [s.name for s in shards] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    seen = []
    for s in shards:  # read with h5py alone, as a user without featx would
        with h5py.File(s, "r") as f:
            n = f["label"].shape[0]
            assert n <= 25
            assert f["pool5"].shape == (n, 9216) and f["pool5"].dtype == np.float32
            assert f["fc7"].shape == (n, 4096) and f["label"].dtype == np.int64
            assert json.loads(f.attrs["classes"]) == m["classes"]
            paths = [p.decode() for p in f["path"][()]]
            labels = f["label"][()]
            for p, lab in zip(paths, labels):
                assert p.split("/")[0] == m["classes"][lab]  # row identity: the class folder of its path
            seen += paths
    assert sorted(seen) == seen and len(set(seen)) == 60  # every image once, in path order


def test_features_equal_the_network_on_each_image(digits_dir, tmp_path):
    res = extract(digits_dir, layers=["pool5", "fc6"], cache=tmp_path, **KW)
    fs = FeatureSet(res.path)
    bb = load_backbone("alexnet", "random", seed=0)
    paths = fs.column("path")[:4]
    x = torch.stack([bb.preprocess.transform(open_rgb(digits_dir / p)) for p in paths])
    with torch.inference_mode():
        pool5 = torch.flatten(bb.model.avgpool(bb.model.features(x)), 1)
        fc6 = bb.model.classifier[:3](pool5)
    for layer, ref in (("pool5", pool5), ("fc6", fc6)):
        got = torch.from_numpy(fs.load(layer)[:4])
        assert float((got - ref).norm() / ref.norm()) <= 1e-4


def test_background_hash_equals_the_fingerprints(digits_dir):
    from featx.datasets import discover, fingerprints
    from featx.extract.scan import BackgroundHash

    ds = discover(digits_dir)
    assert BackgroundHash(ds, threads=3).result() == fingerprints(ds)
    abandoned = BackgroundHash(ds)
    abandoned.stop()  # a user error found while hashing: the rest of the files are not read


def test_same_command_reuses_the_directory(digits_dir, tmp_path):
    a = extract(digits_dir, cache=tmp_path, **KW)
    t = time.perf_counter()
    b = extract(digits_dir, cache=tmp_path, **KW)
    assert a.path == b.path and not b.computed and time.perf_counter() - t < 10
    c = extract(digits_dir, cache=tmp_path, **{**KW, "seed": 1})  # another split and init: another key
    assert c.path != a.path


def test_key_follows_image_content(digits_dir, tmp_path):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(digits_dir, data)
    a = extract(data, cache=tmp_path / "c", **KW)
    victim = sorted(data.rglob("*.png"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")  # same name, different content
    b = extract(data, cache=tmp_path / "c", **KW)
    assert a.path != b.path


def test_torn_and_temporary_files_are_never_read(digits_dir, tmp_path):
    full = extract(digits_dir, cache=tmp_path / "ref", shard_size=20, **KW)
    res_dir = tmp_path / "c" / "features" / full.path.name
    res_dir.mkdir(parents=True)
    (res_dir / "shard-00001.h5").write_bytes(b"\x89HDF\r\n\x1a\n half a file")  # a torn shard
    (res_dir / ".tmp-shard-00002.h5-x").write_bytes(b"junk")
    again = extract(digits_dir, cache=tmp_path / "c", shard_size=20, **KW)
    assert again.path == res_dir
    a, b = _rows(full.path), _rows(again.path)
    assert np.array_equal(a["path"], b["path"]) and np.array_equal(a["X"], b["X"])
    assert not list(res_dir.glob(".tmp-*"))


@pytest.mark.parametrize("how", ["kill -9", "ctrl-c"])
def test_killed_or_interrupted_then_resume_equals_uninterrupted(how, photos_dir, tmp_path):
    workers = "1" if how == "kill -9" else "2"  # Ctrl-C while two lanes are busy
    args = ["extract", str(photos_dir), "--weights", "random", "--shard-size", "3", "--batch-size", "2",
            "--workers", workers, "--layer", "pool5", "--layer", "fc7", "--quiet"]
    ref = run_cli(*args, "--cache", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    ref_dir = Path(ref.stdout.strip().splitlines()[-1])
    cache = tmp_path / "c"
    # Ctrl-C at the 3rd batch (the first of shard 1, shard 0 done, 9 of 12 images still to do): the process sends
    # itself the signal there (featx.interrupt's test hook), so the test does not depend on when a signal lands
    at = "extract.batch:5:SIGKILL" if how == "kill -9" else "extract.batch:3:SIGINT"  # kill -9: 2 shards asked for
    proc = subprocess.run([sys.executable, "-m", "featx", *args, "--cache", str(cache)], capture_output=True,
                          env={**os.environ, "FEATX_STOP_AT": at}, timeout=300)
    if how == "kill -9":
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    else:
        err = proc.stderr
        assert proc.returncode == 130 and b"interrupted (SIGINT)" in err and b"Traceback" not in err, err
        assert not list((cache / "features" / ref_dir.name).glob(".tmp-*"))  # the unfinished shard is cleaned up
    done_before = sorted(p.name for p in (cache / "features" / ref_dir.name).glob("shard-*.h5"))
    assert not (cache / "features" / ref_dir.name / "manifest.json").exists()
    mtimes = {n: (cache / "features" / ref_dir.name / n).stat().st_mtime_ns for n in done_before}
    again = run_cli(*args, "--cache", str(cache))
    assert again.returncode == 0, again.stderr
    out = Path(again.stdout.strip().splitlines()[-1])
    assert out.name == ref_dir.name
    for n, t in mtimes.items():  # finished shards are kept, not redone
        assert (out / n).stat().st_mtime_ns == t
    for layer in ("pool5", "fc7"):
        a, b = _rows(ref_dir, layer), _rows(out, layer)
        assert np.array_equal(a["path"], b["path"]) and np.array_equal(a["label"], b["label"])
        assert np.allclose(a["X"], b["X"], rtol=1e-5, atol=1e-6)


def test_two_processes_on_one_key(digits_dir, tmp_path):
    args = [sys.executable, "-m", "featx", "extract", str(digits_dir), "--weights", "random", "--workers", "0",
            "--shard-size", "16", "--quiet", "--cache", str(tmp_path), "--threads", "1"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    dirs = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(dirs) == 1
    rows = _rows(Path(dirs.pop()))
    assert len(rows["path"]) == 60 and len(set(rows["path"])) == 60


def test_bad_files_are_skipped_and_listed(tmp_path):
    from imagezoo import make_zoo

    zoo = make_zoo(tmp_path / "zoo")
    res = extract(zoo.root, cache=tmp_path / "c", **KW)
    m = res.manifest
    skipped = {s["path"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == set(zoo.bad), skipped
    for path, bad in zoo.bad.items():
        assert skipped[path].startswith(bad.reason), (path, skipped[path])
    rows = _rows(res.path)
    assert sorted(rows["path"]) == sorted(zoo.valid)  # every valid image exactly once
    assert np.isfinite(rows["X"]).all()
    with pytest.raises(StrictError, match="skipped"):
        extract(zoo.root, cache=tmp_path / "c", strict=True, **KW)
    assert (res.path / "manifest.json").exists()  # --strict fails the run, not the finished work


@pytest.mark.parametrize("lanes", [0, 2])
def test_sigterm_gives_up_the_batches_being_decoded(lanes, digits_dir, tmp_path, monkeypatch):
    """A SIGTERM in the middle of a batch: the lanes stop decoding at the next image instead of finishing their
    batches (one batch of 30 images each here), and nothing of the unfinished shard is written."""
    import threading

    import featx.extract.compute as fx
    from featx import interrupt

    decoded = []
    real = fx.decode_image

    def decode(path, pre, max_pixels):
        decoded.append(path)
        if len(decoded) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread (a lane may be the one here)
        if len(decoded) >= 3:  # from the signal on, every image in hand returns once the stop is requested
            for _ in range(1000):
                if interrupt.stop_requested():
                    break
                threading.Event().wait(0.01)
        return real(path, pre, max_pixels)

    monkeypatch.setattr(fx, "decode_image", decode)
    kw = {**KW, "workers": lanes, "batch_size": 30, "shard_size": 60}
    with interrupt.handling(), pytest.raises(interrupt.Interrupted):
        extract(digits_dir, cache=tmp_path, **kw)
    assert 3 <= len(decoded) <= 3 + lanes  # the image in hand, in each lane; not the rest of 60
    (res,) = (tmp_path / "features").iterdir()
    assert not list(res.glob("shard-*")) and not list(res.glob(".tmp-*")) and not (res / "manifest.json").exists()


@pytest.mark.parametrize("decode, workers", [("threads", 3), ("processes", 2)])
def test_parallel_decoding_equals_the_calling_thread_row_for_row(decode, workers, tmp_path):
    """Three lanes decode and run batches concurrently, or decode processes feed the forward pass (bad files
    among the images, batches finishing out of order, shards cut mid-way): the feature set is the one a single
    thread makes, row for row."""
    from imagezoo import make_zoo

    zoo = make_zoo(tmp_path / "zoo")
    kw = {**KW, "batch_size": 3, "shard_size": 7}
    one = extract(zoo.root, cache=tmp_path / "one", **kw)
    kw.update(workers=workers, decode=decode)
    many = extract(zoo.root, cache=tmp_path / "many", **kw)
    assert many.path.name == one.path.name  # how the work is spread is not part of the key
    a, b = _rows(one.path), _rows(many.path)
    assert list(a["path"]) == list(b["path"]) and list(a["split"]) == list(b["split"])
    assert (a["label"] == b["label"]).all()
    np.testing.assert_allclose(b["X"], a["X"], rtol=1e-5, atol=1e-6)
    assert sorted(map(str, one.manifest["skipped"])) == sorted(map(str, many.manifest["skipped"]))
    assert len(one.manifest["skipped"]) == len(zoo.bad) and len(a["path"]) == len(zoo.valid)


def test_views_and_dataset_normalization(photos_dir, tmp_path):
    one = extract(photos_dir, cache=tmp_path, **KW)
    ten = extract(photos_dir, cache=tmp_path, views=10, shard_size=25, **KW)
    fs1, fs10 = FeatureSet(one.path), FeatureSet(ten.path)
    assert fs10.n_rows == 10 * fs1.n_rows
    views = fs10.column("view")
    assert list(views[:10]) == ["center", "top_left", "top_right", "bottom_left", "bottom_right", "center_flip",
                                "top_left_flip", "top_right_flip", "bottom_left_flip", "bottom_right_flip"]
    centre = fs10.load("pool5", mask=views == "center")
    assert np.allclose(centre, fs1.load("pool5"), rtol=1e-5, atol=1e-6)
    assert np.array_equal(fs10.column("path")[views == "center"], fs1.column("path"))
    norm = extract(photos_dir, cache=tmp_path, normalize="dataset", **KW)
    pre = norm.manifest["config"]["preprocess"]
    assert norm.manifest["config"]["normalize"] == "dataset"
    assert not np.allclose(pre["mean"], [0.485, 0.456, 0.406]) and all(0 < s < 1 for s in pre["std"])


def test_csv_and_split_folders(photos_dir, tmp_path):
    import shutil

    shutil.copytree(photos_dir, tmp_path / "imgs")
    csv = tmp_path / "imgs" / "list.csv"
    files = sorted((tmp_path / "imgs").rglob("*.jpg"))
    lines = ["path,label,split"] + [f"{f.relative_to(tmp_path / 'imgs').as_posix()},{f.parent.name},"
                                    f"{'test' if i % 3 == 0 else 'train'}" for i, f in enumerate(files)]
    csv.write_text("\n".join(lines) + "\n")
    res = extract(csv, cache=tmp_path / "c", **KW)
    assert res.manifest["config"]["layout"] == "csv" and res.manifest["counts"]["test"] == 4
    folders = tmp_path / "sf"
    for i, f in enumerate(files):
        dest = folders / ("test" if i % 3 == 0 else "train") / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    res2 = extract(folders, cache=tmp_path / "c", **KW)
    assert res2.manifest["config"]["layout"] == "split-folders"
    assert res2.manifest["counts"] == {"train": 8, "test": 4}
    assert all(p.startswith(("train/", "test/")) for p in FeatureSet(res2.path).column("path"))


def test_feature_set_reader(digits_dir, tmp_path):
    res = extract(digits_dir, cache=tmp_path, shard_size=7, split="test=0.25", layers=["pool5", "fc6"], **KW)
    fs = FeatureSet(res.path)
    X = fs.load("fc6", "train")
    chunks = list(fs.iter_chunks("fc6", "train"))
    assert np.array_equal(np.concatenate([c[0] for c in chunks]), X)
    assert np.array_equal(np.concatenate([c[1] for c in chunks]), fs.labels("train"))
    assert len(X) + len(fs.load("fc6", "test")) == 60
    with pytest.raises(DataError, match="layers present are pool5, fc6"):
        fs.load("fc7")


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/data"], "does not exist"),
    (["{empty}"], "no images found"),
    (["{one}"], "only one class"),
    (["{digits}", "--layer", "conv9"], "valid layers are pool5, fc6, fc7"),
    (["{digits}", "--backbone", "lenet"], "valid backbones are"),
    (["{digits}", "--split", "test=0.7,val=0.5"], "no training rows"),
    (["{digits}", "--weights", "/nonexistent/w.pt"], "no such file"),
])
def test_bad_invocations_are_one_line(args, message, digits_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    one = tmp_path / "one" / "cat"
    one.mkdir(parents=True)
    for p in sorted(digits_dir.rglob("*.png"))[:2]:
        (one / p.name).write_bytes(p.read_bytes())
    subst = {"{empty}": str(tmp_path / "empty"), "{one}": str(tmp_path / "one"), "{digits}": str(digits_dir)}
    from click.testing import CliRunner

    from featx.cli import main

    extra = ["--weights", "random"] if "--weights" not in args else []
    r = CliRunner().invoke(main, ["extract", *[subst.get(a, a) for a in args], *extra, "--cache", str(tmp_path / "c")])
    assert r.exit_code == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("featx: error: ") and message in lines[-1], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_last_stdout_line_is_the_directory(digits_dir, tmp_path):
    r = run_cli("extract", str(digits_dir), "--weights", "random", "--workers", "1", "--cache", str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip().splitlines()
    assert len(out) == 1 and (Path(out[-1]) / "manifest.json").exists()
    assert "extracted: 60 rows" in r.stderr


def test_amp_on_cpu_is_bfloat16_close_and_keyed_apart(digits_dir, tmp_path):
    exact = extract(digits_dir, cache=tmp_path, **KW)
    amp = extract(digits_dir, cache=tmp_path, amp=True, **{**KW, "workers": 2})
    assert amp.path != exact.path and amp.manifest["config"]["amp"] is True
    a, c = FeatureSet(exact.path).load("pool5"), FeatureSet(amp.path).load("pool5")
    err = float(np.linalg.norm(a - c) / np.linalg.norm(a))
    assert 0 < err <= 5e-2  # bfloat16 changes the features a little, not a lot


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(digits_dir, tmp_path):
    cpu = extract(digits_dir, cache=tmp_path / "a", device="cpu", **KW)
    gpu = extract(digits_dir, cache=tmp_path / "b", device="cuda", **{**KW, "workers": 2})  # pinned, decode processes
    a, b = FeatureSet(cpu.path).load("pool5"), FeatureSet(gpu.path).load("pool5")
    assert float(np.linalg.norm(a - b) / np.linalg.norm(a)) <= 1e-3
    amp = extract(digits_dir, cache=tmp_path / "c", device="cuda", amp=True, **KW)
    assert amp.path.name != gpu.path.name  # --amp changes the features, so it changes the key
    c = FeatureSet(amp.path).load("pool5")
    assert float(np.linalg.norm(a - c) / np.linalg.norm(a)) <= 5e-2


# ------------------------------------------------------------------------- deeper layers from cached rows

def _layer_rows(path: Path, layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fs = FeatureSet(path)
    return fs.load(layer), fs.column("path"), fs.column("view")


@pytest.fixture
def few_digits(digits_dir, tmp_path) -> Path:
    """16 of the digits (4 classes x 4), so that the several extractions of a test stay quick."""
    import shutil

    out = tmp_path / "few"
    for c in ("0", "1", "2", "3"):
        (out / c).mkdir(parents=True)
        for p in sorted((digits_dir / c).iterdir())[:4]:
            shutil.copy(p, out / c / p.name)
    return out


def test_deeper_layers_from_cached_rows_equal_a_direct_extraction(few_digits, tmp_path, monkeypatch):
    import featx.extract.compute as fx

    data = few_digits
    (data / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # skipped in both runs
    # 2 views, 5 images a shard, 3 a batch: several shards, batches of 6, 4 and (next to the broken file) 2 rows
    kw = {**KW, "views": 2, "shard_size": 10, "batch_size": 6, "split": "test=0.25"}
    direct = extract(data, layers=["fc6", "fc7"], cache=tmp_path / "direct", **kw)
    base = extract(data, layers=["pool5"], cache=tmp_path / "c", **kw)

    def no_decoding(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(fx, "decode_image", no_decoding)  # the deeper layers must come from the cached rows alone
    reused = extract(data, layers=["fc7", "fc6"], cache=tmp_path / "c", **kw)
    assert reused.computed and reused.manifest["computed_from"] == {"key": base.path.name, "layer": "pool5"}
    assert reused.path.name == direct.path.name  # the same feature set: the same content key
    for layer in ("fc6", "fc7"):
        a, b = _layer_rows(direct.path, layer), _layer_rows(reused.path, layer)
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
        # equal up to float rounding: the cached rows go through fc6/fc7 in larger products than a direct pass
        err = np.linalg.norm(a[0] - b[0]) / np.linalg.norm(a[0])
        assert err <= 1e-6 and np.abs(a[0] - b[0]).max() <= 1e-5 * np.abs(a[0]).max(), (layer, err)
    m_direct, m_reused = direct.manifest, reused.manifest
    for k in ("n_rows", "counts", "rows_per_class", "skipped", "shards", "classes", "config"):
        assert m_direct[k] == m_reused[k], k
    assert [s["reason"] for s in m_reused["skipped"]] and m_reused["skipped"][0]["path"] == "3/broken.png"
    # a cached layer asked for again is copied, and the deeper one computed on top of it; the deepest cached
    # layer at or before the shallowest one asked for serves (fc7 here, of the set just made, not pool5)
    deeper = extract(data, layers=["fc7", "logits"], cache=tmp_path / "c", **kw)
    assert deeper.manifest["computed_from"] == {"key": reused.path.name, "layer": "fc7"}
    assert np.array_equal(_layer_rows(deeper.path, "fc7")[0], _layer_rows(reused.path, "fc7")[0])


def test_no_reuse_across_a_different_network_or_when_refused(few_digits, tmp_path):
    extract(few_digits, layers=["pool5"], cache=tmp_path, **KW)
    other = extract(few_digits, layers=["fc7"], cache=tmp_path, **{**KW, "seed": 1})  # other weights and split
    assert "computed_from" not in other.manifest
    refused = extract(few_digits, layers=["fc6"], cache=tmp_path, reuse=False, **KW)
    assert "computed_from" not in refused.manifest
    deeper_only = extract(few_digits, layers=["pool5", "fc6", "fc7"], cache=tmp_path / "x", **KW)
    shallow = extract(few_digits, layers=["pool5"], cache=tmp_path / "x", **KW)
    assert shallow.manifest["computed_from"]["layer"] == "pool5"  # a subset of the cached layers: copied
    assert np.array_equal(_layer_rows(shallow.path, "pool5")[0], _layer_rows(deeper_only.path, "pool5")[0])


def test_reuse_falls_back_to_the_images_when_the_source_is_damaged(few_digits, tmp_path):
    base = extract(few_digits, layers=["pool5"], cache=tmp_path, **KW)
    (base.path / "shard-00000.h5").write_bytes(b"torn")
    res = extract(few_digits, layers=["fc6"], cache=tmp_path, **KW)
    assert "computed_from" not in res.manifest and res.manifest["n_rows"] == 16
    ref = extract(few_digits, layers=["fc6"], cache=tmp_path / "ref", **KW)
    assert np.array_equal(_layer_rows(res.path, "fc6")[0], _layer_rows(ref.path, "fc6")[0])


def test_stop_while_computing_from_cached_rows_resumes(few_digits, tmp_path):
    base = extract(few_digits, layers=["pool5"], cache=tmp_path, shard_size=4, **KW)
    args = ["extract", str(few_digits), "--weights", "random", "--workers", "0", "--batch-size", "16",
            "--shard-size", "4", "--layer", "fc6", "--cache", str(tmp_path), "--quiet"]
    stopped = run_cli(*args, env={"FEATX_STOP_AT": "extract.batch:2"})  # during the second shard
    assert stopped.returncode == 130, stopped.stderr
    (done,) = [p for p in (tmp_path / "features").iterdir() if p != base.path]
    assert not (done / "manifest.json").exists() and not list(done.glob(".tmp-*"))
    assert [p.name for p in done.glob("shard-*.h5")] == ["shard-00000.h5"]  # the finished shard is kept
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    m = json.loads((done / "manifest.json").read_text())
    assert m["computed_from"]["layer"] == "pool5" and m["n_rows"] == 16
