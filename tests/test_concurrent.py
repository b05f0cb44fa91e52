"""Two featx processes on one cache: the lock of featx.locks (one waits, says for whom, then finds the work done;
kill -9 leaves no stale lock), two identical `featx extract`, `featx fit` and `featx run` started together (both
exit 0 with the same outputs), and two different runs side by side."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_run import DIGITS, TINY

from featx.locks import hold, holder, is_held, lock_file

TIMING = ("seconds", "images_per_s")  # how long a case took: the one column two runs need not share


def together(*commands: list[str], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Start every command at once (``python -m featx ...``) and wait for all of them."""
    procs = [subprocess.Popen([sys.executable, "-m", "featx", *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c in commands]
    done = []
    for p, c in zip(procs, commands):
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    return done


HOLDER = """
import sys, time
from featx.locks import hold
with hold(sys.argv[1], what="a test entry"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(path: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_a_second_holder_waits_says_for_whom_and_then_holds(tmp_path, caplog):
    entry = tmp_path / "entry"
    p = _holder(entry, 1.0)
    assert is_held(entry) and holder(entry) == p.pid
    with caplog.at_level("WARNING", logger="featx.locks"):
        with hold(entry, what="a test entry") as waited:
            assert waited and p.wait(timeout=60) == 0  # it released the lock at the end of its work
            assert holder(entry) == os.getpid()
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"waiting for another featx (pid {p.pid}) building a test entry"]
    assert not is_held(entry) and lock_file(entry) == entry / ".lock"


def test_kill_9_leaves_no_stale_lock(tmp_path):
    entry = tmp_path / "entry"
    p = _holder(entry, 600)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert lock_file(entry).exists() and not is_held(entry)  # the file stays; the kernel released the lock
    with hold(entry, what="a test entry") as waited:
        assert not waited


def test_a_lock_is_reentrant_within_a_process(tmp_path):
    with hold(tmp_path / "e", what="x") as outer:
        with hold(tmp_path / "e", what="x") as inner:
            assert not outer and not inner
        assert is_held(tmp_path / "e")
    assert not is_held(tmp_path / "e")


def test_two_identical_extracts_and_fits_at_once(digits_dir, tmp_path):
    cache = tmp_path / "cache"
    ex = ["extract", str(digits_dir), "--weights", "random", "--layer", "pool5", "--workers", "0", "--shard-size",
          "20", "--cache", str(cache)]
    a, b = together(ex, ex)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-2000:], b.stderr[-2000:])
    path = a.stdout.strip().splitlines()[-1]
    assert b.stdout.strip().splitlines()[-1] == path
    assert "already complete" in a.stderr + b.stderr  # one of them found the other's work done
    from featx.store import FeatureSet

    FeatureSet(path).verify()
    fit = ["fit", "logreg", path, "--cache", str(cache)]
    a, b = together(fit, fit)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-2000:], b.stderr[-2000:])
    head = Path(a.stdout.strip().splitlines()[-1])
    assert b.stdout.strip().splitlines()[-1] == str(head)
    from featx.fit import head_problem

    assert head_problem(head) is None
    assert not list((cache / "heads").glob(".tmp-*"))


def _results(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "results.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def run_args(digits_dir: Path, cache: Path, *extra: str) -> list[str]:
    return ["run", str(DIGITS), "--data", str(digits_dir), "--weights", "random", "--cache", str(cache), "--device",
            "cpu", "--quiet", *[a for s in TINY for a in ("--set", s)], *extra]


@pytest.mark.slow
def test_two_identical_runs_at_once_write_the_same_results(digits_dir, tmp_path):
    args = run_args(digits_dir, tmp_path / "cache")
    a, b = together(args, args)
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-2000:], b.stderr[-2000:])
    out = Path(a.stdout.strip().splitlines()[-1])
    assert Path(b.stdout.strip().splitlines()[-1]) == out
    rows = _results(out)
    assert [r["status"] for r in rows] == ["ok"] * len(rows)
    from featx.run import run_pipeline

    ref = run_pipeline(DIGITS, data=digits_dir, weights="random", sets=TINY, cache=tmp_path / "ref", device="cpu",
                       progress=False)
    strip = ("features", "head_dir", "model_dir")  # paths under each cache
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows] == \
        [{k: v for k, v in r.items() if k not in strip} for r in _results(ref.path)]


def test_two_different_runs_side_by_side(digits_dir, tmp_path):
    """Two pipelines (here: two case selections) on one cache both finish; the feature set they share is
    extracted once."""
    cache = tmp_path / "cache"
    a, b = together(run_args(digits_dir, cache, "--only", "pool5-svm"),
                    run_args(digits_dir, cache, "--only", "pool5-logreg"))
    assert a.returncode == 0 and b.returncode == 0, (a.stderr[-2000:], b.stderr[-2000:])
    ra, rb = (Path(p.stdout.strip().splitlines()[-1]) for p in (a, b))
    assert ra != rb
    (row_a,), (row_b,) = _results(ra), _results(rb)
    assert row_a["status"] == row_b["status"] == "ok" and row_a["features"] == row_b["features"]
    assert len(list((cache / "features").iterdir())) == 1
