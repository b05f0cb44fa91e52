"""A full disk at every write site: one DiskFullError (exit code 75) naming the path, nothing half-written left
visible, every finished shard, head and checkpoint kept, and the same command afterwards equal to a run that never
met a full disk.  Faults are injected at the k-th write; as root, a small real tmpfs is filled up too."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_fit import _blobs, write_h5

import featx.cache
from featx.cache import atomic_write_bytes, is_disk_full
from featx.errors import DiskFullError
from featx.extract import extract
from featx.fit import fit_head
from featx.store import FeatureSet, ShardWriter

KW = dict(weights="random", seed=0, workers=0, batch_size=16, layers=["pool5"])


def enospc(path: str = "") -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path or None)


def fail_at(monkeypatch, owner, name: str, k: int, *, error=enospc) -> list[int]:
    """Make ``owner.name`` raise ENOSPC on its k-th call (1-based); returns the call counter."""
    real = getattr(owner, name)
    calls = [0]

    def wrapped(*a, **kw):
        calls[0] += 1
        if calls[0] == k:
            raise error()
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, wrapped)
    return calls


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".partial")]


def test_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "a" / "results.json"
    atomic_write_bytes(path, b"old")
    fail_at(monkeypatch, featx.cache, "write_out", 1)
    with pytest.raises(DiskFullError) as e:
        atomic_write_bytes(path, b"new" * 1000)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "free space and run the same command" in msg
    assert e.value.exit_code == 75
    assert path.read_bytes() == b"old" and not leftovers(tmp_path)


def test_a_shard_is_refused_before_writing_when_space_is_short(tmp_path, monkeypatch):
    monkeypatch.setattr(featx.cache, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskFullError, match=r"needs about [0-9.]+ (MB|kB) more"):
        ShardWriter(tmp_path / "shard-00000.h5", 1000, {"pool5": 256})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("k", [1, 2])
def test_a_shard_that_meets_a_full_disk_is_removed(tmp_path, monkeypatch, k):
    fail_at(monkeypatch, ShardWriter, "_put", k)
    w = ShardWriter(tmp_path / "shard-00000.h5", 4, {"pool5": 3})
    with pytest.raises(DiskFullError):
        for a in range(0, 4, 2):
            w.write_rows(a, {"pool5": np.ones((2, 3), dtype=np.float32)})
    assert list(tmp_path.iterdir()) == []


def test_extract_keeps_finished_shards_and_the_rerun_equals_an_uninterrupted_one(digits_dir, tmp_path, monkeypatch):
    ref = extract(digits_dir, cache=tmp_path / "ref", shard_size=20, **KW)
    calls = fail_at(monkeypatch, ShardWriter, "_finish", 2)  # the second shard's last writes
    with pytest.raises(DiskFullError, match="no space left on"):
        extract(digits_dir, cache=tmp_path / "c", shard_size=20, **KW)
    root = tmp_path / "c" / "features" / ref.path.name
    assert calls[0] == 2 and (root / "shard-00000.h5").exists() and not (root / "manifest.json").exists()
    assert not leftovers(tmp_path / "c")
    monkeypatch.undo()
    again = extract(digits_dir, cache=tmp_path / "c", shard_size=20, **KW)
    a, b = FeatureSet(ref.path), FeatureSet(again.path)
    assert np.array_equal(a.load("pool5"), b.load("pool5")) and np.array_equal(a.column("path"), b.column("path"))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_fit_leaves_no_head_and_the_rerun_equals_an_uninterrupted_one(tmp_path, monkeypatch, k):
    X, y = _blobs(n=120, d=8)
    feats = write_h5(tmp_path / "feats.h5", X, y)
    ref = fit_head(feats, "logreg", params={"C": 1.0}, cache=tmp_path / "ref")
    fail_at(monkeypatch, featx.cache, "write_out", k)
    with pytest.raises(DiskFullError):
        fit_head(feats, "logreg", params={"C": 1.0}, cache=tmp_path / "c")
    heads = tmp_path / "c" / "heads"
    assert not heads.exists() or not [p for p in heads.iterdir() if p.is_dir()]
    assert not leftovers(tmp_path / "c")
    monkeypatch.undo()
    again = fit_head(feats, "logreg", params={"C": 1.0}, cache=tmp_path / "c")
    assert again.computed and again.path.name == ref.path.name
    assert again.metrics["test_accuracy"] == ref.metrics["test_accuracy"]


def test_a_plot_that_meets_a_full_disk_is_removed(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from featx.plots import plot_confusion

    def full(self, *a, **kw):
        raise enospc()

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(DiskFullError):
        plot_confusion(np.eye(2, dtype=int), ["a", "b"], tmp_path / "confusion.png", title="t")
    assert list(tmp_path.iterdir()) == []


def test_a_full_study_database_reads_as_disk_full():
    import sqlite3

    from sqlalchemy.exc import OperationalError

    e = OperationalError("INSERT INTO trials", {}, sqlite3.OperationalError("database or disk is full"))
    assert is_disk_full(e) and not is_disk_full(ValueError("bad value"))


@pytest.mark.parametrize("half", [False, True])
def test_a_study_journal_keeps_its_finished_trials_and_reads_back(tmp_path, monkeypatch, half):
    import optuna

    from featx.studies import open_storage

    journal = tmp_path / "studies" / "featx.journal"
    study = optuna.create_study(study_name="s", storage=open_storage(str(journal)), direction="maximize")
    for v in (0.5, 0.7):
        study.add_trial(optuna.trial.create_trial(value=v, params={}, distributions={}))
    before = journal.read_bytes()

    def full(f, data):  # nothing, or half the record, reaches the disk; then the disk is full
        if half:
            f.write(data[:len(data) // 2])
        raise enospc()

    monkeypatch.setattr(featx.cache, "write_out", full)
    with pytest.raises(DiskFullError, match="free space and run the same command"):
        study.add_trial(optuna.trial.create_trial(value=0.9, params={}, distributions={}))
    assert journal.read_bytes() == before  # no torn line
    monkeypatch.undo()
    again = optuna.load_study(study_name="s", storage=open_storage(str(journal)))
    assert [t.value for t in again.trials] == [0.5, 0.7]
    again.add_trial(optuna.trial.create_trial(value=0.9, params={}, distributions={}))
    values = [t.value for t in optuna.load_study(study_name="s", storage=open_storage(str(journal))).trials]
    assert values == [0.5, 0.7, 0.9]


def test_a_finetune_checkpoint_that_meets_a_full_disk_keeps_the_last_one(tmp_path, monkeypatch):
    import torch

    from featx.finetune.checkpoint import load_checkpoint, save_checkpoint

    class _Ckpt:
        def __init__(self, v):
            self.v = v

        def to_dict(self):
            return {"w": torch.full((3,), float(self.v))}

    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _Ckpt(1))
    fail_at(monkeypatch, featx.cache, "write_out", 1)
    with pytest.raises(DiskFullError):
        save_checkpoint(path, _Ckpt(2))
    assert float(load_checkpoint(path)["w"][0]) == 1.0 and not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------ a real tmpfs

def _tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir(parents=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "small"
    _tmpfs(disk, "8m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """A file that leaves about ``leave`` bytes free on ``disk``."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_real_small_disk_extract_then_fit(digits_dir, tmp_path, small_disk):
    ref = extract(digits_dir, cache=tmp_path / "ref", shard_size=20, **KW)
    shard = (ref.path / "shard-00000.h5").stat().st_size
    filler = _fill(small_disk, int(shard * 1.5))  # room for one shard, not two
    with pytest.raises(DiskFullError, match="no space left on"):
        extract(digits_dir, cache=small_disk / "c", shard_size=20, **KW)
    root = small_disk / "c" / "features" / ref.path.name
    assert (root / "shard-00000.h5").exists() and not (root / "manifest.json").exists()
    assert not leftovers(small_disk)
    filler.unlink()
    again = extract(digits_dir, cache=small_disk / "c", shard_size=20, **KW)
    assert np.array_equal(FeatureSet(ref.path).load("pool5"), FeatureSet(again.path).load("pool5"))

    head = fit_head(again.path, "logreg", params={"C": 1.0}, cache=tmp_path / "ref-heads")
    filler = _fill(small_disk, 20_000)
    with pytest.raises(DiskFullError):
        fit_head(again.path, "logreg", params={"C": 1.0}, cache=small_disk / "c")
    assert not leftovers(small_disk) and not (small_disk / "c" / "heads" / head.path.name).exists()
    filler.unlink()
    done = fit_head(again.path, "logreg", params={"C": 1.0}, cache=small_disk / "c")
    assert done.metrics["test_accuracy"] == head.metrics["test_accuracy"]


def test_real_small_disk_cli_says_so_in_one_line_and_exits_75(digits_dir, small_disk):
    from conftest import run_cli

    filler = _fill(small_disk, 50_000)
    p = run_cli("extract", str(digits_dir), "--weights", "random", "--layer", "pool5", "--workers", "0",
                "--cache", str(small_disk / "c"))
    errors = [line for line in p.stderr.splitlines() if line.startswith("featx: error")]
    assert p.returncode == 75 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "no space left on" in errors[0] and "more); free space and run the same command" in errors[0]
    assert not leftovers(small_disk) and p.stdout == ""
    filler.unlink()
