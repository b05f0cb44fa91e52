"""The SVM's default C="auto": a grid walked upwards on held-out rows, the same in memory and streamed, budgeted."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.datasets import load_digits
from test_fit import _blobs, write_h5

from featx import memory
from featx.cli import main
from featx.errors import UsageError
from featx.fit import fit_head, open_rows, plan_head
from featx.heads import SVMHead, load_head, save_head
from featx.heads._choose_c import GRID, PATIENCE, held_out_mask, walk
from featx.memory import C_HELD_OUT


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = ((X - X.mean(0)) / (X.std(0) + 1e-9)).astype(np.float32)
    return X[:1400], y[:1400], X[1400:], y[1400:]


def _scores(by_step):
    """A score function giving ``by_step[i]`` at the i-th grid value, recording the Cs it was asked for."""
    asked = []

    def score(C):
        asked.append(C)
        return by_step[len(asked) - 1], f"fit at {C:g}"

    return score, asked


def test_the_walk_stops_after_two_worse_values_and_keeps_the_best():
    score, asked = _scores([0.5, 0.7, 0.9, 0.8, 0.85, 0.99, 1.0])
    C, path, kept = walk(2.0, score)
    assert len(asked) == 5 and PATIENCE == 2  # 0.8 and 0.85 both below 0.9: the later, better values never run
    assert C == pytest.approx(2.0 * GRID[2]) and kept == f"fit at {2.0 * GRID[2]:g}"
    assert [c for c, _ in path] == pytest.approx([2.0 * g for g in GRID[:5]])
    assert asked == sorted(asked)  # upwards from the most regularized end


def test_equal_scores_keep_the_smaller_c_and_do_not_stop_the_walk():
    score, asked = _scores([0.5, 0.9, 0.9, 0.9, 0.95, 0.1, 0.1])
    C, _, _ = walk(1.0, score)
    assert C == pytest.approx(GRID[4]) and len(asked) == 7
    score, asked = _scores([0.9] * len(GRID))
    C, _, _ = walk(1.0, score)
    assert C == pytest.approx(GRID[0]) and len(asked) == len(GRID)


def test_held_out_rows_are_seeded_and_need_ten_rows_per_class():
    a, b = held_out_mask(1000, 10, 3), held_out_mask(1000, 10, 3)
    assert a is not None and b is not None and (a == b).all()
    assert not (a == held_out_mask(1000, 10, 4)).all()
    assert abs(a.mean() - C_HELD_OUT) < 0.05
    assert held_out_mask(99, 10, 0) is None and held_out_mask(100, 10, 0) is not None


def test_auto_chooses_the_best_held_out_c_and_refits_on_every_row(digits, tmp_path):
    X, y, Xt, yt = digits
    head = SVMHead(random_state=0).fit(X, y)
    Cs = [c for c, _ in head.C_path_]
    accs = [a for _, a in head.C_path_]
    assert head.C_ == Cs[int(np.argmax(accs))]
    anchor = 1.0 / (float((X.astype(np.float64) ** 2).sum(1).mean()) + 1.0)
    assert Cs[0] == pytest.approx(anchor * GRID[0])
    fixed = SVMHead(C=head.C_, tol=head.tol).fit(X, y)  # the final fit is the fit at that C on all the rows
    np.testing.assert_allclose(head.coef_, fixed.coef_, rtol=1e-3, atol=1e-5)
    assert (head.predict(Xt) == yt).mean() > 0.85
    save_head(head, tmp_path / "head")
    loaded = load_head(tmp_path / "head")
    assert (loaded.C, loaded.C_, loaded.C_path_) == ("auto", head.C_, [list(p) for p in head.C_path_])
    assert (loaded.predict(Xt) == head.predict(Xt)).all()
    assert SVMHead(C=0.5).fit(X, y).C_path_ == [] and SVMHead(C=0.5).fit(X, y).C_ == 0.5


def test_auto_streamed_chooses_as_in_memory(digits):
    X, y, Xt, _ = digits

    def batches():
        for s in range(0, len(X), 300):
            yield X[s : s + 300], y[s : s + 300]

    memory_head = SVMHead(random_state=1).fit(X, y)
    streamed = SVMHead(random_state=1).fit_stream(batches, classes=np.arange(10), n_features=X.shape[1])
    assert streamed.C_ == pytest.approx(memory_head.C_)
    assert len(streamed.C_path_) == len(memory_head.C_path_)
    assert (streamed.predict(Xt) == memory_head.predict(Xt)).mean() > 0.97


def test_few_rows_per_class_use_the_anchor(digits):
    X, y, _, _ = digits
    few = np.concatenate([np.flatnonzero(y == c)[:5] for c in range(10)])
    head = SVMHead().fit(X[few], y[few])
    assert head.C_path_ == []
    assert head.C_ == pytest.approx(1.0 / (float((X[few].astype(np.float64) ** 2).sum(1).mean()) + 1.0))
    rbf = SVMHead(kernel="rbf").fit(X[few], y[few])
    assert rbf.C_ == 1.0 and rbf.C_path_ == []


def test_rbf_auto_walks_from_one(digits):
    X, y, Xt, yt = digits
    head = SVMHead(kernel="rbf", random_state=0).fit(X[:600], y[:600])
    assert head.C_path_[0][0] == pytest.approx(GRID[0]) and head.C_ in [c for c, _ in head.C_path_]
    assert (head.predict(Xt) == yt).mean() > 0.85


def test_the_memory_plan_counts_the_rows_fitted_while_choosing(tmp_path):
    n, d, k = 5000, 600, 4
    fixed = memory.estimate("svm", "feature", n, d, k)
    auto = memory.estimate("svm", "feature", n, d, k, choose_c=True)
    assert auto - fixed == (n - int(C_HELD_OUT * n)) * d * 4
    assert memory.estimate("svm", "stream", n, d, k, choose_c=True) == memory.estimate("svm", "stream", n, d, k)
    X, y = _blobs(n=n, d=d, k=k)
    rows = open_rows(write_h5(tmp_path / "f.h5", X, y), None, split=None, seed=0)
    n_train = int(rows.mask("train").sum())
    # a budget between the two estimates: a fixed C fits in memory, "auto" (the default) must stream
    budget = (memory.estimate("svm", "feature", n_train, d, k)
              + memory.estimate("svm", "feature", n_train, d, k, choose_c=True)) // 2
    assert plan_head(rows, "svm", {"C": 0.1}, max_memory=budget).path == "feature"
    assert plan_head(rows, "svm", {}, max_memory=budget).path == "stream"
    assert plan_head(rows, "svm", {"C": "auto"}, max_memory=budget).path == "stream"


def test_fit_svm_records_the_chosen_c_and_refuses_a_bad_c_in_one_line(tmp_path):
    X, y = _blobs(n=600, d=32, k=3)
    h5 = write_h5(tmp_path / "f.h5", X, y)
    r = CliRunner().invoke(main, ["fit", "svm", str(h5), "--cache", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    metrics = json.loads((Path(r.stdout.strip().splitlines()[-1]) / "metrics.json").read_text())
    chosen = metrics["chosen_C"]
    assert chosen["C"] in [c for c, _ in chosen["held_out_accuracy"]] and metrics["params"]["C"] == "auto"
    res = fit_head(h5, "svm", params={"C": chosen["C"]}, cache=tmp_path / "c")
    assert "chosen_C" not in res.metrics
    with pytest.raises(UsageError, match="C must be 'auto' or a positive number, got 'Auto!'"):
        SVMHead(C="Auto!").fit(X, y)
    for bad in ("zero", "0", "-1"):
        r = CliRunner().invoke(main, ["fit", "svm", str(h5), "--C", bad, "--cache", str(tmp_path / "c")])
        assert r.exit_code == 2 and "auto or a positive number" in r.output
