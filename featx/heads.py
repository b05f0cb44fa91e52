"""Classifier heads fitted on extracted (and already standardized) CNN features.

Three scikit-learn classifiers, all following the estimator contract (``__init__`` stores parameters, ``fit``
validates and returns ``self``, learned attributes end in ``_``) and passing ``check_estimator``:

* :class:`SVMHead` - a linear SVM solving exactly ``sklearn.svm.LinearSVC(C=C)``'s problem (L2-regularized
  squared hinge, one-vs-rest, intercept as a regularized constant feature); on 3,400 x 9,216 pool5-like rows
  in 20 classes it fits ~25-30x faster than LinearSVC (``benchmarks/bench_svm_solver.py``) through a
  Gram-space finite Newton method (see :mod:`featx._solvers`); or, with
  ``kernel="rbf"``, a plain ``sklearn.svm.SVC``.
* :class:`LogisticHead` - ``LogisticRegression(C=C)``'s problem (softmax for 3+ classes, binomial for 2,
  intercept unpenalized) by L-BFGS with float32 matrix products.
* :class:`MLPHead` - a one-hidden-layer torch network with dropout, mini-batches and early stopping.

Every head can also be fitted on data larger than memory with ``fit_stream(batches, classes=...,
n_features=...)``, saved without pickles with :func:`save_head` / :func:`load_head`, and exported to torch
with ``to_torch()`` for fine-tuning.

Heads do no scaling of their own: the caller standardizes the features.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ._solvers import (
    Batches,
    LinearProblem,
    SolveInfo,
    labels_to_pm1,
    lbfgs_linear,
    resolve_device,
)
from .cache import atomic_write_bytes as _atomic_write
from .errors import DataError, IntegrityError, UsageError

logger = logging.getLogger(__name__)

__all__ = [
    "SVMHead",
    "LogisticHead",
    "MLPHead",
    "LinearProblem",
    "save_head",
    "load_head",
    "HEAD_CLASSES",
]

# Rows per block when scoring; bounds the float64 temporaries of predict on big inputs.
_PREDICT_BLOCK = 8192
_FLOAT_DTYPES = (np.float64, np.float32)


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and math.isfinite(float(value)) and (float(value) >= 0 if allow_zero else float(value) > 0)
    if not ok:
        raise UsageError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _encode_targets(est: BaseEstimator, y: np.ndarray) -> np.ndarray:
    """Set ``est.classes_`` and return ``y`` as class indices; refuse fewer than two classes."""
    check_classification_targets(y)
    classes, y_idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"need at least 2 classes to fit a classifier, got 1 class ({classes[0]!r})")
    est.classes_ = classes
    return y_idx.astype(np.int64)


def _float32_rows(X: np.ndarray) -> np.ndarray:
    """``X`` as a writable, C-contiguous float32 array (torch refuses read-only buffers without a copy)."""
    X32 = np.ascontiguousarray(X, dtype=np.float32)
    if not X32.flags.writeable:
        X32 = X32.copy()
    return X32


class _StreamLabels:
    """Validates streamed chunks and maps their labels to class indices."""

    def __init__(self, classes: Any, n_features: int) -> None:
        classes = np.asarray(classes)
        if classes.ndim != 1 or len(classes) < 2:
            raise UsageError(f"classes must list at least 2 labels, got {classes!r}")
        uniq = np.unique(classes)
        if len(uniq) != len(classes):
            raise UsageError("classes contains duplicate labels")
        _check_int("n_features", n_features, 1)
        self.classes = uniq
        self.n_features = int(n_features)

    def indices(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        y = np.asarray(y).ravel()
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise DataError(f"a chunk has shape {X.shape}, expected (rows, {self.n_features})")
        if len(y) != len(X):
            raise DataError(f"a chunk has {len(X)} rows but {len(y)} labels")
        if not np.isfinite(X).all():
            raise DataError("a chunk contains NaN or infinite features")
        idx = np.searchsorted(self.classes, y)
        idx = np.clip(idx, 0, len(self.classes) - 1)
        bad = self.classes[idx] != y
        if bad.any():
            raise DataError(f"a chunk has labels not in classes: {np.unique(y[bad])[:5].tolist()}")
        return idx.astype(np.int64)

    def scan(self, batches: Batches) -> tuple[int, np.ndarray]:
        """One validating pass: returns the row count and the per-class counts."""
        n = 0
        counts = np.zeros(len(self.classes), dtype=np.int64)
        for Xc, yc in batches():
            idx = self.indices(Xc, yc)
            n += len(idx)
            counts += np.bincount(idx, minlength=len(self.classes))
        if n == 0:
            raise DataError("the batches produced no rows")
        if (counts > 0).sum() < 2:
            raise DataError("the batches hold fewer than 2 distinct classes")
        return n, counts

    def indexed(self, batches: Batches) -> Batches:
        """``batches`` with labels replaced by class indices."""

        def gen() -> Iterable[tuple[np.ndarray, np.ndarray]]:
            for Xc, yc in batches():
                yield np.asarray(Xc), self.indices(Xc, yc)

        return gen


class _LinearHead(ClassifierMixin, BaseEstimator):
    """Shared scoring, export and persistence for heads with ``coef_`` / ``intercept_``."""

    def decision_function(self, X: Any) -> np.ndarray:
        """Scores ``X @ coef_.T + intercept_`` (float64); shape (n,) for two classes, else (n, n_classes)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=_FLOAT_DTYPES)
        out = np.empty((X.shape[0], self.coef_.shape[0]), dtype=np.float64)
        for s in range(0, X.shape[0], _PREDICT_BLOCK):
            out[s : s + _PREDICT_BLOCK] = np.asarray(X[s : s + _PREDICT_BLOCK], dtype=np.float64) @ self.coef_.T
        out += self.intercept_
        return out[:, 0] if out.shape[1] == 1 else out

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class labels."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            return self.classes_[(scores > 0).astype(np.int64)]
        return self.classes_[np.argmax(scores, axis=1)]

    def to_torch(self) -> torch.nn.Module:
        """A float32 ``nn.Linear(d, k)`` giving one logit per class, whose argmax equals :meth:`predict`.

        With two classes sklearn keeps a single score ``s``; the module outputs ``[-s/2, s/2]`` so that the
        argmax (and, for logistic heads, the softmax) matches.
        """
        check_is_fitted(self)
        W = np.asarray(self.coef_, dtype=np.float64)
        b = np.asarray(self.intercept_, dtype=np.float64)
        if W.shape[0] == 1:
            W = np.vstack([-W / 2, W / 2])
            b = np.array([-b[0] / 2, b[0] / 2])
        layer = torch.nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(W.astype(np.float32)))
            layer.bias.copy_(torch.from_numpy(b.astype(np.float32)))
        return layer

    # persistence hooks (see save_head / load_head)
    def _saved_arrays(self) -> dict[str, np.ndarray]:
        return {"coef_": np.asarray(self.coef_), "intercept_": np.asarray(self.intercept_)}

    def _saved_state(self) -> dict[str, Any]:
        return {"n_features_in_": int(self.n_features_in_), "n_iter_": int(self.n_iter_)}


class SVMHead(_LinearHead):
    """Linear (or RBF) support vector classifier.

    ``kernel="linear"`` minimizes, for each class ``c`` against the rest (one problem for two classes,
    positive class ``classes_[1]``)::

        0.5 * ||w_c||^2 + 0.5 * b_c^2 + C * sum_i max(0, 1 - y_ic * (w_c . x_i + b_c))^2

    which is exactly ``sklearn.svm.LinearSVC(C=C)`` with its defaults (squared hinge, L2 penalty,
    ``intercept_scaling=1``), so ``C`` means the same; the solution differs from LinearSVC's only by solver
    tolerance.  Solver: a finite Newton method in the Gram space when ``n <= d + 1``, in feature space
    otherwise (:mod:`featx._solvers` explains both); it stops when the relative duality gap is ``<= tol``,
    a certificate that the objective is within ``tol`` (relative) of the optimum.  ``max_iter`` bounds the
    Newton steps (or the L-BFGS iterations of :meth:`fit_stream`).

    For many values of ``C`` on the same rows, build a :class:`LinearProblem` once and pass it to every
    ``fit(X, y, problem=p)``: the Gram matrix is then computed once and each ``C`` warm-starts from the
    previous solution for the same labels.

    ``kernel="rbf"`` fits ``sklearn.svm.SVC(C=C, kernel="rbf", gamma=gamma)`` (kept in ``svc_``); it cannot
    be streamed, exported to torch or saved without joblib.

    ``device`` (``"cpu"`` or ``"cuda"``...) is where the linear solver's matrix products run.
    ``random_state`` is accepted for interface symmetry; the linear solver is deterministic.
    """

    def __init__(
        self,
        C: float = 1.0,
        *,
        kernel: str = "linear",
        gamma: str | float = "scale",
        tol: float = 1e-4,
        max_iter: int = 1000,
        device: str = "cpu",
        random_state: int | None = None,
    ) -> None:
        self.C = C
        self.kernel = kernel
        self.gamma = gamma
        self.tol = tol
        self.max_iter = max_iter
        self.device = device
        self.random_state = random_state

    def _check_params(self) -> None:
        _check_positive("C", self.C)
        _check_positive("tol", self.tol)
        _check_int("max_iter", self.max_iter, 1)
        if self.kernel not in ("linear", "rbf"):
            raise UsageError(f"kernel must be 'linear' or 'rbf', got {self.kernel!r}")

    def fit(self, X: Any, y: Any, *, problem: LinearProblem | None = None) -> SVMHead:
        """Fit on rows ``X`` (n, d) and labels ``y``.

        ``problem`` reuses a :class:`LinearProblem` built on the same ``X`` (checked; a different ``X`` raises
        :class:`UsageError`); it is ignored by ``kernel="rbf"``.
        """
        self._check_params()
        X, y = validate_data(self, X, y, dtype=_FLOAT_DTYPES)
        y_idx = _encode_targets(self, y)
        if self.kernel == "rbf":
            from sklearn.svm import SVC

            if problem is not None:
                # A search may hand every trial the same problem; it only serves the linear solver.
                logger.debug("SVMHead(kernel='rbf') ignores problem=")
            self.svc_ = SVC(C=float(self.C), kernel="rbf", gamma=self.gamma, random_state=self.random_state)
            self.svc_.fit(X, y_idx)
            self.n_iter_ = self.svc_.n_iter_
            return self
        if problem is None:
            problem = LinearProblem(_float32_rows(X), device=self.device)
        elif not isinstance(problem, LinearProblem) or not problem.matches(X):
            raise UsageError("problem= was built from different rows than the X given to fit")
        Y = labels_to_pm1(y_idx, len(self.classes_))
        coef, intercept, info = problem.solve_svm(Y, float(self.C), tol=float(self.tol), max_iter=int(self.max_iter))
        self._set_solution(coef, intercept, info)
        return self

    def fit_stream(
        self,
        batches: Batches,
        *,
        classes: Any,
        n_features: int,
        val: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> SVMHead:
        """Fit the same objective as :meth:`fit` on data seen one chunk at a time.

        ``batches()`` must return a fresh iterator of ``(X_chunk float32 (m, n_features), y_chunk labels)``
        over all training rows.  One validating pass, then L-BFGS where every objective/gradient evaluation is
        one pass (float32 products per chunk, float64 sums and parameters); memory does not grow with the
        number of rows.  ``val`` is accepted for symmetry with :class:`MLPHead` and not used: the problem is
        convex and solved to ``tol``.  Only ``kernel="linear"``.
        """
        self._check_params()
        if self.kernel != "linear":
            raise UsageError("fit_stream needs kernel='linear'; an RBF SVM needs all rows in memory")
        labels = _StreamLabels(classes, n_features)
        n, _ = labels.scan(batches)
        self.classes_ = labels.classes
        self.n_features_in_ = labels.n_features
        k = len(self.classes_)
        n_out = 1 if k == 2 else k
        coef, intercept, info = lbfgs_linear(
            labels.indexed(batches),
            "squared_hinge",
            n_out,
            labels.n_features,
            float(self.C),
            n_rows=n,
            tol=float(self.tol),
            max_iter=int(self.max_iter),
            device=resolve_device(self.device),
            encode=lambda idx: labels_to_pm1(idx, k),
        )
        self._set_solution(coef, intercept, info)
        return self

    def _set_solution(self, coef: np.ndarray, intercept: np.ndarray, info: SolveInfo) -> None:
        self.coef_ = np.asarray(coef, dtype=np.float64)
        self.intercept_ = np.asarray(intercept, dtype=np.float64)
        # sklearn's estimator checks ask for n_iter_ >= 1; a warm start that is already optimal does 0 steps.
        self.n_iter_ = max(1, int(info.n_iter))
        self.solve_info_ = info
        if not info.converged:
            warnings.warn(
                f"SVMHead did not reach tol={self.tol} in max_iter={self.max_iter} iterations ({info.detail})",
                ConvergenceWarning,
                stacklevel=3,
            )

    def decision_function(self, X: Any) -> np.ndarray:
        """Signed distances to the class hyperplanes; shape (n,) for two classes, else (n, n_classes)."""
        check_is_fitted(self)
        if self.kernel == "rbf" and hasattr(self, "svc_"):
            X = validate_data(self, X, reset=False, dtype=_FLOAT_DTYPES)
            return self.svc_.decision_function(X)
        return super().decision_function(X)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class labels."""
        check_is_fitted(self)
        if self.kernel == "rbf" and hasattr(self, "svc_"):
            X = validate_data(self, X, reset=False, dtype=_FLOAT_DTYPES)
            return self.classes_[self.svc_.predict(X)]
        return super().predict(X)

    def to_torch(self) -> torch.nn.Module:
        """See :meth:`_LinearHead.to_torch`; an RBF head raises :class:`UsageError`."""
        check_is_fitted(self)
        if self.kernel == "rbf":
            raise UsageError(
                "an RBF SVM head cannot be turned into torch layers; fit a linear svm, logreg or mlp head to fine-tune"
            )
        return super().to_torch()


class LogisticHead(_LinearHead):
    """L2-regularized logistic regression, ``sklearn.linear_model.LogisticRegression(C=C)``'s problem.

    Three or more classes: multinomial (softmax) loss, ``coef_`` (k, d).  Two classes: the binomial loss
    with one score, ``coef_`` (1, d), as scikit-learn does.  Objective: ``0.5 * ||W||^2 + C * sum_i loss_i``
    with the intercept not penalized.  Solver: L-BFGS (unpreconditioned, like scikit-learn's) on full-batch
    passes with float32 matrix products for big data (float64 for small) and float64 parameters and sums;
    ``tol`` bounds the gradient of the objective divided by ``C * n`` (as in scikit-learn), ``max_iter`` the
    L-BFGS iterations.  ``fit_stream`` runs the same solver one chunk at a
    time.
    """

    def __init__(
        self,
        C: float = 1.0,
        *,
        tol: float = 1e-4,
        max_iter: int = 1000,
        device: str = "cpu",
        random_state: int | None = None,
    ) -> None:
        self.C = C
        self.tol = tol
        self.max_iter = max_iter
        self.device = device
        self.random_state = random_state

    def _check_params(self) -> None:
        _check_positive("C", self.C)
        _check_positive("tol", self.tol)
        _check_int("max_iter", self.max_iter, 1)

    def _solve(self, batches: Batches, n_rows: int, warm: np.ndarray | None = None) -> None:
        k = len(self.classes_)
        kind = "binomial" if k == 2 else "softmax"
        n_out = 1 if k == 2 else k
        if kind == "binomial":

            def encode(idx: np.ndarray) -> np.ndarray:
                return np.where(idx == 1, 1.0, -1.0)[:, None]

        else:

            def encode(idx: np.ndarray) -> np.ndarray:
                return idx[:, None].astype(np.int64)

        coef, intercept, info = lbfgs_linear(
            batches,
            kind,
            n_out,
            int(self.n_features_in_),
            float(self.C),
            n_rows=n_rows,
            tol=float(self.tol),
            max_iter=int(self.max_iter),
            device=resolve_device(self.device),
            encode=encode,
            W0=warm,
            # Measured: the Nystrom preconditioner that helps the squared hinge hurts here (the logistic
            # curvature falls far below C/4 as predictions grow confident), so plain L-BFGS as in sklearn.
            precond_rank=0,
        )
        self.coef_ = np.asarray(coef, dtype=np.float64)
        self.intercept_ = np.asarray(intercept, dtype=np.float64)
        self.n_iter_ = max(1, int(info.n_iter))
        self.solve_info_ = info
        if not info.converged:
            warnings.warn(
                f"LogisticHead did not converge in max_iter={self.max_iter} iterations: {info.detail['message']}",
                ConvergenceWarning,
                stacklevel=3,
            )

    def fit(self, X: Any, y: Any) -> LogisticHead:
        """Fit on rows ``X`` (n, d) and labels ``y``."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=_FLOAT_DTYPES)
        y_idx = _encode_targets(self, y)
        X32 = _float32_rows(X)
        self._solve(lambda: iter([(X32, y_idx)]), len(y_idx))
        return self

    def fit_stream(
        self,
        batches: Batches,
        *,
        classes: Any,
        n_features: int,
        val: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> LogisticHead:
        """Fit :meth:`fit`'s objective one chunk at a time (see :meth:`SVMHead.fit_stream`); ``val`` is unused."""
        self._check_params()
        labels = _StreamLabels(classes, n_features)
        n, _ = labels.scan(batches)
        self.classes_ = labels.classes
        self.n_features_in_ = labels.n_features
        self._solve(labels.indexed(batches), n)
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, n_classes), columns in ``classes_`` order."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            p1 = 1.0 / (1.0 + np.exp(-scores))
            return np.column_stack([1.0 - p1, p1])
        scores = scores - scores.max(axis=1, keepdims=True)
        e = np.exp(scores)
        return e / e.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Logarithm of :meth:`predict_proba`, computed stably."""
        scores = self.decision_function(X)
        if scores.ndim == 1:
            scores = np.column_stack([np.zeros_like(scores), scores])
        m = scores.max(axis=1, keepdims=True)
        return scores - m - np.log(np.exp(scores - m).sum(axis=1, keepdims=True))


class _MLPNet(torch.nn.Module):
    """Linear -> ReLU -> Dropout -> Linear; dropout masks come from an explicit generator (determinism)."""

    def __init__(self, d: int, hidden: int, k: int, dropout: float) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(d, hidden)
        self.out = torch.nn.Linear(hidden, k)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h = torch.relu(self.hidden(x))
        if self.training and self.dropout > 0:
            keep = torch.rand(h.shape, generator=generator, device=h.device) >= self.dropout
            h = h * keep / (1.0 - self.dropout)
        return self.out(h)


class MLPHead(ClassifierMixin, BaseEstimator):
    """One-hidden-layer network on features: ``Linear(d, hidden) -> ReLU -> Dropout -> Linear(hidden, k)``.

    Trained with cross-entropy on shuffled mini-batches by Adam (``optimizer="adam"``) or SGD with momentum
    (``"sgd"``), ``weight_decay`` as an L2 term in the gradient.  Early stopping (``early_stopping=True``)
    watches the validation cross-entropy - on ``X_val``/``y_val`` when given to :meth:`fit`, else on a
    stratified ``validation_fraction`` of the training rows - stops after ``patience`` epochs without
    improvement and restores the best epoch's weights (``best_epoch_``, 1-based).  When the rows are too few
    to hold out one of each class, it trains on all rows for ``epochs`` epochs.

    After each epoch ``epoch_callback(epoch, val_accuracy)`` is called (NaN accuracy when there is no
    validation data); an exception it raises (e.g. ``optuna.TrialPruned``) propagates out of ``fit``.
    ``history_`` lists one dict per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy``,
    ``seconds``.  Results are deterministic for an integer ``random_state`` on a given device and thread
    count.  Prediction runs in float64 numpy on the learned weights.
    """

    def __init__(
        self,
        hidden: int = 256,
        *,
        dropout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: str = "adam",
        momentum: float = 0.9,
        batch_size: int = 128,
        epochs: int = 50,
        early_stopping: bool = True,
        validation_fraction: float = 0.1,
        patience: int = 5,
        device: str = "cpu",
        random_state: int | None = None,
        epoch_callback: Callable[[int, float], None] | None = None,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        self.momentum = momentum
        self.batch_size = batch_size
        self.epochs = epochs
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.device = device
        self.random_state = random_state
        self.epoch_callback = epoch_callback

    def _check_params(self) -> None:
        _check_int("hidden", self.hidden, 1)
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout!r}")
        _check_positive("lr", self.lr)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        if self.optimizer not in ("adam", "sgd"):
            raise UsageError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        _check_positive("momentum", self.momentum, allow_zero=True)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("epochs", self.epochs, 1)
        _check_int("patience", self.patience, 1)
        if not (isinstance(self.validation_fraction, (int, float)) and 0 <= self.validation_fraction < 1):
            raise UsageError(f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}")
        if self.epoch_callback is not None and not callable(self.epoch_callback):
            raise UsageError("epoch_callback must be callable or None")

    # -- training -----------------------------------------------------------------------------------------
    def _setup(
        self, d: int, k: int
    ) -> tuple[_MLPNet, torch.optim.Optimizer, torch.Generator, torch.Generator, torch.device]:
        device = resolve_device(self.device)
        seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
        # Our own generators (init and shuffling on CPU, dropout on the training device): deterministic
        # for a given random_state without touching torch's global RNG.
        gen = torch.Generator(device="cpu").manual_seed(seed)
        drop_gen = torch.Generator(device=device).manual_seed(seed + 1)
        net = _MLPNet(d, int(self.hidden), k, float(self.dropout))
        with torch.no_grad():
            # nn.Linear's default init (uniform +-1/sqrt(fan_in)), drawn from our generator, not the global one.
            for layer in (net.hidden, net.out):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) * 2 * bound - bound)
                layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen) * 2 * bound - bound)
        net.to(device)
        if self.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(
                net.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay)
            )
        else:
            opt = torch.optim.SGD(
                net.parameters(),
                lr=float(self.lr),
                momentum=float(self.momentum),
                weight_decay=float(self.weight_decay),
            )
        return net, opt, gen, drop_gen, device

    def _split(self, y_idx: np.ndarray, seed_rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray] | None:
        """Stratified train/validation indices, or None when a class is too small to hold one row out."""
        k = int(y_idx.max()) + 1
        counts = np.bincount(y_idx, minlength=k)
        n_val = int(math.ceil(self.validation_fraction * len(y_idx)))
        if self.validation_fraction <= 0 or counts.min() < 2 or n_val < k or len(y_idx) - n_val < k:
            logger.debug("MLPHead: too few rows for a stratified validation split; training on all rows")
            return None
        from sklearn.model_selection import train_test_split

        tr, va = train_test_split(
            np.arange(len(y_idx)), test_size=n_val, stratify=y_idx, random_state=seed_rng.randint(0, 2**31 - 1)
        )
        return np.sort(tr), np.sort(va)

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> MLPHead:
        """Train on ``X``/``y``; ``X_val``/``y_val`` (both or neither) replace the internal validation split."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=_FLOAT_DTYPES)
        y_idx = _encode_targets(self, y)
        X32 = _float32_rows(X)
        if (X_val is None) != (y_val is None):
            raise UsageError("give both X_val and y_val, or neither")
        val: tuple[np.ndarray, np.ndarray] | None = None
        train_rows: np.ndarray | None = None
        if X_val is not None:
            Xv = validate_data(self, X_val, reset=False, dtype=_FLOAT_DTYPES)
            val = (_float32_rows(Xv), self._label_indices(np.asarray(y_val).ravel()))
        elif self.early_stopping:
            split = self._split(y_idx, check_random_state(self.random_state))
            if split is not None:
                train_rows, va = split
                val = (X32[va], y_idx[va])
        if train_rows is not None:
            Xtr, ytr = X32[train_rows], y_idx[train_rows]
        else:
            Xtr, ytr = X32, y_idx

        def batches() -> Iterable[tuple[np.ndarray, np.ndarray]]:
            yield Xtr, ytr

        self._train(batches, len(self.classes_), X32.shape[1], val)
        return self

    def fit_stream(
        self,
        batches: Batches,
        *,
        classes: Any,
        n_features: int,
        val: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> MLPHead:
        """Train epoch by epoch over ``batches()`` (a fresh iterator of ``(X_chunk, y_chunk)`` per epoch).

        Rows are shuffled within each chunk (the chunk order is the caller's).  Early stopping needs ``val``
        = ``(X_val, y_val)``; without it the network trains for ``epochs`` epochs.
        """
        self._check_params()
        labels = _StreamLabels(classes, n_features)
        self.classes_ = labels.classes
        self.n_features_in_ = labels.n_features
        v = None
        if val is not None:
            Xv, yv = val
            v = (_float32_rows(np.asarray(Xv)), labels.indices(Xv, yv))
        indexed = labels.indexed(batches)

        def batches32() -> Iterable[tuple[np.ndarray, np.ndarray]]:
            for Xc, yc in indexed():
                yield _float32_rows(Xc), yc

        self._train(batches32, len(self.classes_), labels.n_features, v)
        return self

    def _label_indices(self, y: np.ndarray) -> np.ndarray:
        idx = np.clip(np.searchsorted(self.classes_, y), 0, len(self.classes_) - 1)
        if (self.classes_[idx] != y).any():
            raise DataError("y_val has labels that are not in the training labels")
        return idx.astype(np.int64)

    def _train(
        self,
        batches: Batches,
        k: int,
        d: int,
        val: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        net, opt, gen, drop_gen, device = self._setup(d, k)
        loss_fn = torch.nn.CrossEntropyLoss()
        Xv_t = torch.from_numpy(val[0]).to(device) if val is not None else None
        yv_t = torch.from_numpy(val[1]).to(device) if val is not None else None
        use_es = bool(self.early_stopping) and val is not None
        best_loss = math.inf
        best_state: dict[str, torch.Tensor] | None = None
        best_epoch = 0
        since_best = 0
        history: list[dict[str, float]] = []
        bs = int(self.batch_size)
        seen_rows = 0
        for epoch in range(1, int(self.epochs) + 1):
            t0 = time.perf_counter()
            net.train()
            total, count = 0.0, 0
            for Xc, yc in batches():
                m = len(yc)
                if m == 0:
                    continue
                Xc_t = torch.from_numpy(Xc).to(device)
                yc_t = torch.from_numpy(yc).to(device)
                perm = torch.randperm(m, generator=gen).to(device)
                for s in range(0, m, bs):
                    idx = perm[s : s + bs]
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(net(Xc_t[idx], drop_gen), yc_t[idx])
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                    count += len(idx)
            if count == 0:
                raise DataError("the training batches produced no rows")
            seen_rows = count
            train_loss = total / count
            val_loss, val_acc = math.nan, math.nan
            if Xv_t is not None and yv_t is not None and len(yv_t) > 0:
                net.eval()
                with torch.no_grad():
                    logits = net(Xv_t)
                    val_loss = float(loss_fn(logits, yv_t))
                    val_acc = float((logits.argmax(1) == yv_t).double().mean())
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_accuracy": val_acc,
                    "seconds": time.perf_counter() - t0,
                }
            )
            logger.debug("MLPHead epoch %d: %s", epoch, history[-1])
            improved = use_es and val_loss < best_loss
            if improved:
                best_loss, best_epoch, since_best = val_loss, epoch, 0
                best_state = {name: t.detach().clone() for name, t in net.state_dict().items()}
            elif use_es:
                since_best += 1
            if self.epoch_callback is not None:
                # May raise (an Optuna pruner stopping the trial); deliberately not caught.
                self.epoch_callback(epoch, val_acc)
            if use_es and since_best >= int(self.patience):
                break
        if use_es and best_state is not None:
            net.load_state_dict(best_state)
        else:
            best_epoch = len(history)
        self.history_ = history
        self.best_epoch_ = best_epoch
        self.n_iter_ = len(history)
        self.n_train_rows_ = seen_rows
        self.hidden_weight_ = net.hidden.weight.detach().cpu().numpy().astype(np.float32)
        self.hidden_bias_ = net.hidden.bias.detach().cpu().numpy().astype(np.float32)
        self.output_weight_ = net.out.weight.detach().cpu().numpy().astype(np.float32)
        self.output_bias_ = net.out.bias.detach().cpu().numpy().astype(np.float32)

    # -- inference ----------------------------------------------------------------------------------------
    def _logits(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=_FLOAT_DTYPES)
        W1 = self.hidden_weight_.astype(np.float64)
        b1 = self.hidden_bias_.astype(np.float64)
        W2 = self.output_weight_.astype(np.float64)
        b2 = self.output_bias_.astype(np.float64)
        out = np.empty((X.shape[0], W2.shape[0]), dtype=np.float64)
        for s in range(0, X.shape[0], _PREDICT_BLOCK):
            h = np.maximum(np.asarray(X[s : s + _PREDICT_BLOCK], dtype=np.float64) @ W1.T + b1, 0.0)
            out[s : s + _PREDICT_BLOCK] = h @ W2.T + b2
        return out

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, n_classes), columns in ``classes_`` order."""
        z = self._logits(X)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Logarithm of :meth:`predict_proba`, computed stably."""
        z = self._logits(X)
        m = z.max(axis=1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class labels."""
        logits = self._logits(X)  # checks fitted before classes_ is touched
        return self.classes_[np.argmax(logits, axis=1)]

    def to_torch(self) -> torch.nn.Module:
        """``nn.Sequential(Linear, ReLU, Dropout, Linear)`` with the learned weights, in eval mode."""
        check_is_fitted(self)
        d, h, k = self.hidden_weight_.shape[1], self.hidden_weight_.shape[0], self.output_weight_.shape[0]
        seq = torch.nn.Sequential(
            torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Dropout(float(self.dropout)), torch.nn.Linear(h, k)
        )
        with torch.no_grad():
            seq[0].weight.copy_(torch.from_numpy(self.hidden_weight_))
            seq[0].bias.copy_(torch.from_numpy(self.hidden_bias_))
            seq[3].weight.copy_(torch.from_numpy(self.output_weight_))
            seq[3].bias.copy_(torch.from_numpy(self.output_bias_))
        return seq.eval()

    def _saved_arrays(self) -> dict[str, np.ndarray]:
        return {
            "hidden_weight_": self.hidden_weight_,
            "hidden_bias_": self.hidden_bias_,
            "output_weight_": self.output_weight_,
            "output_bias_": self.output_bias_,
        }

    def _saved_state(self) -> dict[str, Any]:
        return {
            "n_features_in_": int(self.n_features_in_),
            "n_iter_": int(self.n_iter_),
            "best_epoch_": int(self.best_epoch_),
            "history_": self.history_,
            "n_train_rows_": int(self.n_train_rows_),
        }


# -- persistence ---------------------------------------------------------------------------------------------

HEAD_CLASSES: dict[str, type[BaseEstimator]] = {c.__name__: c for c in (SVMHead, LogisticHead, MLPHead)}
_FORMAT = "featx-head"
_FORMAT_VERSION = 1


def _json_safe(value: Any) -> Any:
    """Parameters as JSON; callables (an epoch callback) are not saved."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if callable(value):
        return None
    raise UsageError(f"cannot save a head parameter of type {type(value).__name__}: {value!r}")


def save_head(est: BaseEstimator, directory: str | os.PathLike[str]) -> None:
    """Save a fitted head to ``directory``: ``head.json`` plus ``head.npz`` (or ``head.joblib`` for RBF).

    ``head.json`` records the class, the parameters, the classes, the array names and the sha256 of the data
    file; :func:`load_head` checks that hash before reading anything.  The data file is written first and
    ``head.json`` last, each atomically, so an interrupted save never leaves a json describing other data.
    """
    name = type(est).__name__
    if name not in HEAD_CLASSES:
        raise UsageError(f"save_head saves featx heads ({', '.join(HEAD_CLASSES)}), not {name}")
    check_is_fitted(est)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    classes = np.asarray(est.classes_)
    if classes.dtype.kind not in "biufU" and not all(isinstance(c, str) for c in classes.tolist()):
        raise UsageError(f"cannot save class labels of dtype {classes.dtype} as JSON")
    meta: dict[str, Any] = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "class": name,
        "params": {k: _json_safe(v) for k, v in est.get_params(deep=False).items()},
        "classes": {"dtype": classes.dtype.str if classes.dtype.kind != "O" else "str", "values": classes.tolist()},
    }
    if isinstance(est, SVMHead) and est.kernel == "rbf":
        import joblib

        buf = io.BytesIO()
        joblib.dump(est.svc_, buf)
        data = buf.getvalue()
        meta.update(
            {"file": "head.joblib", "sha256": hashlib.sha256(data).hexdigest(), "arrays": [], "state": {
                "n_features_in_": int(est.n_features_in_)}}
        )
        _atomic_write(out / "head.joblib", data)
    else:
        arrays = est._saved_arrays()  # type: ignore[attr-defined]
        buf = io.BytesIO()
        np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
        data = buf.getvalue()
        meta.update(
            {
                "file": "head.npz",
                "sha256": hashlib.sha256(data).hexdigest(),
                "arrays": sorted(arrays),
                "state": est._saved_state(),  # type: ignore[attr-defined]
            }
        )
        _atomic_write(out / "head.npz", data)
    _atomic_write(out / "head.json", (json.dumps(meta, indent=2, allow_nan=True) + "\n").encode("utf-8"))
    # debug only: featx fit saves into a temporary directory and logs the final one once it is in place
    logger.debug("saved %s to %s", name, out)


def load_head(directory: str | os.PathLike[str]) -> BaseEstimator:
    """Load a head saved by :func:`save_head`, verifying the data file's sha256 first.

    Raises :class:`IntegrityError` (one line) when a file is missing, unreadable, malformed or does not
    match the recorded hash.
    """
    src = Path(directory)
    meta_path = src / "head.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"no head.json in {src}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{meta_path} is unreadable or not JSON: {exc}".replace("\n", " ")) from None
    try:
        if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
            raise IntegrityError(f"{meta_path} is not a featx head (format {meta.get('format')!r})")
        cls = HEAD_CLASSES.get(meta["class"])
        if cls is None:
            raise IntegrityError(f"{meta_path} names an unknown head class {meta['class']!r}")
        fname = meta["file"]
        if fname not in ("head.npz", "head.joblib"):
            raise IntegrityError(f"{meta_path} names an unexpected data file {fname!r}")
        expected = str(meta["sha256"])
        params = dict(meta["params"])
        cdt = meta["classes"]["dtype"]
        classes = np.asarray(meta["classes"]["values"], dtype=object if cdt == "str" else np.dtype(cdt))
        state = dict(meta.get("state", {}))
        names = list(meta["arrays"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{meta_path} is malformed: {exc!r}") from None
    data_path = src / fname
    try:
        data = data_path.read_bytes()
    except OSError:
        raise IntegrityError(f"{data_path} is missing or unreadable") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise IntegrityError(f"{data_path} does not match the sha256 recorded in head.json (tampered or corrupt)")
    est = cls(**params)
    est.classes_ = classes
    if fname == "head.joblib":
        import joblib

        try:
            est.svc_ = joblib.load(io.BytesIO(data))  # bytes already verified against head.json
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
            raise IntegrityError(f"{data_path} could not be loaded: {exc!r}") from None
        est.n_features_in_ = int(state["n_features_in_"])
        est.n_iter_ = est.svc_.n_iter_
        return est
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in names}
    except Exception as exc:  # noqa: BLE001 - a zip/format error or a missing array: corrupt file
        raise IntegrityError(f"{data_path} could not be read: {exc!r}") from None
    for key, arr in arrays.items():
        setattr(est, key, arr)
    for key, value in state.items():
        setattr(est, key, value)
    return est
