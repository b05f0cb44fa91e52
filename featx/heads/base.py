"""What the heads of :mod:`featx.heads` share: parameter checks, label encoding, streamed-label validation, and
:class:`_LinearHead`, the scoring, torch export and persistence hooks of the heads with ``coef_`` / ``intercept_``.

Heads do no scaling of their own: the caller standardizes the features.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DataError, UsageError
from ._compat import (
    ClassifierBase,
    check_classification_targets,
    check_is_fitted,
    convergence_warning,
    validate_data,
)
from .problem import Batches, SolveInfo

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Rows per block when scoring; bounds the float64 temporaries of predict on big inputs.
_PREDICT_BLOCK = 8192
# ... and the float64 copy of a block to 4 Mi values (32 MB): glibc then reuses one block's memory for the next
# instead of mapping fresh pages (scoring 3,400 x 9,216 rows at once faulted in 250 MB: ~0.2 s).
_PREDICT_VALUES = 4 << 20


def _predict_rows(n_features: int) -> int:
    """Rows per scoring block for ``n_features`` columns (see :data:`_PREDICT_VALUES`)."""
    return max(1, min(_PREDICT_BLOCK, _PREDICT_VALUES // max(1, int(n_features))))
_FLOAT_DTYPES = (np.float64, np.float32)


# held-out rows (X, y) a head may stop early on (the MLP); the linear heads' fit_stream accepts and ignores them
ValRows = tuple[np.ndarray, np.ndarray] | None


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and math.isfinite(float(value)) and (float(value) >= 0 if allow_zero else float(value) > 0)
    if not ok:
        raise UsageError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _encode_targets(est: ClassifierBase, y: np.ndarray) -> np.ndarray:
    """Set ``est.classes_`` and return ``y`` as class indices; refuse fewer than two classes."""
    check_classification_targets(y)
    classes, y_idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"need at least 2 classes to fit a classifier, got 1 class ({classes[0]!r})")
    est.classes_ = classes  # type: ignore[attr-defined]
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


class _LinearHead(ClassifierBase):
    """Shared scoring, export and persistence for heads with ``coef_`` / ``intercept_``."""

    classes_: np.ndarray
    coef_: np.ndarray
    intercept_: np.ndarray
    n_features_in_: int
    n_iter_: Any

    def __init__(
        self,
        C: float | str = 1.0,
        *,
        tol: float = 1e-4,
        max_iter: int = 1000,
        device: str = "cpu",
        random_state: int | None = None,
    ) -> None:
        """Each argument kept unchanged under its own name (scikit-learn's contract); ``fit`` checks them."""
        self.C, self.tol, self.max_iter = C, tol, max_iter
        self.device, self.random_state = device, random_state

    def _check_params(self) -> None:
        """The solver's own parameters: ``C`` and ``tol`` positive, ``max_iter`` at least 1."""
        self._check_c()
        _check_positive("tol", self.tol)
        _check_int("max_iter", self.max_iter, 1)

    def _check_c(self) -> None:
        _check_positive("C", self.C)

    def _set_solution(self, coef: np.ndarray, intercept: np.ndarray, info: SolveInfo) -> None:
        """Keep a solver's result (float64 ``coef_``, ``intercept_``), warning when it stopped unconverged."""
        self.coef_ = np.asarray(coef, dtype=np.float64)
        self.intercept_ = np.asarray(intercept, dtype=np.float64)
        # sklearn's estimator checks ask for n_iter_ >= 1; a warm start that is already optimal does 0 steps.
        self.n_iter_ = max(1, int(info.n_iter))
        self.solve_info_ = info
        if not info.converged:
            warnings.warn(self._unconverged(info), convergence_warning(), stacklevel=4)

    def _unconverged(self, info: SolveInfo) -> str:
        """The warning when the solver stopped before its tolerance."""
        return f"{type(self).__name__} did not converge in max_iter={self.max_iter} iterations"

    def decision_function(self, X: Any) -> np.ndarray:
        """Scores ``X @ coef_.T + intercept_`` (float64); shape (n,) for two classes, else (n, n_classes)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=_FLOAT_DTYPES)
        out = np.empty((X.shape[0], self.coef_.shape[0]), dtype=np.float64)
        step = _predict_rows(X.shape[1])
        for s in range(0, X.shape[0], step):
            out[s : s + step] = np.asarray(X[s : s + step], dtype=np.float64) @ self.coef_.T
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
        import torch  # only here: the linear heads fit and predict with numpy

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
