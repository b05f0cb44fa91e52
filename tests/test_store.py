"""ShardWriter: rows written as they come, holes dropped, nothing visible before it is complete."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from featx.store import ShardWriter, shard_is_valid


def _finish(w: ShardWriter, keep: np.ndarray) -> None:
    n = int(keep.sum())
    w.finish(keep, label=np.arange(n), paths=[f"p{i}" for i in range(n)], split=["train"] * n, view=["center"] * n,
             classes=["a", "b"], attrs={"skipped": [{"path": "x", "reason": "empty file"}]})


@pytest.mark.parametrize("copy_rows", [3, 1024])
def test_rows_arrive_in_runs_and_holes_are_dropped(tmp_path, monkeypatch, copy_rows):
    monkeypatch.setattr(ShardWriter, "COPY_ROWS", copy_rows)
    rng = np.random.default_rng(0)
    full = {"pool5": rng.random((11, 5), dtype=np.float32), "fc7": rng.random((11, 2), dtype=np.float32)}
    keep = np.ones(11, dtype=bool)
    keep[[0, 4, 5, 9]] = False
    path = tmp_path / "shard-00000.h5"
    w = ShardWriter(path, 11, {"pool5": 5, "fc7": 2})
    for a, b in ((1, 4), (6, 9), (10, 11)):  # the kept runs, out of the holes
        w.write_rows(a, {k: v[a:b] for k, v in full.items()})
    assert not path.exists() and not shard_is_valid(path, ["pool5"])
    _finish(w, keep)
    assert shard_is_valid(path, ["pool5", "fc7"]) and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    with h5py.File(path, "r") as f:
        for k, v in full.items():
            np.testing.assert_array_equal(f[k][()], v[keep])
        assert f["label"].shape == (7,) and json.loads(f.attrs["classes"]) == ["a", "b"]
        assert json.loads(f.attrs["skipped"])[0]["reason"] == "empty file"


def test_abort_leaves_nothing(tmp_path):
    w = ShardWriter(tmp_path / "shard-00000.h5", 4, {"pool5": 3})
    w.write_rows(0, {"pool5": np.ones((2, 3), dtype=np.float32)})
    w.abort()
    assert list(tmp_path.iterdir()) == []
