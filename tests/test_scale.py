"""Fits and searches under a memory budget: the path each picks, refusals, folds as views, the same best trial."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
from click.testing import CliRunner
from test_fit import _blobs, write_h5

from featx import memory
from featx.cli import main
from featx.fit import fit_head, open_rows
from featx.folds import FoldLayout, Kept
from featx.memory import NotEnoughMemory
from featx.search import Objective, open_storage, plan_search, search


def _meta(path) -> dict:
    return json.loads((path / "featx-head.json").read_text())


@pytest.fixture(scope="module")
def tall(tmp_path_factory):
    """20,000 rows of 256 features: more rows than a chunk, so that streaming holds less than the rows."""
    X, y = _blobs(n=20_000, d=256, k=4, sep=1.5)
    return write_h5(tmp_path_factory.mktemp("tall") / "tall.h5", X, y)


def test_fit_streams_when_the_rows_do_not_fit(tall, tmp_path):
    need_memory = memory.estimate("logreg", "memory", 17_000, 256, 4)
    need_stream = memory.estimate("logreg", "stream", 17_000, 256, 4)
    assert need_stream < need_memory
    budget = (need_stream + need_memory) // 2
    r = CliRunner().invoke(main, ["fit", "logreg", str(tall), "--max-memory", str(budget), "--cache", str(tmp_path)])
    assert r.exit_code == 0, r.output
    head = r.stdout.strip().splitlines()[-1]
    meta = _meta(Path(head))
    assert meta["fit"]["path"] == "stream" and meta["fit"]["budget_bytes"] == budget
    assert meta["fit"]["predicted_peak_bytes"] <= budget
    assert "stream path, predicted peak" in r.stderr
    metrics = json.loads((Path(head) / "metrics.json").read_text())
    assert metrics["streamed"] and metrics["test_accuracy"] > 0.5


def test_an_ample_budget_fits_in_memory(tall, tmp_path):
    res = fit_head(tall, "logreg", cache=tmp_path, max_memory="8G")
    assert _meta(res.path)["fit"]["path"] == "memory" and not res.metrics["streamed"]


def test_a_tiny_budget_refuses_in_one_line(tall, tmp_path):
    r = CliRunner().invoke(main, ["fit", "svm", str(tall), "--max-memory", "1M", "--cache", str(tmp_path)])
    assert r.exit_code != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("featx: error: needs ") and "--max-memory" in lines[-1]
    assert "budget 1 MB" in lines[-1] and "Traceback" not in r.output
    with pytest.raises(NotEnoughMemory):
        fit_head(tall, "logreg", cache=tmp_path, max_memory=1 << 20)
    r = CliRunner().invoke(main, ["fit", "svm", str(tall), "--max-memory", "lots", "--cache", str(tmp_path)])
    assert r.exit_code != 0 and r.stderr.strip().splitlines()[-1].startswith("featx: error: --max-memory 'lots'")


@pytest.mark.parametrize("n, d, want", [(300, 512, "gram"), (1500, 64, "feature")])
def test_svm_takes_gram_for_few_rows_and_feature_space_for_many(n, d, want, tmp_path):
    X, y = _blobs(n=n, d=d, k=3)
    h5 = write_h5(tmp_path / "f.h5", X, y)
    res = fit_head(h5, "svm", params={"C": 0.1}, cache=tmp_path, max_memory="4G")
    assert _meta(res.path)["fit"]["path"] == want and res.metrics["test_accuracy"] > 0.8


def test_svm_falls_back_to_feature_space_when_the_gram_matrix_does_not_fit(tmp_path):
    n, d, k = 1200, 1024, 40  # fewer rows than features, but 40 classes' caches beside the Gram matrix
    X, y = _blobs(n=n, d=d, k=k)
    h5 = write_h5(tmp_path / "f.h5", X, y)
    n_train = int(open_rows(h5).mask("train").sum())
    assert n_train <= d + 1
    gram = memory.estimate("svm", "gram", n_train, d, k)
    feature = memory.estimate("svm", "feature", n_train, d, k)
    assert feature < gram
    res = fit_head(h5, "svm", params={"C": 0.1}, cache=tmp_path, max_memory=(gram + feature) // 2)
    assert _meta(res.path)["fit"]["path"] == "feature" and res.metrics["test_accuracy"] > 0.5
    with pytest.raises(NotEnoughMemory, match="svm gram path"):
        memory.plan_fit("svm", n_train, d, k, budget=feature, path="gram")


def test_folds_are_views_of_one_matrix(tmp_path):
    X, y = _blobs(n=300, d=16, k=3)
    rows = open_rows(write_h5(tmp_path / "f.h5", X, y))
    obj = Objective(rows, "svm", cv=3, seed=0, device="cpu")
    shared, _ = obj.data("standard")
    seen = np.zeros(len(obj.y_train), dtype=int)
    for f, (tr, va) in enumerate(obj.folds):
        Xtr, ytr, Xva, yva = obj.fold("standard", f)
        assert np.shares_memory(Xtr, shared) and np.shares_memory(Xva, shared)
        assert Xtr.base is not None and Xva.base is not None and Xtr.flags.c_contiguous
        assert len(Xtr) == len(tr) and len(Xva) == len(va)
        assert sorted(ytr.tolist()) == sorted(obj.y_train[tr].tolist())
        assert sorted(yva.tolist()) == sorted(obj.y_train[va].tolist())
        seen[va] += 1
    assert (seen == 1).all()
    assert shared.shape[0] == obj.layout.order.shape[0] < 2 * len(obj.y_train)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_the_layout_gives_every_fold_its_rows(k):
    rng = np.random.default_rng(k)
    n = 50
    perm = rng.permutation(n)
    folds = [(np.setdiff1d(np.arange(n), part), part) for part in np.array_split(perm, k)]
    lay = FoldLayout.of(folds)
    for f, (tr, va) in enumerate(folds):
        assert sorted(lay.order[lay.train[f]].tolist()) == sorted(tr.tolist())
        assert sorted(lay.order[lay.val[f]].tolist()) == sorted(va.tolist())
    assert len(lay.order) <= (2 * k - 2) * n // k + k


@pytest.mark.parametrize("kind, kept_scalings", [("logreg", {"l2"}), ("mlp", {"l2"}),
                                                  ("svm", {"standard", "l2"})])
def test_only_the_svm_keeps_the_rows_of_several_scalings(kind, kept_scalings, tmp_path):
    X, y = _blobs(n=300, d=16, k=3)
    obj = Objective(open_rows(write_h5(tmp_path / "f.h5", X, y)), kind, cv=3, seed=0, device="cpu",
                    max_memory="1G")  # ample: the svm keeps both scalings
    standard, _ = obj.data("standard")
    l2, _ = obj.data("l2")
    assert {key[1] for key in obj._kept.items if key[0] == "data"} == kept_scalings
    assert np.allclose(np.linalg.norm(l2, axis=1), 1.0, atol=1e-5) and not np.allclose(standard, l2)
    again, _ = obj.data("standard")  # read again when it was released: the same rows
    np.testing.assert_array_equal(again, standard)


def test_kept_releases_the_least_recently_used_and_what_was_built_on_it():
    kept = Kept(100)
    kept.get(("data", "a"), lambda: "A", 40)
    kept.get(("state", "a", 0), lambda: "A0", 30)
    kept.get(("data", "b"), lambda: "B", 40)  # 110 > 100: data "a" goes, and its state with it
    assert set(kept.items) == {("data", "b")}
    kept.get(("state", "b", 0), lambda: "B0", 30)
    kept.get(("state", "b", 1), lambda: "B1", 30)  # keeps data "b" (asked), drops the oldest state
    assert ("data", "b") in kept.items and len(kept.items) <= 3


def _best(study_name: str, storage: str):
    st = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    return st.best_trial.number, st.best_trial.params, st.best_value


@pytest.mark.parametrize("kind", ["svm", "logreg"])
def test_a_tight_budget_finds_the_same_best_trial(kind, tmp_path):
    n, d = (6000, 32) if kind == "svm" else (20_000, 64)
    X, y = _blobs(n=n, d=d, k=3, sep=0.6)
    h5 = write_h5(tmp_path / "f.h5", X, y)
    rows = open_rows(h5)
    ample = plan_search(rows, kind, folds=3, max_memory="8G")
    assert ample.mode == "memory"
    if kind == "svm":  # room for one scaling's rows and one fold's state: the others are released, computed again
        tight = ample.data + ample.loading + ample.state + (1 << 20)
    else:  # room for streamed fits only
        n_train = int(rows.mask("train").sum())
        tight = memory.estimate("logreg", "stream", n_train - n_train // 3, d, 3) + (1 << 20)
    results = []
    for name, budget in (("ample", "8G"), ("tight", tight)):
        if name == "tight" and kind == "logreg":
            assert plan_search(rows, kind, folds=3, max_memory=budget).mode == "stream"
        res = search(h5, kind, trials=5, cache=tmp_path / name, seed=0, sampler="random", max_memory=budget)
        results.append(_best(res.study, res.storage))
    (n_a, p_a, v_a), (n_t, p_t, v_t) = results
    assert n_a == n_t and p_a == p_t and v_t == pytest.approx(v_a, abs=2e-3)


def test_stream_options_are_planned_too(tall, tmp_path):
    need_memory = memory.estimate("logreg", "memory", 17_000, 256, 4)
    need_stream = memory.estimate("logreg", "stream", 17_000, 256, 4)
    budget = (need_stream + need_memory) // 2
    with pytest.raises(NotEnoughMemory, match="logreg memory path"):
        fit_head(tall, "logreg", cache=tmp_path, max_memory=budget, stream=False)
    res = fit_head(tall, "logreg", cache=tmp_path, max_memory="8G", stream=True)
    assert _meta(res.path)["fit"]["path"] == "stream"
    r = CliRunner().invoke(main, ["fit", "svm", str(tall), "--kernel", "rbf", "--stream", "--cache", str(tmp_path)])
    assert r.exit_code != 0 and r.stderr.strip().splitlines()[-1].startswith("featx: error: the svm-rbf head has no")


@pytest.mark.parametrize("kind, params", [("svm", {"C": 0.1}), ("logreg", {"C": 1.0}),
                                          ("mlp", {"hidden": 32, "epochs": 30, "batch_size": 32, "lr": 3e-3})])
def test_a_streamed_fold_scores_as_the_fold_in_memory(kind, params, tmp_path):
    X, y = _blobs(n=400, d=24, k=3)
    obj = Objective(open_rows(write_h5(tmp_path / "f.h5", X, y)), kind, cv=3, seed=0, device="cpu")
    streamed = obj._streamed("standard", 1, params)
    Xtr, ytr, Xva, yva = obj.fold("standard", 1)
    kw = {"X_val": Xva, "y_val": yva} if kind == "mlp" else {}
    in_memory = float(np.mean(obj._fit(params, Xtr, ytr, **kw).predict(Xva) == yva))
    assert streamed > 0.6 and abs(streamed - in_memory) <= 0.1


def test_search_refuses_a_tiny_budget_in_one_line_before_any_trial(tall, tmp_path):
    r = CliRunner().invoke(main, ["search", "logreg", str(tall), "--trials", "2", "--max-memory", "1M",
                                  "--cache", str(tmp_path)])
    assert r.exit_code != 0 and "Traceback" not in r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("featx: error: needs ") and "logreg stream path" in last
    assert not (tmp_path / "studies").exists()
