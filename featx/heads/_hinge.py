"""The squared-hinge SVM's shared pieces: one-vs-rest labels, the primal objective, the exact line search and
the duality gap, used by both Newton solvers (:mod:`._gram`, :mod:`._newton`)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from featx import interrupt


def labels_to_pm1(y_idx: np.ndarray, n_classes: int) -> np.ndarray:
    """One-vs-rest +-1 label matrix (n, k'), k' = 1 for two classes (positive = class index 1), else k."""
    if n_classes == 2:
        return np.where(y_idx == 1, 1.0, -1.0)[:, None]
    return np.where(y_idx[:, None] == np.arange(n_classes)[None, :], 1.0, -1.0)


def svm_primal_objective(W: np.ndarray, b: np.ndarray, X: np.ndarray, Y: np.ndarray, C: float) -> np.ndarray:
    """Per-column value of LIBLINEAR's L2-loss SVM primal for ``coef_ = W`` (k', d), ``intercept_ = b`` (k',).

    Computed in float64; used by tests and benchmarks to compare solutions, not by the solvers themselves.
    """
    X64 = np.asarray(X, dtype=np.float64)
    F = X64 @ np.asarray(W, dtype=np.float64).T + np.asarray(b, dtype=np.float64)
    slack = np.maximum(0.0, 1.0 - Y * F)
    return 0.5 * ((np.asarray(W, dtype=np.float64) ** 2).sum(1) + np.asarray(b, dtype=np.float64) ** 2) + C * (
        slack**2
    ).sum(0)


def exact_line_search(xp: Any, a: Any, b: Any, F: Any, FP: Any, Y: Any, C: float) -> Any:
    """Exact minimizer ``t >= 0`` of ``phi(t) = reg(t) + C sum_i max(0, 1 - y_i (f_i + t fp_i))^2`` per column.

    ``reg(t)`` is quadratic with ``reg'(t) = a + t b``.  ``phi'`` is continuous, increasing and piecewise linear
    with breakpoints where a row enters or leaves the active set, so sorting the breakpoints and scanning the
    segments finds the root exactly.  Columns are independent: on the CPU they are searched by blocks (see
    ``column_blocks``), which keeps the temporaries small and lets a stop request come between blocks.
    """
    t = xp.zeros((F.shape[1],), F.dtype)
    for cols in xp.column_blocks(F):
        t[cols] = _segment_root(xp, a[cols], b[cols], F[:, cols], FP[:, cols], Y[:, cols], C)
    return t


def _segment_root(xp: Any, a: Any, b: Any, F: Any, FP: Any, Y: Any, C: float) -> Any:
    """:func:`exact_line_search` for one block of columns."""
    c = 1.0 - Y * F
    m = Y * FP
    active0 = (c > 0) | ((c == 0) & (m < 0))
    A0 = a - 2 * C * xp.where(active0, m * c, 0.0).sum(0)
    B0 = b + 2 * C * xp.where(active0, m * m, 0.0).sum(0)
    tb = xp.where(m != 0, c / xp.where(m != 0, m, 1.0), math.inf)
    tb = xp.where((tb > 0) & xp.isfinite(tb), tb, math.inf)
    ts, order = xp.sort0(tb)
    interrupt.raise_if_requested()  # between the steps too
    ms = xp.gather0(m, order)
    cs = xp.gather0(c, order)
    interrupt.raise_if_requested()
    finite = xp.isfinite(ts)
    # Crossing its breakpoint, a row with m > 0 leaves the active set and one with m < 0 enters it.
    sgn = xp.cast(xp.where(ms > 0, -1.0, 1.0), F.dtype) * finite
    dA = sgn * (-2 * C * ms * cs)
    dB = sgn * (2 * C * ms * ms)
    k = F.shape[1]
    zrow = xp.zeros((1, k), F.dtype)
    Acum = A0 + xp.cat0([zrow, xp.cumsum0(dA)])
    Bcum = B0 + xp.cat0([zrow, xp.cumsum0(dB)])
    interrupt.raise_if_requested()
    tlo = xp.cat0([zrow, ts])
    thi = xp.cat0([ts, xp.full((1, k), math.inf, F.dtype)])
    safe = xp.where(Bcum > 0, Bcum, 1.0)
    troot = -Acum / safe
    ok = (Bcum > 0) & (troot >= tlo) & (troot <= thi)
    interrupt.raise_if_requested()
    first = xp.argmax0(ok)
    t = xp.gather0(troot, first[None, :])[0]
    return xp.where(ok.any(0), xp.clamp(t, 0.0), 0.0)


def svm_relative_gap(xp: Any, B: Any, F: Any, alpha: Any, Y: Any, C: float, K_ya: Any) -> Any:
    """Relative duality gap ``(P - D) / P`` per column, Gram-space version.

    ``P = 0.5 beta^T K beta + C sum xi^2``; the dual point ``alpha = 2C xi`` (the KKT map of the current primal
    point) gives ``D = sum alpha - 0.5 (y*alpha)^T K (y*alpha) - sum alpha^2 / (4C)``, a lower bound on the
    optimum, so ``gap <= tol`` certifies the objective to a relative ``tol``.
    """
    xi = xp.clamp(1 - Y * F, 0)
    primal = 0.5 * (B * F).sum(0) + C * (xi * xi).sum(0)
    ya = Y * alpha
    dual = alpha.sum(0) - 0.5 * (ya * K_ya).sum(0) - (alpha * alpha).sum(0) / (4 * C)
    return (primal - dual) / xp.clamp(primal, 1e-300)
