"""The linear SVM problem on one feature matrix: :class:`LinearProblem` and :class:`SolveInfo`.

The problem (per one-vs-rest column ``c`` with labels ``y`` in {-1, +1}) is exactly LIBLINEAR's /
``sklearn.svm.LinearSVC``'s default::

    P(w) = 0.5 * ||w||^2 + C * sum_i max(0, 1 - y_i * w . [x_i, 1])^2

with the intercept as the weight of a constant feature 1 that is regularized like the others
(``intercept_scaling=1``).  Two exact Newton solvers are used, picked by the shape of the data: the Gram space
for ``n <= d + 1`` (:mod:`._gram`), the feature space otherwise (:mod:`._newton`).  Both stop when the relative
duality gap is ``<= tol``.  Small problems (n x d <= 2e7 entries) use float64 products everywhere; big ones
float32 products (the features' own precision) with float64 parameters and sums.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from featx import interrupt

from . import _gram, _newton
from ._backend import FLOAT64_BELOW, NumpyOps, backend_for
from ._blas import blas_limit, blas_threads, crossprod, gram_plus_one
from ._hinge import labels_to_pm1, svm_primal_objective

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]

__all__ = ["Batches", "LinearProblem", "SolveInfo", "labels_to_pm1", "rows_where", "svm_primal_objective"]


def rows_where(batches: Batches, keep: np.ndarray) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
    """``batches`` (of every row, in order) reduced to the rows where ``keep`` is True: a fold, or the rows held
    out to choose C, read from a stream without a copy of the others."""

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        at = 0
        for X, y in batches():
            sel = keep[at : at + len(X)]
            at += len(X)
            if sel.all():
                yield X, y
            elif sel.any():
                yield X[sel], y[sel]

    return chunks



def _array_fingerprint(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


@dataclass
class SolveInfo:
    """What a solver did: iterations, seconds, final objective (summed over columns), why it stopped."""

    space: str
    n_iter: int
    seconds: float
    objective: float
    converged: bool
    detail: dict[str, Any] = field(default_factory=dict)


class LinearProblem:
    """The reusable, ``C``-independent part of fitting linear heads on one feature matrix.

    Build it once from the (already scaled) training rows and pass it to ``SVMHead.fit(X, y, problem=p)``
    for every ``C`` of a hyperparameter search::

        p = LinearProblem(X_train)
        for C in (1e-3, 1e-2, 1e-1, 1):
            head = SVMHead(C=C).fit(X_train, y_train, problem=p)

    It holds a float32 reference to ``X``, the Gram matrix ``K = X X^T + 1`` (when ``n <= d + 1``) or the
    feature-space cross-product ``X~^T X~`` (otherwise), the factorization for the most recent ``C`` and the
    most recent solution for each label vector, which warm-starts the next ``C``.  ``fit`` checks that the
    ``X`` it is given equals the one the problem was built from (identity, or else an exact comparison), so
    a stale problem cannot silently be reused.  Memory: ``n^2`` float64 for ``K`` plus ``2 n^2`` for the
    current factorization (about 280 MB at n = 3,400) in the Gram space; ``2 (d+1)^2`` float64 in the feature
    space.  ``space`` (``"auto"``, ``"gram"``, ``"feature"``): an explicit space is refused with
    :class:`~featx.memory.NotEnoughMemory` when :func:`featx.memory.estimate` of it exceeds ``max_memory``
    (bytes or a size such as ``"8G"``; default :func:`featx.memory.budget`).
    """

    def __init__(
        self,
        X: np.ndarray,
        *,
        device: str | torch.device = "cpu",
        space: str = "auto",
        max_memory: str | int | None = None,
    ) -> None:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D, got shape {X.shape}")
        if space not in ("auto", "gram", "feature"):
            raise ValueError(f"space must be 'auto', 'gram' or 'feature', got {space!r}")
        self.n, self.d = X.shape
        # An explicit space is a promise to hold its arrays: refuse it up front when they exceed the budget
        # (checked again, with the number of classes, by solve_svm).  "auto" leaves the choice to the caller's plan.
        self.max_memory = max_memory if space != "auto" else None
        self._explicit = space != "auto"
        if space == "auto":
            space = "gram" if self.n <= self.d + 1 else "feature"
        self.space = space
        self._check_memory(2)
        self.X = np.ascontiguousarray(X, dtype=np.float32)
        if not self.X.flags.writeable:  # torch only wraps writable buffers without a warning
            self.X = self.X.copy()
        # numpy and scipy on the CPU (no torch import), torch tensors on an accelerator.
        self.xp: Any = backend_for(device)
        self._X_t: Any = None
        self._K: Any = None
        # Small problems use float64 products throughout (cheap, and exact enough for tight tolerances);
        # big ones float32 products (the features' own precision), upgraded only where a factorization fails.
        self._small = self.n * self.d <= FLOAT64_BELOW
        self._K_exact = self._small
        self._M_exact = self._small
        self._X_mm: Any = None
        self._M: Any = None
        self._factor_C: tuple | None = None  # what the factor was built for (C, and the solver's own terms)
        self._factor: Any = None
        self._warm: dict[str, tuple[float, Any]] = {}
        self._workers = 0  # the BLAS threads configured when a CPU solve starts (see solve_svm)

    def _check_memory(self, n_classes: int) -> None:
        """Raise :class:`~featx.memory.NotEnoughMemory` when this space's arrays (``memory.estimate``) for
        ``n_classes`` exceed ``max_memory`` (default ``memory.budget()``); only for an explicit space."""
        if not self._explicit:
            return
        from featx import memory

        need = memory.estimate("svm", self.space, self.n, self.d, max(int(n_classes), 2))
        have = memory.budget(self.max_memory)
        if need > have:
            raise memory.NotEnoughMemory(
                f"the {self.space} space of a linear SVM on {self.n} x {self.d} rows in {max(int(n_classes), 2)} "
                f"classes needs {memory.gb(need)}, budget {memory.gb(have)} (max_memory)"
            )

    @property
    def device(self) -> str:
        """Where the products run: ``"cpu"`` (numpy) or the torch device's name."""
        xp = self.xp
        return "cpu" if isinstance(xp, NumpyOps) else str(xp.device)

    def on_rows(self, X: np.ndarray) -> LinearProblem:
        """A problem on other rows (those ``C="auto"`` fits while choosing) built as this one was: the same
        device, the same explicit space and budget, or again a choice by shape."""
        return LinearProblem(X, device=self.device, space=self.space if self._explicit else "auto",
                             max_memory=self.max_memory)

    # -- shared pieces -------------------------------------------------------------------------------------
    def matches(self, X: np.ndarray) -> bool:
        """True when ``X`` holds exactly the rows this problem was built from."""
        if X is self.X:
            return True
        X = np.asarray(X)
        return X.shape == self.X.shape and np.array_equal(np.asarray(X, dtype=np.float32), self.X)

    @property
    def X_t(self) -> Any:
        """``X`` as a float32 array of the back-end (the numpy array itself on the CPU)."""
        if self._X_t is None:
            self._X_t = self.xp.asarray(self.X)
        return self._X_t

    @property
    def X_mm(self) -> Any:
        """``X`` as used in the feature-space products: float64 for small problems, else float32."""
        if self._X_mm is None:
            self._X_mm = self.xp.cast(self.X_t, self.xp.f64) if self._small else self.X_t
        return self._X_mm

    @property
    def K(self) -> Any:
        """``X X^T + 1`` in float64 (n, n), computed on first use."""
        if self._K is None:
            self._K = self._timed(self._gram, f"Gram matrix {self.n}x{self.n}")
        return self._K

    @property
    def M(self) -> Any:
        """``X~^T X~`` in float64 ((d+1), (d+1)) with ``X~ = [X, 1]``, computed on first use."""
        if self._M is None:
            self._M = self._timed(self._cross, f"cross-product {self.d + 1}x{self.d + 1}")
        return self._M

    @staticmethod
    def _timed(build: Callable[[], Any], what: str) -> Any:
        t0 = time.perf_counter()
        out = build()
        logger.debug("%s in %.2fs", what, time.perf_counter() - t0)
        return out

    def _gram(self) -> Any:
        xp = self.xp
        if self._K_exact:
            X64 = xp.cast(self.X_t, xp.f64)
            K = X64 @ X64.T
            K += 1.0
            return K
        if isinstance(xp, NumpyOps):
            # float32 tiles on as many threads as BLAS may use (see gram_plus_one), + 1 and float64 in place.
            return gram_plus_one(self.X_t, self._workers or blas_threads())
        K = xp.cast(self.X_t @ self.X_t.T, xp.f64)
        K += 1.0
        return K

    def _cross(self) -> Any:
        xp, Xt, d = self.xp, self.X_t, self.d
        M = xp.zeros((d + 1, d + 1), xp.f64)
        # On the CPU in tiles that a stop request can come between (crossprod); one product elsewhere.
        top = xp.cast(Xt, xp.f64) if self._M_exact else Xt
        M[:d, :d] = crossprod(top) if isinstance(xp, NumpyOps) else top.T @ top
        del top
        interrupt.raise_if_requested()
        s = xp.colsum64(Xt)
        M[:d, d] = s
        M[d, :d] = s
        M[d, d] = float(self.n)
        return M

    def _warm_key(self, Y: np.ndarray) -> str:
        return _array_fingerprint(Y)

    # -- the SVM ----------------------------------------------------------------------------------------------
    def solve_svm(
        self, Y: np.ndarray, C: float, *, tol: float = 1e-4, max_iter: int = 100, warm_start: bool = True
    ) -> tuple[np.ndarray, np.ndarray, SolveInfo]:
        """Minimize the squared-hinge SVM primal for the +-1 label matrix ``Y`` (n, k').

        Returns ``coef`` (k', d) float64, ``intercept`` (k',) float64 and a :class:`SolveInfo`.  A column is
        done when its relative duality gap is ``<= tol`` or (Gram space) a full Newton step leaves its active
        set unchanged, which lands exactly on the optimum; ``max_iter`` bounds the Newton steps.
        """
        if C <= 0 or not math.isfinite(C):
            raise ValueError(f"C must be positive and finite, got {C}")
        self._check_memory(Y.shape[1] if Y.shape[1] > 1 else 2)
        xp = self.xp
        key = self._warm_key(Y)
        warm = self._warm.get(key) if warm_start else None
        start = warm[1] if warm else None
        Yt = xp.asarray(np.asarray(Y, dtype=np.float64))
        t0 = time.perf_counter()
        if self.space == "gram":
            if isinstance(xp, NumpyOps):
                # One BLAS thread fewer than configured for the factorizations and the small products; the Gram
                # matrix's tiles on all of them (see gram_plus_one and the note above blas_threads).
                self._workers = blas_threads()
                with blas_limit(self._workers - 1):
                    B, n_iter, converged, obj, detail = _gram.svm_gram(self, Yt, C, tol, max_iter, start)
            else:
                B, n_iter, converged, obj, detail = _gram.svm_gram(self, Yt, C, tol, max_iter, start)
            self._warm[key] = (C, B)
            # w = X^T beta with float32 GEMMs: beta split into a float32 head and the float32 rounding
            # remainder, so beta's float64 precision survives (X itself is float32 anyway).
            hi = xp.cast(B, xp.f32)
            lo = xp.cast(B - xp.cast(hi, xp.f64), xp.f32)
            coef = xp.cast(hi.T @ self.X_t, xp.f64) + xp.cast(lo.T @ self.X_t, xp.f64)
            intercept = B.sum(0)
        else:
            W, n_iter, converged, obj, detail = _newton.svm_feature(self, Yt, C, tol, max_iter, start)
            self._warm[key] = (C, W)
            coef = W[:-1].T
            intercept = W[-1]
        info = SolveInfo(self.space, n_iter, time.perf_counter() - t0, obj, converged, detail)
        logger.debug("svm C=%g: %s", C, info)
        return np.array(xp.numpy(coef), dtype=np.float64), np.array(xp.numpy(intercept), dtype=np.float64), info
