"""The logistic regression head: :class:`LogisticHead`."""
from __future__ import annotations

from typing import Any

import numpy as np

from ._compat import validate_data
from ._lbfgs import lbfgs_linear
from .base import _FLOAT_DTYPES, ValRows, _encode_targets, _float32_rows, _LinearHead, _StreamLabels
from .problem import Batches, SolveInfo


class LogisticHead(_LinearHead):
    """L2-regularized logistic regression, ``sklearn.linear_model.LogisticRegression(C=C)``'s problem.

    Three or more classes: multinomial (softmax) loss, ``coef_`` (k, d).  Two classes: the binomial loss
    with one score, ``coef_`` (1, d), as scikit-learn does.  Objective: ``0.5 * ||W||^2 + C * sum_i loss_i``
    with the intercept not penalized.  Solver: L-BFGS (unpreconditioned, like scikit-learn's) on full-batch
    passes with float32 matrix products for big data (float64 for small) and float64 parameters and sums;
    ``tol`` bounds the gradient of the objective divided by ``C * n`` (as in scikit-learn), ``max_iter`` the
    L-BFGS iterations.  ``fit_stream`` runs the same solver one chunk at a time.  The constructor is
    ``LogisticHead(C=1.0, *, tol=1e-4, max_iter=1000, device="cpu", random_state=None)``: ``device`` is where
    the matrix products run; ``random_state`` is accepted for interface symmetry (the solver is deterministic).
    """

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
            device=self.device,
            encode=encode,
            W0=warm,
            # Measured: the Nystrom preconditioner that helps the squared hinge hurts here (the logistic
            # curvature falls far below C/4 as predictions grow confident), so plain L-BFGS as in sklearn.
            precond_rank=0,
        )
        self._set_solution(coef, intercept, info)

    def _unconverged(self, info: SolveInfo) -> str:
        return f"LogisticHead did not converge in max_iter={self.max_iter} iterations: {info.detail['message']}"

    def fit(self, X: Any, y: Any) -> LogisticHead:
        """Fit on rows ``X`` (n, d) and labels ``y``."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=_FLOAT_DTYPES)
        y_idx = _encode_targets(self, y)
        X32 = _float32_rows(X)
        self._solve(lambda: iter([(X32, y_idx)]), len(y_idx))
        return self

    def fit_stream(self, batches: Batches, *, classes: Any, n_features: int, val: ValRows = None) -> LogisticHead:
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
