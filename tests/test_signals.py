"""Ctrl-C (SIGINT) and preemption (SIGTERM) at named stop points: every command ends with one line and 130/143,
leaves nothing RUNNING or half-written, and the same command then finishes what an uninterrupted run would have.

No test here depends on when a signal lands: the ``FEATX_STOP_AT`` hook makes the process send itself a real
signal (``os.kill``) at the N-th time a stop point is reached, so the real handler runs, exactly then.  Most
commands run in this process through click's CliRunner (the same ``command`` wrapper, the same handlers, without
a 3-second interpreter start per run); a few run as real processes to check the console script itself.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import json
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from click.testing import CliRunner
from test_fit import _blobs, write_h5

from featx import interrupt
from featx.cli import main
from featx.errors import FeatxError
from featx.finetune import CHECKPOINT, load_checkpoint
from featx.search import open_storage

LINE = "featx: interrupted ({}); finished work is kept and the same command resumes it"
CODE = {"SIGINT": 130, "SIGTERM": 143}


# ------------------------------------------------------------------------------------------------ helpers

class _OptunaWarnings(logging.Handler):
    """Optuna logs on its own logger (which does not propagate): catch what it would print."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def optuna_warnings():
    h = _OptunaWarnings()
    log = logging.getLogger("optuna")
    log.addHandler(h)
    yield h.records
    log.removeHandler(h)


def invoke(args: list, stop_at: str | None = None):
    """Run ``featx ARGS`` in this process; ``stop_at``: the FEATX_STOP_AT hook for this run only."""
    env = {interrupt.ENV_STOP_AT: stop_at} if stop_at else {}
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    r = CliRunner().invoke(main, [str(a) for a in args], env=env)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers put back
    return r


def assert_stopped(r, signame: str) -> None:
    """Exit 130/143, the one line last on stderr, no traceback, no output path."""
    assert r.exit_code == CODE[signame], (r.exit_code, r.stderr, r.exception)
    assert r.stderr.strip().splitlines()[-1] == LINE.format(signame), r.stderr
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr
    assert r.stdout == ""  # an interrupted command prints no path


def last_path(r) -> Path:
    assert r.exit_code == 0, (r.stderr, r.exception)
    return Path(r.stdout.strip().splitlines()[-1])


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".partial")]


def trials(cache: Path):
    storage = open_storage(str(cache / "studies" / "featx.journal"))
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    return optuna.load_study(study_name=names[0], storage=storage).trials if names else []


def rows_of(fdir: Path) -> dict:
    from featx.store import FeatureSet

    fs = FeatureSet(fdir)
    return {"path": fs.column("path"), "X": fs.load("pool5")}


def head_arrays(hdir: Path) -> dict:
    with np.load(hdir / "head.npz") as z:
        return {k: z[k] for k in z.files}


def model_state(mdir: Path) -> dict:
    return torch.load(mdir / "model.pt", map_location="cpu", weights_only=True)


def same_model(a: Path, b: Path) -> None:
    sa, sb = model_state(a), model_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-5, atol=1e-6), k
    ca = json.loads((a / "metrics.json").read_text())["curve"]
    cb = json.loads((b / "metrics.json").read_text())["curve"]
    timing = {"seconds", "train_seconds", "train_images_per_s"}
    assert [{k: v for k, v in h.items() if k not in timing} for h in ca] == \
        [{k: v for k, v in h.items() if k not in timing} for h in cb]


# ------------------------------------------------------------------------------------------------ fixtures

EXTRACT = ["--weights", "random", "--workers", "0", "--batch-size", "2", "--shard-size", "4", "--split",
           "test=0.2,val=0.2", "--quiet"]
FIT_MLP = ["--hidden", "16", "--epochs", "6", "--patience", "100", "--quiet"]
FINETUNE = ["--epochs", "2", "--augment", "flip", "--batch-size", "3", "--workers", "0", "--schedule", "cosine",
            "--unfreeze", "all", "--quiet"]
SEARCH = ["--trials", "3", "--cv", "2", "--quiet"]
# featx run: pipelines/digits.toml made tiny as tests/test_run.py's TINY (one layer, 2 trials, 3 MLP epochs, the
# fine-tune training the head), on the same 15 images; batches of 4 images and fine-tuning steps of 3 images, so
# that extraction and fine-tuning each have several moments to stop at
PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "digits.toml"
RUN = ["--weights", "random", "--device", "cpu", "--quiet",
       *[a for s in ["search.logreg.trials=2", "heads.mlp.epochs=3", "features.layers=['pool5']",
                     "finetune.all.unfreeze=head", "features.batch_size=4", "finetune.all.batch_size=3",
                     "data.split=test=0.2,val=0.2"] for a in ("--set", s)]]
RUN_CASES = ["pool5-svm", "pool5-logreg", "pool5-mlp", "pool5-search-logreg", "finetune-all"]


def command_args(command: str, small: dict, h5: Path | None, cache: Path) -> list:
    """``featx ...`` of each command the stress test stops."""
    if command == "extract":
        return ["extract", small["data"], *EXTRACT, "--cache", cache]
    if command == "fit-mlp":
        return ["fit", "mlp", small["features"], *FIT_MLP, "--cache", cache]
    if command == "search":
        return ["search", "logreg", h5, *SEARCH, "--cache", cache]
    if command == "finetune":
        return ["finetune", small["head"], *FINETUNE, "--cache", cache]
    assert command == "run", command
    return ["run", PIPELINE, "--data", small["data"], *RUN, "--cache", cache]


@contextlib.contextmanager
def counting_stop_points():
    """Count every stop point the commands inside reach (what ``FEATX_STOP_AT``'s N counts)."""
    counts: collections.Counter = collections.Counter()
    real = interrupt.mark

    def mark(point: str) -> None:
        counts[point] += 1
        real(point)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interrupt, "mark", mark)
        yield counts


def uninterrupted(args: list) -> tuple[Path, dict]:
    """Run ``featx ARGS`` to the end: its output, and how many times it reached each stop point."""
    with counting_stop_points() as counts:
        out = last_path(CliRunner().invoke(main, [str(a) for a in args]))
    return out, dict(counts)


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    """One BLAS thread, as conftest gives torch one: on the 2-core machines that run this, OpenBLAS's second thread
    only contends (the tiny pipeline's run took 16.5 s with two, 11.6 s with one, on the loaded development
    machine: L-BFGS and the heads' predictions).  The same work; every run compared here runs under this limit."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def small(digits_dir, tmp_path_factory):
    """15 digits of 3 classes; their features; a logreg head; and the uninterrupted output of extract, fit mlp and
    finetune, with the stop points each reached."""
    import shutil

    root = tmp_path_factory.mktemp("signals")
    data = root / "data"
    for c in range(3):
        (data / str(c)).mkdir(parents=True)
        for p in sorted((digits_dir / str(c)).glob("*.png"))[:5]:
            shutil.copy(p, data / str(c) / p.name)
    ref = root / "ref"
    small = {"data": data, "reached": {}}
    small["features"], small["reached"]["extract"] = uninterrupted(command_args("extract", small, None, ref))
    small["head"] = last_path(CliRunner().invoke(main, ["fit", "logreg", str(small["features"]), "--cache", str(ref),
                                                        "--quiet"]))
    small["mlp"], small["reached"]["fit-mlp"] = uninterrupted(command_args("fit-mlp", small, None, ref))
    small["model"], small["reached"]["finetune"] = uninterrupted(command_args("finetune", small, None, ref))
    return small


@pytest.fixture
def h5file(tmp_path) -> Path:
    X, y = _blobs(n=120, d=12, sep=1.0)
    return write_h5(tmp_path / "feats.h5", X, y)


# ------------------------------------------------------------------------------------------------ the module

def test_check_raises_only_after_a_request_and_the_hook_sends_a_real_signal(monkeypatch):
    seen = []
    monkeypatch.setenv(interrupt.ENV_STOP_AT, "unit.step:3:SIGTERM")
    before = signal.getsignal(signal.SIGTERM)
    with interrupt.handling():
        assert signal.getsignal(signal.SIGTERM) is not before
        for i in range(10):
            try:
                interrupt.check("unit.step")
            except interrupt.Interrupted as e:
                seen.append((i, e.signame, e.exit_code, e.point))
                break
        assert interrupt.stop_requested() == "SIGTERM" and interrupt.forced() is None
    assert seen == [(2, "SIGTERM", 143, "unit.step")]
    assert isinstance(interrupt.Interrupted(), FeatxError)
    # outside handling() nothing is left over: no request, the handlers it found
    assert interrupt.stop_requested() is None and signal.getsignal(signal.SIGTERM) == before
    interrupt.check("unit.other")


def test_a_second_signal_stops_at_once(monkeypatch):
    monkeypatch.setenv(interrupt.ENV_STOP_AT, "unit.step:2:SIGINT:2")
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with interrupt.handling():
            interrupt.check("unit.step")
            interrupt.check("unit.step")  # two SIGINTs: the second raises where it lands, inside check
    assert signal.getsignal(signal.SIGINT) == before and interrupt.forced() is None


def test_a_real_signal_from_outside_is_noticed_at_the_next_check():
    with interrupt.handling():
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: no exception where it lands
        assert interrupt.stop_requested() == "SIGINT"
        with pytest.raises(interrupt.Interrupted) as e:
            interrupt.check("unit.step")
    assert e.value.exit_code == 130


def test_a_bad_hook_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(interrupt.ENV_STOP_AT, "unit.step:x")
    with pytest.raises(FeatxError, match="POINT"):
        interrupt.check("unit.step")


# ------------------------------------------------------------------------------------------------ the console script

def test_the_console_script_exits_143_with_one_line(h5file, tmp_path):
    """A real process: the installed entry point, SIGTERM at the very end (the output exists, no path printed)."""
    env = {**os.environ, interrupt.ENV_STOP_AT: "cli.output:1:SIGTERM"}
    p = subprocess.run([sys.executable, "-m", "featx", "fit", "logreg", str(h5file), "--cache", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 143 and p.stdout == "", p.stderr
    assert p.stderr.strip().splitlines()[-1] == LINE.format("SIGTERM") and "Traceback" not in p.stderr
    again = subprocess.run([sys.executable, "-m", "featx", "fit", "logreg", str(h5file), "--cache", str(tmp_path),
                            "--quiet"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and Path(again.stdout.strip()).parent == tmp_path / "heads"


# ------------------------------------------------------------------------------------------------ search

@pytest.mark.parametrize("stop_at, states", [
    ("search.trial:2:SIGINT", ["COMPLETE", "COMPLETE"]),  # between trials: nothing abandoned
    ("search.fold:5:SIGTERM", ["COMPLETE", "FAIL"]),  # 2nd fold of the 2nd trial: that trial abandoned
    ("search.fold:4:SIGINT:2", ["COMPLETE", "FAIL"]),  # a second signal: stops inside the trial, at once
])
def test_search_stops_between_trials_and_folds(stop_at, states, h5file, tmp_path, optuna_warnings):
    args = ["search", "logreg", h5file, "--trials", "50", "--cv", "3", "--cache", tmp_path]
    r = invoke(args, stop_at)
    assert_stopped(r, stop_at.split(":")[2])
    ts = trials(tmp_path)
    assert [t.state.name for t in ts] == states
    assert all(t.user_attrs.get("fail_reason") == "interrupted" for t in ts if t.state.name == "FAIL")
    assert not optuna_warnings, [w.getMessage() for w in optuna_warnings]  # no "Trial 1 failed ..." + traceback
    assert not temp_files(tmp_path)
    done = invoke(["search", "logreg", h5file, "--trials", "2", "--cache", tmp_path, "--quiet"])
    m = json.loads((last_path(done) / "metrics.json").read_text())["search"]
    assert m["trials"] == len(states) + 2 and m["failed"] == states.count("FAIL")
    best = [t for t in trials(tmp_path) if t.number == m["best_trial"]][0]
    assert best.state.name == "COMPLETE"  # an abandoned trial is never the best


def test_search_mlp_stops_between_epochs(h5file, tmp_path, optuna_warnings):
    r = invoke(["search", "mlp", h5file, "--trials", "5", "--cache", tmp_path], "search.epoch:3:SIGTERM")
    assert_stopped(r, "SIGTERM")
    ts = trials(tmp_path)
    assert [t.state.name for t in ts] == ["FAIL"] and ts[0].user_attrs["fail_reason"] == "interrupted"
    assert len(ts[0].intermediate_values) == 2 and not optuna_warnings


@pytest.mark.slow
@pytest.mark.parametrize("stop_at, signame", [("search.workers:1:SIGINT", "SIGINT"),
                                              ("search.workers:1:SIGTERM:2", "SIGTERM"),
                                              ("search.fold:2:SIGTERM", "SIGTERM")])
def test_search_workers_stop_with_their_parent(stop_at, signame, h5file, tmp_path):
    """--jobs 2: the parent's stop reaches its spawned workers (a shared flag; a second signal: SIGTERM to each);
    a worker sent a SIGTERM of its own (the hook in each worker) stops the search too."""
    r = invoke(["search", "logreg", h5file, "--trials", "40", "--jobs", "2", "--cache", tmp_path], stop_at)
    assert_stopped(r, signame)
    assert not [t for t in trials(tmp_path) if t.state.name == "RUNNING"]
    assert not temp_files(tmp_path)


# ------------------------------------------------------------------------------------------------ the other commands

def test_extract_stops_between_batches_and_resumes_equal(small, tmp_path):
    r = invoke(["extract", small["data"], *EXTRACT, "--cache", tmp_path], "extract.batch:4:SIGTERM")
    assert_stopped(r, "SIGTERM")
    fdir = tmp_path / "features" / small["features"].name
    assert sorted(p.name for p in fdir.glob("shard-*.h5")) == ["shard-00000.h5"]  # 2 batches of 2 images: 1 shard
    assert not (fdir / "manifest.json").exists() and not temp_files(tmp_path)
    out = last_path(invoke(["extract", small["data"], *EXTRACT, "--cache", tmp_path]))
    a, b = rows_of(small["features"]), rows_of(out)
    assert np.array_equal(a["path"], b["path"]) and np.allclose(a["X"], b["X"], rtol=1e-5, atol=1e-6)


def test_fit_mlp_stops_between_epochs_writing_nothing(small, tmp_path):
    args = ["fit", "mlp", small["features"], *FIT_MLP, "--cache", tmp_path]
    assert_stopped(invoke(args, "fit.epoch:3:SIGINT"), "SIGINT")
    assert not (tmp_path / "heads").exists() or not any((tmp_path / "heads").iterdir())
    out = last_path(invoke(args))
    a, b = head_arrays(small["mlp"]), head_arrays(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_finetune_preempted_mid_epoch_resumes_at_that_step(small, tmp_path):
    args = ["finetune", small["head"], *FINETUNE, "--cache", tmp_path]
    assert_stopped(invoke(args, "finetune.step:2:SIGTERM"), "SIGTERM")  # after 1 of epoch 1's 3 steps
    mdir = tmp_path / "models" / small["model"].name
    ck = load_checkpoint(mdir / CHECKPOINT)
    assert ck["epoch"] == 0 and ck["partial"]["epoch"] == 1 and ck["partial"]["step"] == 1
    assert not temp_files(tmp_path) and not (mdir / "metrics.json").exists()
    out = last_path(invoke(args))
    assert out == mdir and not (mdir / CHECKPOINT).exists()
    same_model(small["model"], out)


def test_finetune_second_signal_keeps_the_last_checkpoint(small, tmp_path):
    args = ["finetune", small["head"], *FINETUNE, "--cache", tmp_path]
    assert_stopped(invoke(args, "finetune.step:5:SIGINT:2"), "SIGINT")  # epoch 2, step 2: at once
    ck = load_checkpoint(tmp_path / "models" / small["model"].name / CHECKPOINT)
    assert ck["epoch"] == 1 and "partial" not in ck  # epoch 1's checkpoint, untouched
    same_model(small["model"], last_path(invoke(args)))


def test_predict_stops_writing_nothing(small, tmp_path):
    args = ["predict", small["model"], small["data"], "--batch-size", "4", "--workers", "0", "--cache", tmp_path]
    assert_stopped(invoke(args, "predict.batch:2:SIGTERM"), "SIGTERM")
    assert not (tmp_path / "predictions").exists() or not any((tmp_path / "predictions").rglob("*.json"))
    assert last_path(invoke(args)).parent == tmp_path / "predictions"


# ------------------------------------------------------------------------------------------------ the stress test

# Every command, its stop points and how many times each is reached in an uninterrupted run of the settings above
# (15 images in batches of 2 and shards of 4; 6 MLP epochs; 2 epochs of 3 steps; 3 logreg trials of 2 folds; the
# tiny pipeline's 5 cases: 4 batches of 4 images, 3 MLP epochs, 2 trials on the val split, 1 epoch of 3 steps).
# test_stress_few_moments checks this table against what the uninterrupted runs reach, so it cannot go stale.
STRESS = {
    "extract": [("extract.batch", 8), ("cli.output", 1)],
    "fit-mlp": [("fit.epoch", 6), ("cli.output", 1)],
    "search": [("search.trial", 3), ("search.fold", 6), ("cli.output", 1)],
    "finetune": [("finetune.step", 6), ("cli.output", 1)],
    "run": [("run.case", 5), ("extract.batch", 4), ("fit.iteration", 2), ("fit.epoch", 3), ("search.trial", 2),
            ("search.fold", 2), ("finetune.step", 3), ("cli.output", 1)],
}
# featx run: the case each stage's stop points are reached in (the first that needs it: pool5-svm extracts)
RUN_CASE_AT = {"extract.batch": "pool5-svm", "fit.iteration": "pool5-svm", "fit.epoch": "pool5-mlp",
               "search.trial": "pool5-search-logreg", "search.fold": "pool5-search-logreg",
               "finetune.step": "finetune-all"}
RUN_COMPARED = ("status", "test_accuracy", "val_accuracy", "macro_f1", "from_case")


def moments(command: str, n: int, seed: int = 14) -> list[str]:
    """``n`` seeded stop moments for ``command``: a stop point, the count at which it fires, SIGINT or SIGTERM.

    Each moment of an uninterrupted run (a stop point and its count) is as likely as another; all of them come
    before any comes again, and one that comes again has the other signal (a moment is deterministic: the same
    moment with the same signal would check nothing new)."""
    rng = random.Random(f"{seed}-{command}")
    every = [(point, k) for point, reached in STRESS[command] for k in range(1, reached + 1)]
    rng.shuffle(every)
    out = []
    for i in range(n):
        cycle, j = divmod(i, len(every))
        point, k = every[j]
        out.append(f"{point}:{k}:{('SIGINT', 'SIGTERM')[(j + cycle) % 2]}")
    return out


@pytest.fixture(scope="module")
def stress_h5(tmp_path_factory) -> Path:
    X, y = _blobs(n=120, d=12, sep=1.0)
    return write_h5(tmp_path_factory.mktemp("stress-h5") / "feats.h5", X, y)


@pytest.fixture(scope="module")
def search_ref(small, stress_h5, tmp_path_factory) -> dict:
    """The uninterrupted search, its stop points, and the value of every parameter set evaluated so far: the
    reference's trials, then each set a rerun draws that it did not (computed once, by the search's own
    objective)."""
    cache = tmp_path_factory.mktemp("search-ref")
    out, reached = uninterrupted(command_args("search", small, stress_h5, cache))
    values = {_params_key(t.params): t.value for t in trials(cache) if t.state.name == "COMPLETE"}
    return {"path": out, "reached": reached, "values": values, "objective": None}


def _params_key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


@pytest.fixture(scope="module")
def run_ref(small, tmp_path_factory) -> dict:
    """The uninterrupted `featx run` of the tiny pipeline, its stop points, and its results per case."""
    out, reached = uninterrupted(command_args("run", small, None, tmp_path_factory.mktemp("run-ref")))
    rows = run_results(out)
    assert list(rows) == RUN_CASES and all(r["status"] == "ok" for r in rows.values()), rows
    return {"path": out, "reached": reached, "rows": rows}


def run_results(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def reference(command: str, small: dict, request) -> dict:
    """The uninterrupted run of ``command``: ``path`` (its output) and ``reached`` (its stop points)."""
    if command == "search":
        return request.getfixturevalue("search_ref")
    if command == "run":
        return request.getfixturevalue("run_ref")
    out = {"extract": "features", "fit-mlp": "mlp", "finetune": "model"}[command]
    return {"path": small[out], "reached": small["reached"][command]}


def no_trial_running(cache: Path) -> None:
    """No trial RUNNING in any study of the cache's journal."""
    journal = cache / "studies" / "featx.journal"
    if not journal.exists():
        return
    storage = open_storage(str(journal))
    for s in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        assert not [t.number for t in study.trials if t.state.name == "RUNNING"], s.study_name


def _stop_and_rerun(command: str, stop_at: str, small, ref: dict, h5: Path, cache: Path) -> None:
    point, _, signame = stop_at.split(":")
    args = command_args(command, small, h5, cache)
    assert_stopped(invoke(args, stop_at), signame)
    assert not temp_files(cache), stop_at
    no_trial_running(cache)
    if command == "run":
        # the results so far: the finished cases ok, the one the stop came in `interrupted` (not failed), the rest
        # not run; a stop between cases (run.case:N) comes before the N-th case starts
        rows = run_results(cache / "runs" / ref["path"].name)
        if point == "cli.output":
            expected = ["ok"] * len(RUN_CASES)
        elif point == "run.case":
            n = int(stop_at.split(":")[1]) - 1
            expected = ["ok"] * n + ["not run"] * (len(RUN_CASES) - n)
        else:
            n = RUN_CASES.index(RUN_CASE_AT[point])
            expected = ["ok"] * n + ["interrupted"] + ["not run"] * (len(RUN_CASES) - n - 1)
        assert [r["status"] for r in rows.values()] == expected, stop_at
    out = last_path(invoke(args))  # the rerun completes ...
    assert not temp_files(cache)
    no_trial_running(cache)
    # ... and equals an uninterrupted run
    if command == "extract":
        a, b = rows_of(ref["path"]), rows_of(out)
        assert np.array_equal(a["path"], b["path"]) and np.allclose(a["X"], b["X"], rtol=1e-5, atol=1e-6)
    elif command == "fit-mlp":
        a, b = head_arrays(ref["path"]), head_arrays(out)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    elif command == "search":
        # every finished trial's value is what an uninterrupted evaluation of its parameters gives (the
        # reference's, or the objective's for parameters the reference did not draw), no trial is left RUNNING,
        # and the refit head is the best finished trial's
        ts = trials(cache)
        for t in ts:
            if t.state.name == "COMPLETE":
                assert _value_of(t.params, h5, ref) == pytest.approx(t.value, abs=1e-12)
        m = json.loads((out / "metrics.json").read_text())
        complete = [t for t in ts if t.state.name == "COMPLETE"]
        assert m["search"]["best_value"] == max(t.value for t in complete)
    elif command == "finetune":
        same_model(ref["path"], out)
    else:
        # the same results as the uninterrupted run: per case its status, accuracies and the case a fine-tune
        # started from, the same heads (arrays) and the same fine-tuned model (weights, history)
        assert out.name == ref["path"].name
        rows = run_results(out)
        assert {c: tuple(r[k] for k in RUN_COMPARED) for c, r in rows.items()} == \
            {c: tuple(r[k] for k in RUN_COMPARED) for c, r in ref["rows"].items()}
        for case, r in rows.items():
            a, b = head_arrays(Path(ref["rows"][case]["head_dir"])), head_arrays(Path(r["head_dir"]))
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), case
        same_model(Path(ref["rows"]["finetune-all"]["model_dir"]), Path(rows["finetune-all"]["model_dir"]))


def _value_of(params: dict, h5: Path, ref: dict) -> float:
    key = _params_key(params)
    if key not in ref["values"]:
        from featx.fit import open_rows
        from featx.search import Objective

        if ref["objective"] is None:
            ref["objective"] = Objective(open_rows(h5, None), "logreg", cv=2, seed=0, device="cpu")
        ref["values"][key] = ref["objective"](optuna.trial.FixedTrial(params))
    return ref["values"][key]


COMMANDS = ["extract", "fit-mlp", "search", "finetune", "run"]


@pytest.mark.parametrize("command", COMMANDS)
def test_stress_few_moments(command, small, stress_h5, tmp_path, request):
    """The default suite's share of the stress test: the table above is what an uninterrupted run reaches, and one
    seeded moment per command."""
    ref = reference(command, small, request)
    assert ref["reached"] == dict(STRESS[command])
    for i, stop_at in enumerate(moments(command, 1, seed=1)):
        _stop_and_rerun(command, stop_at, small, ref, stress_h5, tmp_path / str(i))


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_stress_20_seeded_moments(command, small, stress_h5, tmp_path, request):
    """20 seeded moments per command, SIGINT and SIGTERM in turn: every stop exits 130/143 with the one line,
    nothing RUNNING, no temporary file; every rerun completes and equals the uninterrupted run."""
    ref = reference(command, small, request)
    for i, stop_at in enumerate(moments(command, 20)):
        _stop_and_rerun(command, stop_at, small, ref, stress_h5, tmp_path / str(i))


def test_reading_hashing_and_scaling_big_inputs_notice_a_stop_request(tmp_path):
    """The steps before a fit that take seconds on gigabytes of rows (hashing a feature file, reading its rows,
    fitting and applying the scaling) raise at a pending SIGTERM; a file being saved is hashed to the end."""
    from featx.cache import sha256_file
    from featx.fit import Scaler
    from featx.store import FeatureSet

    X, y = _blobs(n=300)
    h5 = write_h5(tmp_path / "f.h5", X, y)
    fitted = Scaler("standard").fit(X.copy())
    steps = {"hash": lambda: sha256_file(h5, stoppable=True), "read": lambda: FeatureSet(h5).load("pool5"),
             "fit scaling": lambda: Scaler("standard").fit(X.copy()), "scale": lambda: fitted.transform_(X.copy())}
    for name, step in steps.items():
        with interrupt.handling():
            os.kill(os.getpid(), signal.SIGTERM)
            with pytest.raises(interrupt.Interrupted):
                step()
                pytest.fail(f"{name} went on after SIGTERM")
    with interrupt.handling():
        os.kill(os.getpid(), signal.SIGTERM)
        assert len(sha256_file(h5)) == 64  # saving: not stoppable
