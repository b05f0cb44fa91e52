"""The feature-space finite Newton method for the linear SVM (``n > d + 1``: more rows than features).

The same Newton method as :mod:`._gram` on ``w`` with the Newton systems ``(I + 2C X~_S^T X~_S) p = -g``, first
solved inexactly by conjugate gradients batched over all classes (each Hessian-vector product two GEMMs),
preconditioned by the Cholesky factor of the full-active-set Hessian ``I + 2C X~^T X~``: fast at small ``C``.
At large ``C`` many rows leave the active set and that preconditioner stops working; when CG stalls (and
``d + 1 <= 4097``) the solver switches to forming and factorizing each class's Hessian (from the active rows,
or as ``X~^T X~`` minus the inactive ones).  The loop stops when the relative duality gap is ``<= tol``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from featx import interrupt

from ._hinge import exact_line_search

if TYPE_CHECKING:
    from .problem import LinearProblem

logger = logging.getLogger(__name__)

# Feature-space Newton factorizes each class's (d+1) x (d+1) active-set Hessian up to this size, else uses CG.
FEATURE_DIRECT_MAX = 4097
# CG iterations per Newton step before the feature-space solver gives up on CG (see svm_feature).
CG_MAX = 200


def feature_precond(p: LinearProblem, C: float) -> Any:
    """Cholesky factor of the full-active-set Hessian ``I + 2C X~^T X~``, cached for the latest ``C``."""
    if p._factor_C == (C, "feature") and p._factor is not None:
        return p._factor
    xp = p.xp
    p._factor = None
    H = p.M * (2 * C)
    xp.add_diag_(H, 1.0)
    L, ok = xp.cholesky(H)
    if not ok and not p._M_exact:
        # Rounding in a float32 X^T X can make it slightly indefinite, which a huge C magnifies.
        p._M, p._M_exact = None, True
        H = p.M * (2 * C)
        xp.add_diag_(H, 1.0)
        L, ok = xp.cholesky(H)
    if not ok:
        raise np.linalg.LinAlgError("I + 2C X^T X is not numerically positive definite")
    p._factor = L
    p._factor_C = (C, "feature")
    return p._factor

def active_hessian(p: LinearProblem, active: Any, C: float) -> Any:
    """``I + 2C X~_S^T X~_S`` (float64) for the rows ``active``, from the rows themselves or as ``M``
    minus the inactive rows, whichever set is smaller."""
    xp = p.xp
    n_act = int(active.sum())
    use_active = n_act <= p.n - n_act
    idx = xp.nonzero(active if use_active else ~active)
    Xs = xp.rows(p.X_mm, idx)
    d = p.d
    part = xp.zeros((d + 1, d + 1), xp.f64)
    part[:d, :d] = xp.cast(Xs.T @ Xs, xp.f64)
    colsum = xp.colsum64(Xs)
    part[:d, d] = colsum
    part[d, :d] = colsum
    part[d, d] = float(len(idx))
    H = part if use_active else p.M - part
    H *= 2 * C
    xp.add_diag_(H, 1.0)
    return H

def xw(p: LinearProblem, W: Any) -> Any:
    """``X~ W`` for W ((d+1), k) float64 (a float32 GEMM for big data, see :attr:`X_mm`)."""
    xp = p.xp
    Xm = p.X_mm
    return xp.cast(Xm @ xp.cast(W[:-1], Xm.dtype), xp.f64) + W[-1]

def xtr(p: LinearProblem, R: Any) -> Any:
    """``X~^T R`` for R (n, k) float64 (a float32 GEMM for big data, see :attr:`X_mm`)."""
    xp = p.xp
    Xm = p.X_mm
    top = xp.cast(Xm.T @ xp.cast(R, Xm.dtype), xp.f64)
    return xp.cat0([top, R.sum(0)[None, :]])

def svm_feature(
    p: LinearProblem, Y: Any, C: float, tol: float, max_iter: int, W0: Any
) -> tuple[Any, int, bool, float, dict[str, Any]]:
    xp = p.xp
    n, k = Y.shape
    d1 = p.d + 1
    Lp = feature_precond(p, C)
    W = xp.zeros((d1, k), xp.f64) if W0 is None else xp.copy(W0)
    F = xw(p, W)
    g0 = xp.clamp(xp.norm0(xtr(p, -2 * C * Y)), 1e-300)
    converged = False
    cg_total = 0
    n_direct = 0
    use_direct = False
    it = 0
    gap = xp.full((k,), math.inf, xp.f64)
    for it in range(1, max_iter + 1):
        interrupt.check("fit.iteration")
        Sb = (Y * F) < 1
        S = xp.cast(Sb, xp.f64)
        xi = xp.clamp(1 - Y * F, 0)
        # Gradient w - X~^T (2C xi y); the same vector X~^T (alpha y) gives the dual point's norm.
        Wd = xtr(p, 2 * C * xi * Y)
        G = W - Wd
        primal = 0.5 * (W * W).sum(0) + C * (xi * xi).sum(0)
        dual = (2 * C * xi).sum(0) - 0.5 * (Wd * Wd).sum(0) - C * (xi * xi).sum(0)
        gap = (primal - dual) / xp.clamp(primal, 1e-300)
        if bool((gap <= tol).all()):
            converged = True
            it -= 1
            break
        done = gap <= tol
        if use_direct:
            # Exact Newton: factorize each class's active-set Hessian (d+1 small enough).
            P = xp.zeros(G.shape, xp.f64)
            for c in xp.nonzero(~done).tolist():
                interrupt.raise_if_requested()
                if bool(Sb[:, c].all()):
                    L = Lp
                else:
                    L, ok = xp.cholesky(active_hessian(p, Sb[:, c], C))
                    if not ok:
                        raise np.linalg.LinAlgError("an active-set Hessian is not positive definite")
                    n_direct += 1
                P[:, c] = -xp.cholesky_solve(G[:, c : c + 1], L)[:, 0]
        else:
            gnorm = xp.norm0(G)
            # Truncated Newton: solve (I + 2C X~_S^T X~_S) P = -G by preconditioned CG, all columns at
            # once, to a relative residual that tightens as the gradient shrinks.
            eta = xp.clamp(xp.clamp(xp.sqrt(gnorm / g0), None, 0.1), 1e-6)

            def hess(V: Any, S: Any = S) -> Any:
                return V + 2 * C * xtr(p, S * xw(p, V))

            P, n_cg = batched_pcg(xp, hess, -G, lambda R: xp.cholesky_solve(R, Lp), eta, max_iter=CG_MAX)
            cg_total += n_cg
            P[:, done] = 0
            if n_cg >= CG_MAX and d1 <= FEATURE_DIRECT_MAX:
                # Measured: at large C (many inactive rows) the full-set preconditioner stops working and CG
                # would need thousands of iterations; per-class factorizations are then far cheaper.
                logger.debug("CG stalled (C=%g); switching to per-class factorizations", C)
                use_direct = True
        FP = xw(p, P)
        t = exact_line_search(xp, (W * P).sum(0), (P * P).sum(0), F, FP, Y, C)
        W += t * P
        F += t * FP
    obj = float(0.5 * (W * W).sum() + C * (xp.clamp(1 - Y * F, 0) ** 2).sum())
    detail = {"cg_iterations": cg_total, "n_direct_factorizations": n_direct, "max_rel_gap": float(gap.max())}
    return W, it, converged, obj, detail


def batched_pcg(
    xp: Any,
    matvec: Callable[[Any], Any],
    Bm: Any,
    precond: Callable[[Any], Any],
    rtol: Any,
    max_iter: int,
) -> tuple[Any, int]:
    """Preconditioned CG on the columns of ``Bm`` at once (one matvec per iteration for all columns)."""
    X = xp.zeros(Bm.shape, Bm.dtype)
    R = xp.copy(Bm)
    Z = precond(R)
    P = xp.copy(Z)
    rz = (R * Z).sum(0)
    bnorm = xp.clamp(xp.norm0(Bm), 1e-300)
    it = 0
    while it < max_iter:
        it += 1
        interrupt.raise_if_requested()
        AP = matvec(P)
        pap = (P * AP).sum(0)
        alpha = xp.where(pap > 0, rz / xp.where(pap > 0, pap, 1.0), 0.0)
        X += alpha * P
        R -= alpha * AP
        if bool((xp.norm0(R) <= rtol * bnorm).all()):
            break
        Z = precond(R)
        rz_new = (R * Z).sum(0)
        beta = xp.where(rz > 0, rz_new / xp.where(rz > 0, rz, 1.0), 0.0)
        rz = rz_new
        P = Z + beta * P
    return X, it
