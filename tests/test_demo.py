"""featx demo: the pipeline on real digits, end to end, honest about its weights."""
from __future__ import annotations

from pathlib import Path

from featx.datasets.digits import write_digits
from featx.demo import run_demo


def test_write_digits_is_real_and_idempotent(tmp_path):
    root = write_digits(tmp_path / "d", limit=30)
    files = sorted(root.rglob("*.png"))
    assert len(files) == 30 and len({f.parent.name for f in files}) == 10
    mtime = files[0].stat().st_mtime_ns
    write_digits(tmp_path / "d", limit=30)
    assert files[0].stat().st_mtime_ns == mtime


def test_demo_falls_back_to_random_weights_with_a_notice(tmp_path, capsys, monkeypatch):
    import urllib.error

    import torch

    def offline(*a, **k):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)  # never download in a test
    out = run_demo(cache=tmp_path, limit=80)
    err = capsys.readouterr().err
    assert "RANDOM weights" in err and "featx demo summary" in err
    assert "fit svm" in err and "fit mlp" in err and "search" in err
    assert Path(out).exists()
