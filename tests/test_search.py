"""featx search: studies that resume, share storage between processes, prune, survive failed trials."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from test_fit import _blobs, write_h5

from featx.cli import main
from featx.errors import UsageError
from featx.search import Objective, open_storage, search


@pytest.fixture
def h5file(tmp_path) -> Path:
    X, y = _blobs(n=240, d=24, sep=1.0)
    return write_h5(tmp_path / "feats.h5", X, y)


def test_search_refits_the_best_and_records_the_study(h5file, tmp_path):
    res = search(h5file, "logreg", trials=4, cache=tmp_path, seed=0)
    m = json.loads((res.path / "metrics.json").read_text())
    s = m["search"]
    assert s["trials"] == 4 and s["finished"] == 4 and s["failed"] == 0
    assert set(s["best_params"]) == {"C", "scale"}
    assert m["params"]["C"] == pytest.approx(s["best_params"]["C"]) and m["scale"] == s["best_params"]["scale"]
    assert (res.path / "optimization_history.png").exists()
    assert res.path.parent == tmp_path / "heads"
    # the study opens with optuna's own API, and the test rows were never its objective
    study = optuna.load_study(study_name=res.study, storage=open_storage(res.storage))
    assert len(study.trials) == 4 and study.best_value == pytest.approx(s["best_value"])
    assert study.user_attrs["kind"] == "logreg" and "fold" in study.user_attrs["objective"]
    # the same command again resumes the study and adds more trials
    again = search(h5file, "logreg", trials=2, cache=tmp_path, seed=0)
    assert again.search["trials"] == 6 and again.search["added"] == 2


def test_objective_never_sees_test_rows(h5file, monkeypatch):
    from featx.fit import open_rows

    rows = open_rows(h5file, "pool5")
    loaded = []
    orig = rows.load

    def spy(name, scaler=None):
        loaded.append(name)
        return orig(name, scaler)

    monkeypatch.setattr(rows, "load", spy)
    obj = Objective(rows, "svm", cv=3, seed=0, device="cpu")
    study = optuna.create_study(direction="maximize")
    study.optimize(obj, n_trials=3)
    assert set(loaded) == {"train"}
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3
    # data is loaded once per scaling choice, not once per trial
    assert len(loaded) == len({t.params["scale"] for t in study.trials})


def test_two_processes_share_one_storage(h5file, tmp_path):
    storage = str(tmp_path / "shared.journal")
    args = [sys.executable, "-m", "featx", "search", "svm", str(h5file), "--trials", "3", "--storage", storage,
            "--study", "shared", "--cache", str(tmp_path / "c"), "--quiet", "--seed"]
    procs = [subprocess.Popen(args + [str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    study = optuna.load_study(study_name="shared", storage=open_storage(storage))
    assert len(study.trials) == 6
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert sorted(t.number for t in study.trials) == list(range(6))


def test_jobs_run_in_parallel_workers(h5file, tmp_path):
    res = search(h5file, "logreg", trials=4, jobs=2, cache=tmp_path)
    assert res.search["trials"] == 4 and res.search["finished"] == 4


def test_mlp_trials_report_epochs_and_can_be_pruned(h5file, tmp_path):
    res = search(h5file, "mlp", trials=6, cache=tmp_path, sampler="random", seed=1)
    study = optuna.load_study(study_name=res.study, storage=open_storage(res.storage))
    assert any(len(t.intermediate_values) >= 2 for t in study.trials)  # each epoch reported to optuna
    assert res.search["finished"] + res.search["pruned"] == 6
    assert res.metrics["kind"] == "mlp" and "hidden" in res.search["best_params"]


def test_failed_trials_are_recorded_and_the_search_goes_on(h5file, tmp_path, monkeypatch):
    import featx.search as S

    calls = {"n": 0}
    orig = S.Objective.__call__

    def flaky(self, trial):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("diverged")
        return orig(self, trial)

    monkeypatch.setattr(S.Objective, "__call__", flaky)
    res = search(h5file, "logreg", trials=3, cache=tmp_path)
    assert res.search["failed"] == 1 and res.search["finished"] == 2
    study = optuna.load_study(study_name=res.study, storage=open_storage(res.storage))
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert "diverged" in failed[0].user_attrs["fail_reason"]


def test_a_study_of_another_head_is_refused_untouched(h5file, tmp_path):
    storage = str(tmp_path / "s.journal")
    search(h5file, "logreg", trials=1, storage=storage, study="mine", cache=tmp_path)
    with pytest.raises(UsageError, match="another kind"):
        search(h5file, "svm", trials=1, storage=storage, study="mine", cache=tmp_path)
    study = optuna.load_study(study_name="mine", storage=open_storage(storage))
    assert len(study.trials) == 1


@pytest.mark.parametrize("url", ["postgresql://nobody@127.0.0.1:1/none", "sqlite:////nonexistent/dir/study.db"])
def test_unreachable_storage_is_one_line(url, h5file, tmp_path):
    r = CliRunner().invoke(main, ["search", "svm", str(h5file), "--storage", url, "--cache", str(tmp_path)])
    assert r.exit_code == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("featx: error: cannot open the study storage"), r.stderr
    assert r.stderr.count("featx: error") == 1 and "Traceback" not in r.stderr


def test_sqlite_storage_url(h5file, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    res = search(h5file, "svm", trials=2, storage=url, cache=tmp_path)
    assert optuna.load_study(study_name=res.study, storage=url).trials[-1].state.name == "COMPLETE"


def test_ctrl_c_stops_cleanly_keeping_finished_trials(h5file, tmp_path):
    """A real SIGINT, sent by the process to itself right after its 3rd trial (the FEATX_STOP_AT hook), so the
    test does not depend on when a signal lands; the signal's handler is the one a Ctrl-C meets."""
    cmd = [sys.executable, "-m", "featx", "search", "logreg", str(h5file), "--trials", "500", "--cache", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "FEATX_STOP_AT": "search.trial:3:SIGINT"})
    assert p.returncode == 130 and p.stdout == "", p.stderr
    assert p.stderr.strip().splitlines()[-1] == \
        "featx: interrupted (SIGINT); finished work is kept and the same command resumes it"
    assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr and "[W " not in p.stderr
    journal = tmp_path / "studies" / "featx.journal"
    name = optuna.get_all_study_summaries(open_storage(str(journal)))[0].study_name
    study = optuna.load_study(study_name=name, storage=open_storage(str(journal)))
    before = study.trials
    assert [t.state.name for t in before] == ["COMPLETE"] * 3  # stopped between trials: nothing abandoned
    again = search(h5file, "logreg", trials=1, cache=tmp_path)  # the same study resumes
    assert again.search["trials"] == len(before) + 1
