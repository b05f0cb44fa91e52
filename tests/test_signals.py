"""Ctrl-C (SIGINT) and preemption (SIGTERM) at named stop points: every command ends with one line and 130/143,
leaves nothing RUNNING or half-written, and the same command then finishes what an uninterrupted run would have.

No test here depends on when a signal lands: the ``FEATX_STOP_AT`` hook makes the process send itself a real
signal (``os.kill``) at the N-th time a stop point is reached, so the real handler runs, exactly then.  Most
commands run in this process through click's CliRunner (the same ``command`` wrapper, the same handlers, without
a 3-second interpreter start per run); a few run as real processes to check the console script itself.
"""
from __future__ import annotations

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

from featx import interrupt
from featx.cli import main
from featx.errors import FeatxError
from featx.finetune import CHECKPOINT, load_checkpoint
from featx.search import open_storage
from test_fit import _blobs, write_h5

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


@pytest.fixture(scope="module")
def small(digits_dir, tmp_path_factory):
    """15 digits of 3 classes; their features; a logreg head; and every command's uninterrupted output."""
    import shutil

    root = tmp_path_factory.mktemp("signals")
    data = root / "data"
    for c in range(3):
        (data / str(c)).mkdir(parents=True)
        for p in sorted((digits_dir / str(c)).glob("*.png"))[:5]:
            shutil.copy(p, data / str(c) / p.name)
    ref = root / "ref"
    r = CliRunner().invoke(main, ["extract", str(data), *EXTRACT, "--cache", str(ref)])
    features = last_path(r)
    head = last_path(CliRunner().invoke(main, ["fit", "logreg", str(features), "--cache", str(ref), "--quiet"]))
    mlp = last_path(CliRunner().invoke(main, ["fit", "mlp", str(features), *FIT_MLP, "--cache", str(ref)]))
    model = last_path(CliRunner().invoke(main, ["finetune", str(head), *FINETUNE, "--cache", str(ref)]))
    return {"data": data, "features": features, "head": head, "mlp": mlp, "model": model}


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

# Every command, its stop points and how many times each is reached in an uninterrupted run of the settings
# above (15 images in batches of 2 and shards of 4; 6 MLP epochs; 2 epochs of 3 steps; 3 logreg trials of 2 folds).
STRESS = {
    "extract": [("extract.batch", 8), ("cli.output", 1)],
    "fit-mlp": [("fit.epoch", 6), ("cli.output", 1)],
    "search": [("search.trial", 3), ("search.fold", 6), ("cli.output", 1)],
    "finetune": [("finetune.step", 6), ("cli.output", 1)],
    # "run": featx run is being built by the pipelines helper (issue #10); add its command and stop points here
}


def moments(command: str, n: int, seed: int = 14) -> list[str]:
    """``n`` seeded stop moments for ``command``: a stop point, the count at which it fires, SIGINT or SIGTERM."""
    rng = random.Random(f"{seed}-{command}")
    points = STRESS[command]
    out = []
    for i in range(n):
        point, reached = points[rng.randrange(len(points))]
        out.append(f"{point}:{rng.randint(1, reached)}:{('SIGINT', 'SIGTERM')[i % 2]}")
    return out


def _stop_and_rerun(command: str, stop_at: str, small, h5: Path, cache: Path) -> None:
    signame = stop_at.split(":")[2]
    if command == "extract":
        args = ["extract", small["data"], *EXTRACT, "--cache", cache]
    elif command == "fit-mlp":
        args = ["fit", "mlp", small["features"], *FIT_MLP, "--cache", cache]
    elif command == "search":
        args = ["search", "logreg", h5, "--trials", "3", "--cv", "2", "--cache", cache, "--quiet"]
    else:
        args = ["finetune", small["head"], *FINETUNE, "--cache", cache]
    assert_stopped(invoke(args, stop_at), signame)
    assert not temp_files(cache), stop_at
    if command == "search":
        assert not [t for t in trials(cache) if t.state.name == "RUNNING"]
    out = last_path(invoke(args))  # the rerun completes ...
    assert not temp_files(cache)
    # ... and equals an uninterrupted run
    if command == "extract":
        a, b = rows_of(small["features"]), rows_of(out)
        assert np.array_equal(a["path"], b["path"]) and np.allclose(a["X"], b["X"], rtol=1e-5, atol=1e-6)
    elif command == "fit-mlp":
        a, b = head_arrays(small["mlp"]), head_arrays(out)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    elif command == "search":
        # every finished trial's value is what an uninterrupted evaluation of its parameters gives, no trial
        # is left RUNNING, and the refit head is the best finished trial's
        from featx.fit import open_rows
        from featx.search import Objective

        ts = trials(cache)
        assert not [t for t in ts if t.state.name == "RUNNING"]
        obj = Objective(open_rows(h5, None), "logreg", cv=2, seed=0, device="cpu")
        for t in ts:
            if t.state.name == "COMPLETE":
                assert obj(optuna.trial.FixedTrial(t.params)) == pytest.approx(t.value, abs=1e-12)
        m = json.loads((out / "metrics.json").read_text())
        complete = [t for t in ts if t.state.name == "COMPLETE"]
        assert m["search"]["best_value"] == max(t.value for t in complete)
    else:
        same_model(small["model"], out)


@pytest.mark.parametrize("command", ["extract", "fit-mlp", "search", "finetune"])
def test_stress_few_moments(command, small, h5file, tmp_path):
    """The default suite's share of the stress test: one seeded moment per command."""
    for i, stop_at in enumerate(moments(command, 1, seed=1)):
        _stop_and_rerun(command, stop_at, small, h5file, tmp_path / str(i))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["extract", "fit-mlp", "search", "finetune"])
def test_stress_20_seeded_moments(command, small, h5file, tmp_path):
    """20 seeded moments per command, SIGINT and SIGTERM in turn: every stop exits 130/143 with the one line,
    nothing RUNNING, no temporary file; every rerun completes and equals the uninterrupted run."""
    for i, stop_at in enumerate(moments(command, 20)):
        _stop_and_rerun(command, stop_at, small, h5file, tmp_path / str(i))
