"""Tests for featx.heads: sklearn contract, agreement with sklearn's solvers, streaming, persistence, export."""
from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import check_estimator

try:
    from benchmarks.synth import make_pool5_like
except ImportError:  # benchmarks/ is a plain folder; make it importable when pytest did not put the root on the path
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.synth import make_pool5_like
from featx.errors import DataError, IntegrityError, UsageError
from featx.heads import LinearProblem, LogisticHead, MLPHead, SVMHead, _backend, _gram, _newton, load_head, save_head
from featx.heads import problem as solvers
from featx.heads.problem import labels_to_pm1, svm_primal_objective


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny networks gain nothing from intra-op threads, and on a busy 2-core box thread hand-offs dominate."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _scaled(n: int, d: int, k: int, seed: int, **kw) -> tuple[np.ndarray, np.ndarray]:
    X, y = make_pool5_like(n=n, d=d, k=k, seed=seed, **kw)
    return StandardScaler().fit_transform(X).astype(np.float32), y


@pytest.fixture(scope="module")
def wide() -> tuple[np.ndarray, np.ndarray]:
    """n < d: the Gram-space solver's shape (like 4,000 x 9,216 pool5 rows, scaled down)."""
    return _scaled(240, 396, 4, seed=1)


@pytest.fixture(scope="module")
def tall() -> tuple[np.ndarray, np.ndarray]:
    """n > d: the feature-space solver's shape."""
    return _scaled(700, 72, 3, seed=2, class_sep=0.9)


def _objective(est, X, y, C):
    classes = np.unique(y)
    Y = labels_to_pm1(np.searchsorted(classes, y), len(classes))
    return float(svm_primal_objective(est.coef_, est.intercept_, X, Y, C).sum())


# -- the scikit-learn contract -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "est",
    [SVMHead(), LogisticHead(), MLPHead(hidden=32, epochs=30, random_state=0)],
    ids=["svm", "logreg", "mlp"],
)
# The heads derive from featx.heads._compat.ClassifierBase, not sklearn.base.BaseEstimator (importing scikit-learn
# costs every CLI process 1-2 s); check_estimator warns about that and then runs all its checks all the same.
@pytest.mark.filterwarnings("ignore:Estimator .* does not inherit from:UserWarning")
def test_check_estimator(est):
    check_estimator(est)


def test_scikit_learn_machinery_without_its_base_classes(wide):
    """The heads implement scikit-learn's protocol themselves (featx.heads._compat, so that the CLI never imports
    scikit-learn); scikit-learn's own clone, is_classifier, Pipeline, cross-validation and grid search must treat
    them as they treat its estimators."""
    from sklearn.base import clone, is_classifier
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.pipeline import make_pipeline

    X, y = wide
    head = SVMHead(C=0.05, tol=1e-5)
    assert is_classifier(head) and is_classifier(LogisticHead()) and is_classifier(MLPHead())
    twin = clone(head)
    assert twin is not head and twin.get_params() == head.get_params()
    assert repr(head) == "SVMHead(C=0.05, tol=1e-05)" and repr(SVMHead()) == "SVMHead()"
    assert head.set_params(C=0.1) is head and head.C == 0.1
    with pytest.raises(ValueError, match="Invalid parameter 'c' for estimator"):
        head.set_params(c=1)
    pipe = make_pipeline(StandardScaler(), SVMHead(C=0.1))
    pipe.set_params(svmhead__C=0.01)
    assert pipe.get_params()["svmhead__C"] == 0.01
    assert pipe.fit(X, y).score(X, y) == pytest.approx(np.mean(pipe.predict(X) == y))
    scores = cross_val_score(SVMHead(C=0.01, tol=1e-6), X, y, cv=3)
    ref = cross_val_score(LinearSVC(C=0.01, tol=1e-8, max_iter=100_000), X, y, cv=3)
    assert scores.shape == (3,) and np.abs(scores - ref).max() <= 0.03  # the same problem, solved to tolerance
    grid = GridSearchCV(LogisticHead(max_iter=200), {"C": [0.01, 1.0]}, cv=2).fit(X, y)
    assert grid.best_params_["C"] in (0.01, 1.0) and isinstance(grid.best_estimator_, LogisticHead)
    # pickling round trip, as joblib does for parallel searches
    import pickle

    fitted = SVMHead(C=0.1).fit(X, y)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(fitted)).predict(X), fitted.predict(X))


def test_importing_the_heads_does_not_import_scikit_learn():
    import subprocess
    import sys

    code = ("import sys, numpy as np; from featx.heads import SVMHead, LogisticHead, MLPHead, load_head, save_head; "
            "X = np.random.default_rng(0).standard_normal((60, 5)).astype(np.float32); y = np.arange(60) % 3; "
            "h = SVMHead(C=0.1).fit(X, y); h.predict(X); LogisticHead().fit(X, y).predict(X); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'torch')))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"


def test_parameters_are_validated_in_fit(wide):
    X, y = wide
    with pytest.raises(UsageError, match="C must be"):
        SVMHead(C=-1).fit(X, y)
    with pytest.raises(UsageError, match="kernel"):
        SVMHead(kernel="poly").fit(X, y)
    with pytest.raises(UsageError, match="optimizer"):
        MLPHead(optimizer="rmsprop").fit(X, y)
    with pytest.raises(DataError, match="2 classes"):
        LogisticHead().fit(X, np.zeros(len(X)))


# -- SVMHead against LinearSVC ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["wide", "tall"])
@pytest.mark.parametrize("binary", [False, True], ids=["multiclass", "binary"])
@pytest.mark.parametrize("C", [0.01, 1.0])
def test_svm_matches_linearsvc(request, shape, binary, C):
    X, y = request.getfixturevalue(shape)
    if binary:
        y = (y == 0).astype(np.int64)
    ours = SVMHead(C=C, tol=1e-6).fit(X, y)
    ref = LinearSVC(C=C, tol=1e-8, max_iter=100_000).fit(X, y)
    assert ours.coef_.shape == ref.coef_.shape
    assert ours.intercept_.shape == ref.intercept_.shape
    assert ours.solve_info_.space == ("gram" if shape == "wide" else "feature")
    p_ours, p_ref = _objective(ours, X, y, C), _objective(ref, X, y, C)
    assert p_ours == pytest.approx(p_ref, rel=1e-3)
    # Ours is certified to 1e-6 by its duality gap, so it must not be meaningfully worse than LIBLINEAR's.
    assert p_ours <= p_ref * (1 + 1e-5)
    assert np.mean(ours.predict(X) == ref.predict(X)) >= 0.98
    if binary:
        assert ours.decision_function(X).shape == (len(X),)


def test_feature_solver_switches_to_factorizations(monkeypatch, tall):
    """When CG stalls (forced here by allowing it one iteration) the feature-space solver must switch to
    per-class Hessian factorizations and still reach LinearSVC's optimum."""
    X, y = tall
    monkeypatch.setattr(_newton, "CG_MAX", 1)
    monkeypatch.setattr(_newton, "WOODBURY_SQRT_FACTOR", 0.0)  # every class through CG
    head = SVMHead(C=1.0, tol=1e-7).fit(X, y)
    assert head.solve_info_.space == "feature"
    assert head.solve_info_.detail["n_direct_factorizations"] > 0
    ref = LinearSVC(C=1.0, tol=1e-8, max_iter=100_000).fit(X, y)
    assert _objective(head, X, y, 1.0) == pytest.approx(_objective(ref, X, y, 1.0), rel=1e-5)


def test_feature_solver_through_few_active_rows_matches_liblinear():
    """Classes whose active rows are few solve their Newton systems through those rows (Woodbury), the others by
    CG preconditioned for their share of active rows; together they reach LinearSVC's optimum."""
    X, y = _scaled(600, 60, 8, seed=5, class_sep=2.0)
    head = SVMHead(C=1.0, tol=1e-8).fit(X, y)
    assert head.solve_info_.space == "feature" and head.solve_info_.converged
    assert head.solve_info_.detail["n_woodbury_solves"] > 0 and head.solve_info_.detail["cg_iterations"] > 0
    ref = LinearSVC(C=1.0, tol=1e-8, max_iter=100_000).fit(X, y)
    assert _objective(head, X, y, 1.0) == pytest.approx(_objective(ref, X, y, 1.0), rel=1e-5)
    assert _objective(head, X, y, 1.0) <= _objective(ref, X, y, 1.0) * (1 + 1e-6)


def test_gram_solver_direct_branch_and_spaces_agree():
    """Well-separated n > d data solved in the Gram space: most rows leave the active set, which exercises the
    'few active rows' factorization branch; the feature-space solver must find the same optimum."""
    X, y = _scaled(700, 72, 3, seed=2, class_sep=4.0)
    Y = labels_to_pm1(y, 3)
    wg, bg, ig = LinearProblem(X, space="gram").solve_svm(Y, 1.0, tol=1e-7)
    wf, bf, i_f = LinearProblem(X, space="feature").solve_svm(Y, 1.0, tol=1e-7)
    assert ig.detail["n_direct_factorizations"] > 0
    og = svm_primal_objective(wg, bg, X, Y, 1.0).sum()
    of = svm_primal_objective(wf, bf, X, Y, 1.0).sum()
    assert og == pytest.approx(of, rel=1e-5)
    np.testing.assert_allclose(wg, wf, atol=1e-3 * np.abs(wf).max())


@pytest.mark.parametrize("duplicated", [False, True], ids=["plain", "duplicate-rows"])
def test_gram_mixed_precision_matches_float64(monkeypatch, wide, duplicated):
    """The float32 inverse with refinement (used from 1,500 rows on) must reach the float64 optimum; with
    duplicated rows K is singular, float32 cannot resolve K + I/2C at a large C, and the solver must notice
    and switch to float64."""
    X, y = wide
    C = 100.0 if duplicated else 1.0
    if duplicated:
        X, y = np.vstack([X, X]), np.concatenate([y, y])
    Y = labels_to_pm1(y, 4)
    w64, b64, i64 = LinearProblem(X, space="gram").solve_svm(Y, C, tol=1e-8)
    monkeypatch.setattr(_gram, "MIXED_PRECISION_FROM", 1)
    w32, b32, i32 = LinearProblem(X, space="gram").solve_svm(Y, C, tol=1e-8)
    assert i64.detail["inverse"] == "float64"
    if not duplicated:
        assert i32.detail["inverse"] == "float32"
    # (With duplicates the solver may keep float32 or detect trouble and switch; either way it must converge.)
    assert i32.converged and i64.converged
    o64 = svm_primal_objective(w64, b64, X, Y, C).sum()
    o32 = svm_primal_objective(w32, b32, X, Y, C).sum()
    assert o32 == pytest.approx(o64, rel=1e-6)


@pytest.mark.parametrize("n", [600, 1037])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_gram_tiles_match_one_product(n, workers):
    """The CPU Gram matrix is computed as tiles on several threads (featx.heads._blas.gram_plus_one): it must
    equal the one product, be exactly symmetric, and leave the BLAS thread count as it found it."""
    from featx.heads._blas import blas_threads, gram_plus_one

    X = np.random.default_rng(n).standard_normal((n, 300)).astype(np.float32)
    before = blas_threads()
    K = gram_plus_one(X, workers)
    assert blas_threads() == before
    assert K.dtype == np.float64 and np.array_equal(K, K.T)
    ref = X.astype(np.float64) @ X.T.astype(np.float64) + 1
    assert np.abs(K - ref).max() <= 1e-5 * np.abs(ref).max()


def test_blas_limits_from_several_threads_restore_the_thread_count():
    """Fits on several threads at once (e.g. a threaded grid search) limit BLAS in overlapping, not nested, spans;
    the count found before the first must come back after the last."""
    import threading

    from featx.heads._blas import blas_limit, blas_threads

    before = blas_threads()
    entered, leave = threading.Event(), threading.Event()

    def other() -> None:
        with blas_limit(1):
            entered.set()
            leave.wait()

    t = threading.Thread(target=other)
    t.start()
    entered.wait()
    span = blas_limit(1)
    span.__enter__()
    leave.set()
    t.join()  # the other span ends first
    assert blas_threads() == 1
    span.__exit__(None, None, None)
    assert blas_threads() == before


def test_gram_float32_products_reach_the_float64_optimum(monkeypatch):
    """Big problems take the float32 path: tiled Gram matrix, float32 inverse, one BLAS thread fewer; the optimum
    must be the float64 path's, and the BLAS thread count must be restored afterwards."""
    X, y = _scaled(600, 700, 5, seed=3)
    Y = labels_to_pm1(y, 5)
    w64, b64, i64 = LinearProblem(X, space="gram").solve_svm(Y, 0.1, tol=1e-8)
    before = solvers.blas_threads()
    monkeypatch.setattr(solvers, "FLOAT64_BELOW", 0)
    monkeypatch.setattr(_gram, "MIXED_PRECISION_FROM", 1)
    p = LinearProblem(X, space="gram")
    w32, b32, i32 = p.solve_svm(Y, 0.1, tol=1e-8)
    assert not p._K_exact and i32.detail["inverse"] == "float32" and i32.converged
    assert solvers.blas_threads() == before
    o64 = svm_primal_objective(w64, b64, X, Y, 0.1).sum()
    o32 = svm_primal_objective(w32, b32, X, Y, 0.1).sum()
    assert o32 == pytest.approx(o64, rel=1e-6)


def test_linear_problem_is_reused_and_checked(wide):
    X, y = wide
    p = LinearProblem(X)
    fitted = {C: SVMHead(C=C, tol=1e-7).fit(X, y, problem=p) for C in (1e-3, 1e-2, 1e-1)}
    for C, head in fitted.items():
        fresh = SVMHead(C=C, tol=1e-7).fit(X, y)
        # Both are certified to a relative gap of 1e-7; strong convexity (modulus 1) then bounds ||w - w*||.
        assert _objective(head, X, y, C) == pytest.approx(_objective(fresh, X, y, C), rel=1e-6)
        np.testing.assert_allclose(head.coef_, fresh.coef_, rtol=0, atol=2e-3 * np.abs(fresh.coef_).max())
    assert p._K is not None  # computed once and kept
    with pytest.raises(UsageError, match="different rows"):
        SVMHead().fit(X[::-1].copy(), y, problem=p)


def test_rbf_svm_is_sklearn_svc(wide):
    X, y = wide
    head = SVMHead(C=3.0, kernel="rbf").fit(X, y)
    from sklearn.svm import SVC

    ref = SVC(C=3.0, kernel="rbf", gamma="scale").fit(X, y)
    np.testing.assert_array_equal(head.predict(X), ref.predict(X))


# -- LogisticHead against LogisticRegression ----------------------------------------------------------------


@pytest.mark.parametrize("binary", [False, True], ids=["multiclass", "binary"])
@pytest.mark.parametrize("shape", ["wide", "tall"])
def test_logistic_matches_sklearn(request, shape, binary):
    X, y = request.getfixturevalue(shape)
    if binary:
        y = (y == 1).astype(np.int64)
    C = 0.5
    ours = LogisticHead(C=C, tol=1e-8).fit(X, y)
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(X, y)
    assert ours.coef_.shape == ref.coef_.shape
    # The objective is flat along some directions, so probabilities can differ a little between two solvers
    # stopping at slightly different points; the objective values must agree tightly, ours no worse.
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=5e-3)
    assert np.mean(ours.predict(X) == ref.predict(X)) >= 0.99

    def objective(est):
        p = np.clip(est.predict_proba(X)[np.arange(len(y)), np.searchsorted(est.classes_, y)], 1e-300, None)
        return 0.5 * (est.coef_**2).sum() + C * -np.log(p).sum()

    assert objective(ours) == pytest.approx(objective(ref), rel=1e-5)
    assert objective(ours) <= objective(ref) * (1 + 1e-7)


# -- MLPHead ------------------------------------------------------------------------------------------------


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated Gaussian blobs in 20 dimensions: linearly separable with high probability."""
    from sklearn.datasets import make_blobs

    X, y = make_blobs(n_samples=n, n_features=20, centers=3, cluster_std=2.0, random_state=seed)
    return StandardScaler().fit_transform(X).astype(np.float32), y


def test_mlp_learns_a_separable_problem():
    X, y = _blobs(400, seed=3)
    head = MLPHead(hidden=64, epochs=40, random_state=0).fit(X[:300], y[:300])
    assert head.score(X[300:], y[300:]) >= 0.95
    assert head.history_ and set(head.history_[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy", "seconds"}
    again = MLPHead(hidden=64, epochs=40, random_state=0).fit(X[:300], y[:300])
    np.testing.assert_array_equal(head.predict_proba(X), again.predict_proba(X))


def test_mlp_early_stopping_restores_the_best_epoch():
    rng = np.random.default_rng(0)
    # Random labels: the network can only memorize, so the validation loss rises after the first epochs.
    X = rng.standard_normal((300, 40)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    Xv = rng.standard_normal((100, 40)).astype(np.float32)
    yv = rng.integers(0, 3, 100)
    head = MLPHead(hidden=128, lr=1e-2, dropout=0.0, epochs=60, patience=3, random_state=0)
    head.fit(X, y, X_val=Xv, y_val=yv)
    losses = [h["val_loss"] for h in head.history_]
    assert len(losses) < 60, "early stopping should have ended training"
    assert head.best_epoch_ == int(np.argmin(losses)) + 1
    assert len(losses) == head.best_epoch_ + 3
    # The kept weights are the best epoch's: their validation loss is the recorded minimum, not the last one.
    p = head.predict_proba(Xv)[np.arange(len(yv)), yv]
    assert float(-np.log(p).mean()) == pytest.approx(min(losses), rel=1e-4)
    assert min(losses) < losses[-1]


def test_mlp_callback_can_stop_training():
    class Pruned(Exception):
        pass

    seen: list[tuple[int, float]] = []

    def callback(epoch: int, val_accuracy: float) -> None:
        seen.append((epoch, val_accuracy))
        if epoch == 3:
            raise Pruned

    X, y = _scaled(200, 36, 2, seed=4)
    with pytest.raises(Pruned):
        MLPHead(hidden=16, epochs=20, random_state=0, epoch_callback=callback).fit(X, y)
    assert [e for e, _ in seen] == [1, 2, 3]
    assert all(0.0 <= a <= 1.0 for _, a in seen)


# -- streaming ------------------------------------------------------------------------------------------------


class _Chunks:
    """A re-iterable source of chunks that counts how many chunk arrays are alive at once."""

    def __init__(self, X: np.ndarray, y: np.ndarray, size: int) -> None:
        self.X, self.y, self.size = X, y, size
        self.alive = 0
        self.max_alive = 0

    def _gone(self) -> None:
        self.alive -= 1

    def __call__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in range(0, len(self.X), self.size):
            chunk = self.X[s : s + self.size].copy()  # a fresh array, as if read from a shard
            self.alive += 1
            self.max_alive = max(self.max_alive, self.alive)
            weakref.finalize(chunk, self._gone)
            yield chunk, self.y[s : s + self.size]
            del chunk


@pytest.mark.parametrize("shape", ["wide", "tall"])
def test_svm_fit_stream_reaches_fit(request, shape):
    X, y = request.getfixturevalue(shape)
    C = 0.1
    src = _Chunks(X, y, 64)
    streamed = SVMHead(C=C, tol=1e-7, max_iter=5000).fit_stream(src, classes=np.unique(y), n_features=X.shape[1])
    full = SVMHead(C=C, tol=1e-7).fit(X, y)
    assert _objective(streamed, X, y, C) == pytest.approx(_objective(full, X, y, C), rel=1e-3)
    assert np.mean(streamed.predict(X) == full.predict(X)) >= 0.98
    gc.collect()
    assert src.max_alive <= 2, "fit_stream must not hold on to chunks"


def test_logistic_and_mlp_fit_stream():
    X, y = _blobs(400, seed=5)
    src = _Chunks(X, y, 50)
    streamed = LogisticHead(C=0.5, tol=1e-8).fit_stream(src, classes=[0, 1, 2], n_features=20)
    full = LogisticHead(C=0.5, tol=1e-8).fit(X, y)
    np.testing.assert_allclose(streamed.predict_proba(X), full.predict_proba(X), atol=1e-3)
    assert src.max_alive <= 2

    src = _Chunks(X[:300], y[:300], 50)
    mlp = MLPHead(hidden=32, epochs=30, random_state=0).fit_stream(
        src, classes=[0, 1, 2], n_features=20, val=(X[300:], y[300:])
    )
    assert mlp.score(X[300:], y[300:]) >= 0.95
    assert 1 <= mlp.best_epoch_ <= len(mlp.history_)


def test_fit_stream_rejects_bad_chunks():
    X, y = _scaled(100, 36, 2, seed=6)
    with pytest.raises(DataError, match="not in classes"):
        SVMHead().fit_stream(lambda: iter([(X, y + 5)]), classes=[0, 1], n_features=36)
    with pytest.raises(DataError, match="shape"):
        LogisticHead().fit_stream(lambda: iter([(X[:, :10], y)]), classes=[0, 1], n_features=36)


# -- persistence -----------------------------------------------------------------------------------------------


def _fitted_heads(X, y):
    return [
        SVMHead(C=0.1).fit(X, y),
        SVMHead(C=0.1).fit(X, (y == 0).astype(int)),
        LogisticHead(C=0.1).fit(X, np.array(["cat", "dog", "eel", "fox"])[y]),
        MLPHead(hidden=16, epochs=5, random_state=0).fit(X, y),
        SVMHead(C=1.0, kernel="rbf").fit(X, y),
    ]


def test_save_load_round_trip_and_tamper(wide, tmp_path: Path):
    X, y = wide
    for i, est in enumerate(_fitted_heads(X, y)):
        d = tmp_path / f"h{i}"
        save_head(est, d)
        meta = json.loads((d / "head.json").read_text())
        assert meta["class"] == type(est).__name__
        assert sorted(p.name for p in d.iterdir()) == sorted(["head.json", meta["file"]]), "temp files left over"
        if meta["file"] == "head.npz":
            with np.load(d / "head.npz", allow_pickle=False) as npz:
                assert sorted(npz.files) == meta["arrays"]
        loaded: Any = load_head(d)
        assert type(loaded) is type(est)
        np.testing.assert_array_equal(loaded.predict(X), est.predict(X))
        np.testing.assert_array_equal(loaded.classes_, est.classes_)
        if hasattr(est, "predict_proba") and not isinstance(est, SVMHead):
            np.testing.assert_array_equal(loaded.predict_proba(X), est.predict_proba(X))

        data = d / meta["file"]
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        with pytest.raises(IntegrityError, match="sha256") as exc:
            load_head(d)
        assert "\n" not in str(exc.value)
        data.unlink()
        with pytest.raises(IntegrityError, match="missing"):
            load_head(d)
    (tmp_path / "h0" / "head.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="not JSON"):
        load_head(tmp_path / "h0")
    with pytest.raises(IntegrityError, match="no head.json"):
        load_head(tmp_path / "nowhere")


# -- torch export ------------------------------------------------------------------------------------------------


def test_to_torch_argmax_matches_predict(wide):
    X, y = wide
    Xt = torch.from_numpy(X)
    for est in _fitted_heads(X, y)[:4]:
        module = est.to_torch()
        with torch.no_grad():
            logits = module(Xt)
        assert logits.shape == (len(X), len(est.classes_))
        np.testing.assert_array_equal(est.classes_[logits.argmax(1).numpy()], est.predict(X))
        if isinstance(est, (LogisticHead, MLPHead)):
            np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), est.predict_proba(X), atol=1e-4)
    rbf = _fitted_heads(X, y)[4]
    with pytest.raises(UsageError, match="an RBF SVM head cannot be turned into torch layers"):
        rbf.to_torch()


@pytest.mark.parametrize("space", ["gram", "feature"])
def test_torch_backend_matches_numpy(monkeypatch, wide, tall, space):
    """On an accelerator the solver runs the same code on torch tensors; run that back-end on the CPU and check
    it reaches the numpy back-end's optimum (float32 inverse with refinement included, for the Gram space)."""
    X, y = wide if space == "gram" else tall
    k = len(np.unique(y))
    Y = labels_to_pm1(y, k)
    monkeypatch.setattr(_gram, "MIXED_PRECISION_FROM", 1)
    on_numpy = LinearProblem(X, space=space)
    on_torch = LinearProblem(X, space=space)
    on_torch.xp = _backend.TorchOps(torch.device("cpu"))
    assert on_numpy.device == "cpu" and isinstance(on_numpy.K if space == "gram" else on_numpy.M, np.ndarray)
    for C in (0.01, 1.0):
        wn, bn, i_n = on_numpy.solve_svm(Y, C, tol=1e-8)
        wt, bt, i_t = on_torch.solve_svm(Y, C, tol=1e-8)
        assert i_n.converged and i_t.converged
        on, ot = svm_primal_objective(wn, bn, X, Y, C).sum(), svm_primal_objective(wt, bt, X, Y, C).sum()
        assert ot == pytest.approx(on, rel=1e-6)
        np.testing.assert_allclose(wt, wn, atol=1e-3 * np.abs(wn).max())


@pytest.mark.parametrize("space", ["gram", "feature"])
def test_a_newton_solve_stops_at_fit_iteration(monkeypatch, wide, tall, space):
    """Each Newton step is the stop point ``fit.iteration``: a SIGTERM sent at the second one (by the FEATX_STOP_AT
    hook) ends the solve with Interrupted (exit 143) there."""
    from featx import interrupt

    X, y = wide if space == "gram" else tall
    monkeypatch.setenv(interrupt.ENV_STOP_AT, "fit.iteration:2:SIGTERM")
    with interrupt.handling(), pytest.raises(interrupt.Interrupted) as stopped:
        SVMHead(C=1.0, tol=1e-12).fit(X, y, problem=LinearProblem(X, space=space))
    assert stopped.value.point == "fit.iteration" and stopped.value.exit_code == 143


@pytest.mark.parametrize("solver", ["lbfgs", "stream", "mlp"])
def test_other_solvers_notice_a_stop_request(tall, solver):
    """L-BFGS (logreg, streamed SVM) and the MLP's batches notice a pending SIGTERM without a named stop point."""
    import os
    import signal

    from featx import interrupt

    X, y = tall
    with interrupt.handling(), pytest.raises(interrupt.Interrupted) as stopped:
        os.kill(os.getpid(), signal.SIGTERM)  # requested: the next check raises
        if solver == "lbfgs":
            LogisticHead(C=1.0, tol=1e-12).fit(X, y)
        elif solver == "stream":
            SVMHead(C=1.0, tol=1e-12).fit_stream(lambda: iter([(X[:300], y[:300]), (X[300:], y[300:])]),
                                                 classes=np.unique(y), n_features=X.shape[1])
        else:
            MLPHead(hidden=8, epochs=2, random_state=0).fit(X, y)
    assert stopped.value.exit_code == 143


def test_rbf_round_trip_is_arrays_and_array_equal(tmp_path: Path):
    """The RBF SVM saves as arrays (no pickle) and predicts, before and after loading, exactly as scikit-learn's
    SVC; a head directory holding a pickle of an older format is refused with one line."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    for labels in (y, (y == 3).astype(int)):
        head = SVMHead(C=2.0, kernel="rbf").fit(X[::2], labels[::2])
        ref = SVC(C=2.0, kernel="rbf", gamma="scale").fit(X[::2], labels[::2])
        np.testing.assert_array_equal(head.predict(X), ref.predict(X))
        np.testing.assert_allclose(head.decision_function(X), ref.decision_function(X), rtol=1e-9, atol=1e-9)
        save_head(head, tmp_path / "rbf")
        assert json.loads((tmp_path / "rbf" / "head.json").read_text())["file"] == "head.npz"
        loaded: Any = load_head(tmp_path / "rbf")
        np.testing.assert_array_equal(loaded.predict(X), head.predict(X))
        np.testing.assert_array_equal(loaded.decision_function(X), head.decision_function(X))
    (tmp_path / "rbf" / "head.joblib").write_bytes(b"\x80\x04N.")
    with pytest.raises(IntegrityError, match="head.joblib, which featx does not load") as exc:
        load_head(tmp_path / "rbf")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("space", ["gram", "feature"])
def test_an_explicit_space_over_the_memory_budget_is_refused(wide, tall, space):
    """An explicit space is refused with NotEnoughMemory when featx.memory's estimate of its arrays exceeds
    max_memory; within the budget (or with space="auto") it solves as usual."""
    from featx import memory

    X, y = wide if space == "gram" else tall
    need = memory.estimate("svm", space, X.shape[0], X.shape[1], len(np.unique(y)))
    with pytest.raises(memory.NotEnoughMemory, match=f"the {space} space .* needs"):
        LinearProblem(X, space=space, max_memory=need // 4)
    with pytest.raises(memory.NotEnoughMemory):
        SVMHead(space=space, max_memory=need // 4).fit(X, y)
    head = SVMHead(space=space, max_memory=2 * need).fit(X, y)
    assert head.solve_info_.space == space
    assert SVMHead(max_memory=1).fit(X, y).solve_info_.space == space  # "auto": the caller's plan decides


def test_big_products_are_tiled_equal_and_stop_between_tiles(monkeypatch):
    """The solvers' large BLAS products run as calls of at most CALL_FLOPS each (here made small so that 300 x 70
    rows need many), equal to one product, and a pending SIGTERM stops them between calls."""
    import os
    import signal

    from featx import interrupt
    from featx.heads import _blas

    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 70)).astype(np.float32)
    V = rng.standard_normal((70, 5)).astype(np.float32)
    R = rng.standard_normal((300, 5)).astype(np.float32)
    monkeypatch.setattr(_blas, "CALL_FLOPS", 2.0 * 64 * 70 * 5)  # 64 rows a call
    np.testing.assert_allclose(_blas.crossprod(X), X.T @ X, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(_blas.rows_matmul(X, V), X @ V, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_blas.rows_t_matmul(X, R), X.astype(np.float64).T @ R, rtol=1e-5, atol=1e-4)
    K = _blas.gram_plus_one(X, 1)
    np.testing.assert_allclose(K, X.astype(np.float64) @ X.T + 1, rtol=1e-5, atol=1e-4)
    for product in (lambda: _blas.crossprod(X), lambda: _blas.rows_matmul(X, V), lambda: _blas.rows_t_matmul(X, R),
                    lambda: _blas.gram_plus_one(X, 2)):
        with interrupt.handling(), pytest.raises(interrupt.Interrupted) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            product()
        assert stopped.value.exit_code == 143


def test_line_search_by_column_blocks_finds_each_columns_minimum_and_stops_between_blocks(monkeypatch):
    """The exact line search runs by blocks of columns (here made 3 columns wide): each column's step is the
    minimizer of its piecewise-quadratic objective (checked against a fine grid), and a pending SIGTERM stops it."""
    import os
    import signal

    from featx import interrupt
    from featx.heads import _backend
    from featx.heads._hinge import exact_line_search

    rng = np.random.default_rng(3)
    n, k, C = 200, 10, 0.7
    F, FP = rng.standard_normal((n, k)), rng.standard_normal((n, k))
    Y = np.where(rng.random((n, k)) < 0.2, 1.0, -1.0)
    a, b = rng.standard_normal(k), rng.random(k) + 0.1
    monkeypatch.setattr(_backend, "_BLOCK_VALUES", 3 * n)
    xp = _backend.NumpyOps()
    assert len(list(xp.column_blocks(F))) == 4
    t = exact_line_search(xp, a, b, F, FP, Y, C)

    def phi(c: int, s: np.ndarray) -> np.ndarray:
        xi = np.maximum(0.0, 1 - Y[:, c, None] * (F[:, c, None] + s * FP[:, c, None]))
        return a[c] * s + 0.5 * b[c] * s * s + C * (xi * xi).sum(0)

    grid = np.linspace(0.0, 5.0, 50_001)
    for c in range(k):
        assert t[c] >= 0
        assert phi(c, np.array([t[c]]))[0] <= phi(c, grid).min() + 1e-9
    with interrupt.handling(), pytest.raises(interrupt.Interrupted) as stopped:
        os.kill(os.getpid(), signal.SIGTERM)
        exact_line_search(xp, a, b, F, FP, Y, C)
    assert stopped.value.exit_code == 143
