"""Study storages: trials record their owner; trials whose process died become FAIL and are queued again, so
that no trial stays RUNNING for ever (journal file and SQLite here; PostgreSQL in test_postgres.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from test_fit import _blobs, write_h5

from featx.search import search
from featx.studies import OWNER, fail_dead_trials, node_id, open_storage, owner, process_alive

S = optuna.trial.TrialState


# One BLAS thread per process: on a loaded 2-core machine, the tiny solver problems here ran 5x slower with a
# thread pool per worker process than with one thread.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_blas_thread():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture
def h5file(tmp_path) -> Path:
    X, y = _blobs(n=240, d=24, sep=1.0)
    return write_h5(tmp_path / "feats.h5", X, y)


def storage_url(kind: str, tmp_path: Path) -> str:
    return str(tmp_path / "s.journal") if kind == "journal" else f"sqlite:///{tmp_path / 's.db'}"


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def check_dead_trials_fail_and_retry(url: str) -> None:
    """Four RUNNING trials: ours (alive), a dead process's, a reused pid's (same pid, other start time) and
    another node's. The two dead ones fail with their reason and are queued again with their parameters."""
    storage = open_storage(url)
    study = optuna.create_study(study_name="z", storage=storage, direction="maximize")
    dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    owners = [owner(), {**owner(), "pid": dead_pid()}, {**owner(), "started": -1},
              {**owner(), "node": "another-machine", "pid": dead_pid()}]
    for i, o in enumerate(owners):
        t = study.ask({"x": dist})
        assert t.number == i and t.suggest_float("x", 0.0, 1.0) is not None
        assert study.trials[i].system_attrs[OWNER]["node"] == node_id()  # recorded when the trial started
        study._storage.set_trial_system_attr(t._trial_id, OWNER, o)
    assert fail_dead_trials(study) == [1, 2]
    trials = optuna.load_study(study_name="z", storage=open_storage(url)).trials
    assert [t.state for t in trials[:4]] == [S.RUNNING, S.FAIL, S.FAIL, S.RUNNING]
    assert trials[1].user_attrs["fail_reason"].startswith("process died (pid")
    retries = [t for t in trials[4:] if t.state == S.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in retries) == [1, 2]
    assert {t.params["x"] for t in retries} == {trials[1].params["x"], trials[2].params["x"]}
    assert fail_dead_trials(study) == []  # once only
    # a queued retry picked up by a worker runs with the same parameter, and records its new owner
    again = study.ask({"x": dist})
    assert again.number in {t.number for t in retries} and again.params["x"] in {t.params["x"] for t in retries}
    assert study.trials[again.number].system_attrs[OWNER]["pid"] == os.getpid()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_dead_trials_fail_and_are_queued_again(kind, tmp_path):
    check_dead_trials_fail_and_retry(storage_url(kind, tmp_path))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_process_alive_knows_reused_pids_and_unreaped_children():
    me = owner()
    assert process_alive(me["pid"], me["started"]) and process_alive(me["pid"], None)
    assert not process_alive(me["pid"], me["started"] + 1)  # same pid, another process
    assert not process_alive(dead_pid(), None)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    while not Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
        time.sleep(0.05)  # exited, not yet reaped by us: a zombie process is dead
    assert not process_alive(p.pid, None)
    p.wait()


# ------------------------------------------------------------------------------------------------ kill -9

def search_cmd(h5: Path, url: str, cache: Path, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "featx", "search", "logreg", str(h5), "--trials", str(trials), "--storage", url,
            "--study", "z", "--cache", str(cache), "--sampler", "random", *extra]


def start_held(cmd: list[str], hold: Path, number: int, **env: str) -> tuple[subprocess.Popen, int]:
    """Start ``cmd`` with trial ``number`` held (FEATX_TRIAL_HOLD); return it and the pid running that trial."""
    hold.mkdir(exist_ok=True)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **ONE_THREAD, "FEATX_TRIAL_HOLD": f"{hold}:{number}", **env})
    pidfile = hold / f"trial-{number}.pid"
    deadline = time.time() + 300
    while not pidfile.exists():
        if p.poll() is not None:
            raise AssertionError(f"the worker ended before trial {number}: {p.communicate()}")
        assert time.time() < deadline, "the held trial never started"
        time.sleep(0.1)
    return p, int(pidfile.read_text())


def kill9(p: subprocess.Popen, pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL


def check_kill9_then_rerun(h5: Path, url: str, tmp_path: Path) -> None:
    """kill -9 during trial 1, then the same command again: trial 1 FAIL ("process died"), retried with its
    parameters by the rerun, nothing RUNNING, and the summary counts every state."""
    cmd = search_cmd(h5, url, tmp_path / "cache", 3)
    p, pid = start_held(cmd, tmp_path / "hold", 1)
    kill9(p, pid)
    before = optuna.load_study(study_name="z", storage=open_storage(url)).trials
    assert [t.state for t in before] == [S.COMPLETE, S.RUNNING]  # the zombie, as Optuna alone leaves it
    res = search(h5, "logreg", trials=3, storage=url, study="z", cache=tmp_path / "cache", sampler="random")
    trials = optuna.load_study(study_name="z", storage=open_storage(url)).trials
    assert not [t for t in trials if t.state in (S.RUNNING, S.WAITING)]
    assert trials[1].state == S.FAIL and trials[1].user_attrs["fail_reason"] == f"process died (pid {pid} on " \
        f"{trials[1].system_attrs[OWNER]['host']})"
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].state == S.COMPLETE and retry[0].params == trials[1].params
    assert len(trials) == 2 + 3  # 2 of the killed run, 3 of the rerun (the retry is one of them)
    summary = json.loads((res.path / "metrics.json").read_text())["search"]
    assert (summary["trials"], summary["finished"], summary["failed"], summary["running"], summary["waiting"]) \
        == (5, 4, 1, 0, 0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_kill9_mid_trial_then_rerun_leaves_no_running_trial(kind, h5file, tmp_path):
    check_kill9_then_rerun(h5file, storage_url(kind, tmp_path), tmp_path)
