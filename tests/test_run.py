"""``featx run``: pipelines/digits.toml end to end with random weights, the cache reused, a killed run redone
only where it stopped, failed cases recorded, --only, --set, --dry-run."""
from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
from conftest import run_cli

from featx.run import STAGES, RunPlan, RunResult, run_pipeline

DIGITS = Path(__file__).resolve().parent.parent / "pipelines" / "digits.toml"
# pipelines/digits.toml as it is, made small: 2 search trials, 5 MLP epochs (60 images: the conftest's digits)
SMALL = ["search.logreg.trials=2", "heads.mlp.epochs=5"]
# smaller still, for the default suite: one layer, and the fine-tune trains the head alone
TINY = [*SMALL, "features.layers=['pool5']", "heads.mlp.epochs=3", "finetune.all.unfreeze=head"]
TINY_CASES = ["pool5-svm", "pool5-logreg", "pool5-mlp", "pool5-search-logreg", "finetune-all"]
ACCURACIES = ("test_accuracy", "val_accuracy", "macro_f1")


def results(path: Path) -> dict[str, dict[str, str]]:
    with open(path / "results.csv", newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def accuracies(path: Path) -> dict[str, tuple]:
    return {case: (r["status"], *(r[k] for k in ACCURACIES)) for case, r in results(path).items()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, digits_dir) -> tuple[RunResult, Path]:
    """The digits pipeline (TINY), uninterrupted, in a cache of its own."""
    cache = tmp_path_factory.mktemp("run-cache")
    res = run_pipeline(DIGITS, data=digits_dir, weights="random", sets=TINY, cache=cache, device="cpu",
                       progress=False)
    assert isinstance(res, RunResult)
    return res, cache


def check_results(res: RunResult, cases: list[str]) -> None:
    rows = results(res.path)
    assert list(rows) == cases
    assert all(r["status"] == "ok" for r in rows.values()), rows
    n_heads = sum(not c.startswith("finetune") and "search" not in c for c in cases)
    assert res.computed == {"extract": 1, "fit": n_heads, "search": 1, "finetune": 1}  # one extraction for all
    for r in rows.values():
        assert 0 <= float(r["test_accuracy"]) <= 1 and r["val_accuracy"] and r["features"] and r["head_dir"]
        assert Path(r["features"]) == Path(rows["pool5-svm"]["features"])
    ft = rows["finetune-all"]
    assert Path(ft["model_dir"], "model.pt").exists()
    # the fine-tune started from the case with the best validation accuracy (the first of equals)
    vals = {c: float(r["val_accuracy"]) for c, r in rows.items() if c != "finetune-all"}
    assert ft["from_case"] == max(vals, key=vals.__getitem__)
    assert ft["head_dir"] == rows[ft["from_case"]]["head_dir"]
    data = json.loads((res.path / "results.json").read_text())
    assert [r["case"] for r in data["rows"]] == list(rows)
    report = (res.path / "report.md").read_text()
    assert "| case | status | test accuracy" in report and "Best case" in report
    assert (res.path / "results.png").stat().st_size > 1000
    assert json.loads((res.path / "pipeline.json").read_text())["config"]["features"]["weights"] == "random"


def test_digits_end_to_end(first_run, digits_dir):
    res, cache = first_run
    check_results(res, TINY_CASES)
    assert res.path.parent == cache / "runs"
    again = run_pipeline(DIGITS, data=digits_dir, weights="random", sets=TINY, cache=cache, device="cpu",
                         progress=False)
    assert again.path == res.path
    assert again.computed == {"extract": 0, "fit": 0, "search": 0, "finetune": 0}  # the second run computes nothing
    assert again.cached == {"extract": 1, "fit": 3, "search": 1, "finetune": 1}
    assert accuracies(again.path) == accuracies(res.path)


@pytest.mark.slow
def test_digits_as_shipped_end_to_end(digits_dir, tmp_path):
    """Both layers, all eight cases, the fine-tune training every layer; then a second run that computes nothing."""
    res = run_pipeline(DIGITS, data=digits_dir, weights="random", sets=SMALL, cache=tmp_path, device="cpu",
                       progress=False)
    check_results(res, ["pool5-svm", "fc7-svm", "pool5-logreg", "fc7-logreg", "pool5-mlp", "fc7-mlp",
                        "pool5-search-logreg", "finetune-all"])
    again = run_pipeline(DIGITS, data=digits_dir, weights="random", sets=SMALL, cache=tmp_path, device="cpu",
                         progress=False)
    assert sum(again.computed.values()) == 0 and accuracies(again.path) == accuracies(res.path)


def test_dry_run_says_cached_and_to_compute(first_run, digits_dir):
    res, cache = first_run
    plan = run_pipeline(DIGITS, data=digits_dir, weights="random", sets=TINY, cache=cache, device="cpu",
                        dry_run=True)
    assert isinstance(plan, RunPlan) and plan.path == res.path
    (info,) = plan.features.values()
    assert info["status"] == "cached" and info["layout"] == "class-folders"
    assert info["counts"] == {"train": 40, "val": 10, "test": 10} and len(info["classes"]) == 10
    assert all(st[stage] == "cached" for st in plan.cases.values() for stage in STAGES if stage in st)
    assert plan.cases["finetune-all"]["from"] == res.rows[-1]["from_case"]
    # one changed value: only what depends on it is to compute
    plan = run_pipeline(DIGITS, data=digits_dir, weights="random", sets=[*TINY, "heads.svm.C=0.5"], cache=cache,
                        device="cpu", dry_run=True)
    assert plan.cases["pool5-svm"] == {"extract": "cached", "fit": "to compute"}
    assert plan.cases["pool5-logreg"]["fit"] == "cached" and plan.cases["pool5-search-logreg"]["search"] == "cached"
    assert plan.cases["finetune-all"]["finetune"] == "to compute"


def cli_args(digits_dir, cache, *extra) -> list[str]:
    return ["run", str(DIGITS), "--data", str(digits_dir), "--weights", "random", "--cache", str(cache), "--device",
            "cpu", *[a for s in TINY for a in ("--set", s)], *extra]


@pytest.mark.slow
@pytest.mark.parametrize("point, redone", [
    ("search.trial:1:SIGKILL", {"extract": 0, "fit": 0, "search": 1, "finetune": 1}),   # after its first trial
    ("finetune.step:2:SIGKILL", {"extract": 0, "fit": 0, "search": 0, "finetune": 1}),  # inside the fine-tune
])
def test_killed_mid_stage_then_rerun_redoes_only_the_unfinished_stage(first_run, digits_dir, tmp_path, point, redone):
    """kill -9 at a named point (FEATX_STOP_AT), then the same run again: same results as an uninterrupted run."""
    res, _ = first_run
    cache = tmp_path / "cache"
    p = run_cli(*cli_args(digits_dir, cache), env={"FEATX_STOP_AT": point})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    killed = accuracies(cache / "runs" / res.path.name)
    n_ok = 3 if point.startswith("search") else 4
    assert [c for c, r in killed.items() if r[0] == "ok"] == list(killed)[:n_ok]  # rows written as cases finish
    again = run_pipeline(DIGITS, data=digits_dir, weights="random", sets=TINY, cache=cache, device="cpu",
                         progress=False)
    assert again.computed == redone
    assert accuracies(again.path) == accuracies(res.path)


@pytest.mark.slow
def test_sigint_at_a_named_point_records_the_case_interrupted_and_exits_130(first_run, digits_dir, tmp_path):
    res, _ = first_run
    cache = tmp_path / "cache"
    p = run_cli(*cli_args(digits_dir, cache), env={"FEATX_STOP_AT": "fit.epoch:2"})  # the MLP's second epoch
    assert p.returncode == 130, p.stderr[-2000:]
    assert "interrupted (SIGINT)" in p.stderr
    rows = results(cache / "runs" / res.path.name)
    assert [r["status"] for r in rows.values()] == ["ok", "ok", "interrupted", "not run", "not run"]
    assert (cache / "runs" / res.path.name / "report.md").exists()
    again = run_pipeline(DIGITS, data=digits_dir, weights="random", sets=TINY, cache=cache, device="cpu",
                         progress=False)
    assert again.computed == {"extract": 0, "fit": 1, "search": 1, "finetune": 1}
    assert accuracies(again.path) == accuracies(res.path)


@pytest.mark.slow
def test_interrupted_case_is_recorded_and_the_rerun_matches(first_run, digits_dir, tmp_path):
    res, _ = first_run
    cache = tmp_path / "cache"

    def stop(event, case, stage):
        if (event, case, stage) == ("start", "pool5-mlp", "fit"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline(DIGITS, data=digits_dir, weights="random", sets=TINY, cache=cache, device="cpu",
                     progress=False, on_stage=stop)
    rows = results(cache / "runs" / res.path.name)
    assert [r["status"] for r in rows.values()] == ["ok"] * 2 + ["interrupted"] + ["not run"] * 2
    assert (cache / "runs" / res.path.name / "report.md").exists()
    again = run_pipeline(DIGITS, data=digits_dir, weights="random", sets=TINY, cache=cache, device="cpu",
                         progress=False)
    assert again.computed == {"extract": 0, "fit": 1, "search": 1, "finetune": 1}
    assert accuracies(again.path) == accuracies(res.path)


def test_failed_case_is_recorded_and_the_others_run(first_run, digits_dir):
    _, cache = first_run
    res = run_pipeline(DIGITS, data=digits_dir, weights="random", sets=[*TINY, "heads.svm.C=-1"],
                       only="pool5-svm,pool5-logreg", cache=cache, device="cpu", progress=False)
    rows = results(res.path)
    assert list(rows) == ["pool5-svm", "pool5-logreg"]  # --only
    assert rows["pool5-svm"]["status"] == "failed" and "C" in rows["pool5-svm"]["error"]
    assert rows["pool5-logreg"]["status"] == "ok" and res.failed == ["pool5-svm"]
    assert res.computed["fit"] == 0 and res.cached["fit"] == 1  # the logistic head was already there
    assert "pool5-svm: failed" in (res.path / "report.md").read_text()


def test_cli_exits_non_zero_when_a_case_failed_and_prints_the_run_dir(first_run, digits_dir):
    _, cache = first_run
    p = run_cli("run", str(DIGITS), "--data", str(digits_dir), "--weights", "random", "--cache", str(cache),
                "--only", "pool5-svm", "--set", "heads.svm.C=-1", *[a for s in TINY for a in ("--set", s)], "--quiet")
    assert p.returncode == 1, p.stderr
    out = Path(p.stdout.strip().splitlines()[-1])
    assert (out / "results.csv").exists() and "1 case(s) failed: pool5-svm" in p.stderr
    p = run_cli("run", str(DIGITS), "--data", str(digits_dir), "--set", "features.views=3", "--cache", str(cache))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "key features.views" in p.stderr, p.stderr
    p = run_cli("run", str(DIGITS), "--data", str(digits_dir), "--weights", "random", "--cache", str(cache),
                "--dry-run", *[a for s in TINY for a in ("--set", s)])
    assert p.returncode == 0 and "pool5-svm: extract cached; fit cached" in p.stdout, p.stderr


def test_weights_identity_is_what_loading_the_weights_records(tmp_path):
    """The dry run knows a feature set's key without building the network: the identity must be the same."""
    import torch

    from featx.backbones import load_backbone, weights_identity

    assert weights_identity("alexnet", "random", seed=3) == load_backbone("alexnet", "random", seed=3).weights_id
    f = tmp_path / "w.pt"
    torch.save(load_backbone("alexnet", "random", seed=1).model.state_dict(), f)
    assert weights_identity("alexnet", str(f)) == load_backbone("alexnet", str(f)).weights_id
    ident = weights_identity("alexnet", "imagenet")  # known without the file (offline)
    assert ident["kind"] == "imagenet" and ident["file"].startswith("alexnet-")


def test_every_finetune_option_of_a_pipeline_is_a_finetune_option():
    from dataclasses import fields

    from featx.finetune import FinetuneOptions
    from featx.pipeline import FINETUNE_OPTIONS

    assert set(FINETUNE_OPTIONS) <= {f.name for f in fields(FinetuneOptions)} - {"seed"}


def test_missing_data_is_one_error_before_any_case(tmp_path):
    from featx.errors import DataError

    with pytest.raises(DataError, match="data.path .* does not exist.*--data"):
        run_pipeline(DIGITS, data=tmp_path / "nowhere", weights="random", cache=tmp_path)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ the start of a fine-tune

def test_choose_start_rule():
    """The best validation score; the first of equals; a lone case needs none; several without one: one error."""
    from featx.run import NoStart, choose_start, start_score

    assert choose_start([("a", 0.5), ("b", 0.7), ("c", 0.6)]) == "b"
    assert choose_start([("a", 0.7), ("b", 0.7)]) == "a" and choose_start([("b", 0.7), ("a", 0.7)]) == "b"
    assert choose_start([("a", None), ("b", 0.1)]) == "b"  # among several, a case without a score is never chosen
    assert choose_start([("a", None)]) == "a"  # nothing to choose between
    with pytest.raises(NoStart, match=r"^cannot choose among a, b: none has a validation accuracy .*data.split"):
        choose_start([("a", None), ("b", None)])
    with pytest.raises(NoStart, match=r"^no head to start from: a, b all failed$"):
        choose_start([], failed=["a", "b"])
    assert start_score({"val_accuracy": 0.8, "search": {"best_value": 0.9}}) == 0.8  # the val split first
    assert start_score({"search": {"best_value": 0.9}}) == 0.9  # a search without one: its CV accuracy
    assert start_score({"test_accuracy": 0.99}) is None  # the test rows never choose
    assert start_score({"val_accuracy": float("nan")}) is None


START_PIPELINE = """
name = "start"
[data]
path = "{data}"
split = "{split}"
[features]
weights = "random"
layers = ["pool5"]
[heads.a]
kind = "logreg"
C = 1.0
[heads.b]                 # the same head as a: equal validation accuracies
kind = "logreg"
C = 1.0
[heads.svm]
C = 0.01
[search.logreg]
trials = 2
cv = 2
[finetune.tie]
from = ["b", "a"]
epochs = 1
unfreeze = "head"
[finetune.any]
epochs = 1
unfreeze = "head"
[finetune.fits]
from = ["a", "svm"]
epochs = 1
unfreeze = "head"
"""


@pytest.mark.parametrize("split", ["test=0.15,val=0.1", "test=0.2"])
def test_dry_run_and_real_run_choose_the_same_start(first_run, digits_dir, tmp_path, split):
    """With a val split and without one (only the search has a score then: its cross-validation accuracy), the
    dry run names the start the real run took, or fails it with the same line."""
    file = tmp_path / "start.toml"
    file.write_text(START_PIPELINE.format(data=digits_dir, split=split))
    cache = first_run[1] if "val" in split else tmp_path / "cache"  # (with a val split: the features are there)
    res = run_pipeline(file, cache=cache, device="cpu", progress=False)
    rows = {r["case"]: r for r in res.rows}
    plan = run_pipeline(file, cache=cache, device="cpu", dry_run=True)
    failing = set() if "val" in split else {"finetune-tie", "finetune-fits"}  # no case with a score to choose
    for case, st in plan.cases.items():  # the run made everything: the dry run finds it all in the cache
        assert all(st[s].startswith("error: " if case in failing else "cached") for s in STAGES if s in st), st
    assert set(res.failed) == failing
    for case in failing:
        assert rows[case]["error"].startswith(f"cannot choose among {plan.cases[case]['heads']}: none has a val")
        assert plan.cases[case]["finetune"] == f"error: {rows[case]['error']}"  # the same line
    if "val" in split:
        assert rows["finetune-tie"]["from_case"] == "pool5-a"  # equal scores: the first in the file's order
        scored = {c: float(r["val_accuracy"]) for c, r in rows.items() if not c.startswith("finetune")}
        assert rows["finetune-any"]["from_case"] == max(scored, key=scored.__getitem__)
    else:  # the search alone has a score: its cross-validation accuracy
        assert rows["finetune-any"]["from_case"] == "pool5-search-logreg"
    for case, r in rows.items():
        if case.startswith("finetune") and case not in failing:
            assert plan.cases[case]["from"] == r["from_case"], case


def test_search_restarts_an_unfinished_study_through_search_api(tmp_path):
    """What run needs from featx.search: how far a named study got, and starting it afresh."""
    import optuna

    from featx.search import delete_study, finished_trials, open_storage

    storage = str(tmp_path / "studies.journal")
    assert finished_trials(storage, "s") is None
    study = optuna.create_study(study_name="s", storage=open_storage(storage))
    study.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={}, distributions={}))
    for reason in ("interrupted", "diverged"):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={}, distributions={},
                                                  user_attrs={"fail_reason": reason}))
    assert finished_trials(storage, "s") == (3, 4)  # the interrupted one is not finished
    delete_study(storage, "s")
    assert finished_trials(storage, "s") is None
    delete_study(storage, "s")  # no such study: nothing to do


def test_a_full_disk_fails_the_cases_that_write_and_exits_75(first_run, digits_dir, monkeypatch):
    """The heads cannot be written (ENOSPC from the first file of each): both cases fail "no space left", the
    tables are written, the CLI exits 75; once space is back the same run completes."""
    import errno
    import tempfile

    from click.testing import CliRunner

    from featx.cli import main

    _, cache = first_run
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **kw):
        if dir is not None and "heads" in Path(dir).parts:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, dir=dir, **kw)

    sets = [*TINY, "heads.svm.C=0.25", "heads.logreg.C=0.25"]  # heads not in the cache yet
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    res = run_pipeline(DIGITS, data=digits_dir, weights="random", sets=sets, only="pool5-svm,pool5-logreg",
                       cache=cache, device="cpu", progress=False)
    rows = results(res.path)
    assert res.no_space == ["pool5-svm", "pool5-logreg"] and res.failed == res.no_space
    assert all("no space left on" in r["error"] and "\n" not in r["error"] for r in rows.values()), rows
    args = ["run", str(DIGITS), "--data", str(digits_dir), "--weights", "random", "--cache", str(cache), "--only",
            "pool5-svm,pool5-logreg", "--device", "cpu", "--quiet", *[a for s in sets for a in ("--set", s)]]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 75, r.output
    monkeypatch.undo()
    again = run_pipeline(DIGITS, data=digits_dir, weights="random", sets=sets, only="pool5-svm,pool5-logreg",
                         cache=cache, device="cpu", progress=False)
    assert again.failed == [] and again.computed["fit"] == 2
