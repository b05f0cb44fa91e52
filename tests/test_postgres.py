"""featx search on a real PostgreSQL server that the test session starts itself (tests/pgserver.py): many
workers on an empty database, no trial lost or duplicated, trials of killed workers failed and retried."""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from pgserver import open_storage_at_barrier, running_server, why_unavailable
from test_fit import _blobs, write_h5
from test_studies import (  # noqa: F401 (fixture)
    ONE_THREAD,
    _one_blas_thread,
    check_dead_trials_fail_and_retry,
    check_kill9_then_rerun,
    kill9,
    search_cmd,
    start_held,
)

from featx.search import search
from featx.studies import OWNER, open_storage

S = optuna.trial.TrialState


@pytest.fixture(scope="session")
def pg():
    """One PostgreSQL server for the session, as the unprivileged postgres user when the tests run as root."""
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    with running_server() as server:
        yield server


@pytest.fixture
def db(pg, request) -> str:
    """A fresh, empty database for one test."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[-50:]
    return pg.new_database(name)


@pytest.fixture(scope="module")
def h5file(tmp_path_factory) -> Path:
    X, y = _blobs(n=240, d=24, sep=1.0)
    return write_h5(tmp_path_factory.mktemp("pg-data") / "feats.h5", X, y)


def test_search_on_postgres_opens_with_optuna_itself(db, h5file, tmp_path):
    res = search(h5file, "logreg", trials=2, storage=db, study="s", cache=tmp_path, sampler="random")
    assert res.search["finished"] == 2 and res.search["running"] == 0
    study = optuna.load_study(study_name="s", storage=db)  # the plain URL, Optuna's own storage
    assert [t.state for t in study.trials] == [S.COMPLETE] * 2
    assert all(t.system_attrs[OWNER]["pid"] == os.getpid() for t in study.trials)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")
def test_dead_trials_fail_and_are_queued_again(db):
    check_dead_trials_fail_and_retry(db)


@pytest.mark.slow
def test_processes_opening_an_empty_database_at_once_all_start(db):
    """Optuna alone: all but one fail with UniqueViolation on pg_type_typname_nsp_index (optuna#1092)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=open_storage_at_barrier, args=(db, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [results.get(timeout=10) for _ in procs] == ["ok"] * 4


@pytest.mark.slow
def test_four_workers_at_once_on_an_empty_database_finish_40_trials(db, h5file, tmp_path):
    procs = [subprocess.Popen(search_cmd(h5file, db, tmp_path / f"cache{i}", 10, "--seed", str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **ONE_THREAD})
             for i in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-2000:] for o in outs]
    trials = optuna.load_study(study_name="z", storage=db).trials
    assert len(trials) == 40 and sorted(t.number for t in trials) == list(range(40))  # none lost, none twice
    assert all(t.state == S.COMPLETE for t in trials)
    assert len({t.system_attrs[OWNER]["pid"] for t in trials}) == 4  # all four workers ran trials


@pytest.mark.slow
def test_kill9_mid_trial_then_rerun_leaves_no_running_trial(db, h5file, tmp_path):
    check_kill9_then_rerun(h5file, db, tmp_path)


@pytest.mark.slow
def test_a_worker_of_another_machine_killed_mid_trial_is_failed_by_heartbeat_and_retried(pg, db, h5file, tmp_path):
    """The killed worker plays another machine (FEATX_NODE_ID): its pid means nothing here, only its heartbeat
    (every second; grace 3 s) tells. Workers that open the study after the grace period fail it and retry it."""
    cmd = search_cmd(h5file, db, tmp_path / "cache", 3, "--heartbeat", "1")
    p, pid = start_held(cmd, tmp_path / "hold", 0, FEATX_NODE_ID="another-machine")
    kill9(p, pid)
    import sqlalchemy

    engine = sqlalchemy.create_engine(db, poolclass=sqlalchemy.pool.NullPool)
    deadline = time.time() + 120
    while True:  # wait on the database's own clock until the last heartbeat is older than the grace period
        with engine.connect() as c:
            age = c.execute(sqlalchemy.text("SELECT EXTRACT(EPOCH FROM now() - max(heartbeat)) "
                                            "FROM trial_heartbeats")).scalar()
        if age is not None and age > 3.5:
            break
        assert time.time() < deadline
        time.sleep(0.5)
    engine.dispose()
    running = optuna.load_study(study_name="z", storage=db).trials
    assert [t.state for t in running] == [S.RUNNING]  # the heartbeat says dead; nobody has looked yet
    workers = [subprocess.Popen(search_cmd(h5file, db, tmp_path / f"cache{i}", 2, "--heartbeat", "1", "--seed",
                                           str(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **ONE_THREAD})
               for i in range(2)]
    outs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outs]
    trials = optuna.load_study(study_name="z", storage=open_storage(db)).trials
    assert trials[0].state == S.FAIL and trials[0].user_attrs["fail_reason"].startswith("no heartbeat for 3 s")
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state == S.COMPLETE and retry[0].params == trials[0].params
    assert retry[0].system_attrs[OWNER]["node"] != "another-machine"  # run by one of the other workers
    assert len(trials) == 1 + 4 and sum(t.state == S.COMPLETE for t in trials) == 4
    assert not [t for t in trials if t.state in (S.RUNNING, S.WAITING)]
