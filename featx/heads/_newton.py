"""The feature-space finite Newton method for the linear SVM (``n > d + 1``: more rows than features).

The Newton method of :mod:`._gram` on ``w`` (with ``X~ = [X, 1]``): at each step, per class ``c`` with the active
set ``S = {i : y_i f_i < 1}``, the Newton system ``(I + 2C X~_S^T X~_S) p = -g`` and an exact line search on the
piecewise-quadratic objective.  Each class's system is solved the cheapest exact way for its active set:

* few active rows (``|S| <= min(d + 1, 10 sqrt(n))``, the usual case once the first step is taken: with 200
  classes one-vs-rest, a class's active set at the optimum is its support vectors, a few hundred rows): by the
  Woodbury identity, ``H^-1 g = g - X~_S^T (I/(2C) + X~_S X~_S^T)^-1 X~_S g``, one ``|S| x |S|`` Cholesky
  factorization from the gathered rows (``|S|^2 d`` flops), exact;
* many active rows (the first step from ``w = 0``, where every row is active, or small ``C``): conjugate
  gradients batched over those classes (each Hessian-vector product two GEMMs), preconditioned by the Cholesky
  factor of ``I + 2C rho X~^T X~``, ``rho`` the classes' median share of active rows rounded to a power of
  2^(1/4) (exact when every row is active, so the first step takes one iteration; refactorized only when the
  share moves).  When CG stalls (``d + 1 <= 4097`` and at most 16 such classes) those classes switch to forming
  and factorizing their Hessian (from the active rows, or as ``X~^T X~`` minus the inactive ones).

Known limit (measured on 15,000 x 4,096 rows in 200 overlapping classes): the first steps bring the largest
relative gap from ~3e4 to ~1e2 in under a minute, then some classes' active sets grow by a few rows per step and
the steps stall; such a fit can take many minutes.

A column is done when its relative duality gap is ``<= tol``, or when an exact full Newton step leaves its
active set unchanged (it then lands on the optimum).  Each Newton step is a stop point (``fit.iteration``); CG
iterations and per-class solves notice a stop request too.  Memory besides ``X``: a few ``n x k`` float64 arrays
(scores, labels, active sets), ``(d+1) x k`` ones (weights, gradients, directions), ``X~^T X~`` and its factor
(``2 (d+1)^2`` float64) only when some class needs CG, and per class its gathered active rows (``|S| x d``).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from featx import interrupt

from ._backend import NumpyOps
from ._blas import crossprod, rows_matmul, rows_t_matmul
from ._hinge import exact_line_search

if TYPE_CHECKING:
    from .problem import LinearProblem

logger = logging.getLogger(__name__)

# Feature-space Newton factorizes each class's (d+1) x (d+1) active-set Hessian up to this size, else uses CG.
FEATURE_DIRECT_MAX = 4097
# CG iterations per Newton step before the feature-space solver gives up on CG (see svm_feature).
CG_MAX = 200
# ... and switches to per-class factorizations, when at most this many classes need them (each costs up to
# n d^2 / 2 + d^3 / 3 flops: with hundreds of classes, more CG is cheaper).
DIRECT_MAX_CLASSES = 16


# A class's Newton system is solved through its active rows (Woodbury) when they number at most this many times
# sqrt(n) (and at most d + 1): |S|^2 d flops then cost less than ~25 batched CG iterations.
WOODBURY_SQRT_FACTOR = 10.0


def feature_precond(p: LinearProblem, C: float, share: float = 1.0) -> Any:
    """Cholesky factor of ``I + 2C share X~^T X~``, cached for the latest ``(C, share)``.

    ``share = 1`` is the full-active-set Hessian; a class whose active rows are a share ``rho`` of all rows has
    ``E[X~_S^T X~_S] = rho X~^T X~`` if they were drawn at random, so ``share = rho`` preconditions its CG.
    """
    key = (C, "feature", share)
    if p._factor_C == key and p._factor is not None:
        return p._factor
    xp = p.xp
    p._factor = None
    H = p.M * (2 * C * share)
    xp.add_diag_(H, 1.0)
    interrupt.raise_if_requested()
    L, ok = xp.cholesky(H, overwrite=True)
    if not ok and not p._M_exact:
        # Rounding in a float32 X^T X can make it slightly indefinite, which a huge C magnifies.
        p._M, p._M_exact = None, True
        H = p.M * (2 * C * share)
        xp.add_diag_(H, 1.0)
        L, ok = xp.cholesky(H, overwrite=True)
    if not ok:
        raise np.linalg.LinAlgError("I + 2C X^T X is not numerically positive definite")
    p._factor = L
    p._factor_C = key
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
    part[:d, :d] = xp.cast(crossprod(Xs) if isinstance(xp, NumpyOps) else Xs.T @ Xs, xp.f64)
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
    Wm = xp.cast(W[:-1], Xm.dtype)
    # on the CPU in row blocks that a stop request can come between
    return xp.cast(rows_matmul(Xm, Wm) if isinstance(xp, NumpyOps) else Xm @ Wm, xp.f64) + W[-1]


def xtr(p: LinearProblem, R: Any) -> Any:
    """``X~^T R`` for R (n, k) float64 (a float32 GEMM for big data, see :attr:`X_mm`)."""
    xp = p.xp
    Xm = p.X_mm
    Rm = xp.cast(R, Xm.dtype)
    top = rows_t_matmul(Xm, Rm) if isinstance(xp, NumpyOps) else xp.cast(Xm.T @ Rm, xp.f64)
    return xp.cat0([top, R.sum(0)[None, :]])


def woodbury_max(p: LinearProblem) -> int:
    """The most active rows for which a class's Newton system is solved through them (see the module)."""
    return int(min(p.d + 1, WOODBURY_SQRT_FACTOR * math.sqrt(p.n)))


def woodbury_solve(p: LinearProblem, active: Any, g: Any, C: float) -> Any:
    """``(I + 2C X~_S^T X~_S)^-1 g`` for the rows ``active`` (float64), through their ``|S| x |S|`` system."""
    xp = p.xp
    idx = xp.nonzero(active)
    if len(idx) == 0:
        return xp.copy(g)
    A = xp.cast(xp.rows(p.X_mm, idx), xp.f64)
    K = A @ A.T + 1.0
    xp.add_diag_(K, 0.5 / C)
    L, ok = xp.cholesky(K, overwrite=True)
    if not ok:
        raise np.linalg.LinAlgError("X~_S X~_S^T + I/(2C) is not numerically positive definite")
    u = xp.cholesky_solve((A @ g[:-1] + g[-1])[:, None], L)[:, 0]
    out = xp.copy(g)
    out[:-1] -= A.T @ u
    out[-1] -= u.sum()
    return out


class _Directions:
    """Newton directions ``-H_c^-1 g_c`` for the columns of one feature-space solve (see the module)."""

    def __init__(self, p: LinearProblem, C: float, g0: Any) -> None:
        self.p, self.C, self.g0 = p, C, g0
        self.cg_total = 0
        self.n_direct = 0
        self.n_woodbury = 0
        self.use_direct = False

    def __call__(self, G: Any, Sb: Any, todo: list[int]) -> tuple[Any, Any]:
        """The directions (zero outside ``todo``) and a mask of the columns solved exactly."""
        p, xp = self.p, self.p.xp
        P = xp.zeros(G.shape, xp.f64)
        exact = xp.zeros((G.shape[1],), bool)
        counts = xp.numpy(Sb.sum(0)).tolist()
        limit = woodbury_max(p)
        many = [c for c in todo if counts[c] > limit]
        for c in todo:
            if counts[c] <= limit:
                interrupt.raise_if_requested()
                P[:, c] = -woodbury_solve(p, Sb[:, c], G[:, c], self.C)
                exact[c] = True
                self.n_woodbury += 1
        if many:
            idx = xp.asarray(np.asarray(many, dtype=np.int64))
            Pm, was_exact = self._many(xp.cols(G, idx), xp.cols(Sb, idx), self.g0[idx])
            P[:, idx] = Pm
            exact[idx] = was_exact
        return P, exact

    def _many(self, G: Any, Sb: Any, g0: Any) -> tuple[Any, bool]:
        """Directions for columns with many active rows (``g0``: their gradients' norms at ``w = 0``): batched
        PCG, or per-class factorizations once CG has stalled."""
        p, xp, C = self.p, self.p.xp, self.C
        if self.use_direct:
            P = xp.zeros(G.shape, xp.f64)
            for c in range(G.shape[1]):
                interrupt.raise_if_requested()
                if bool(Sb[:, c].all()):
                    L = feature_precond(p, C)
                else:
                    L, ok = xp.cholesky(active_hessian(p, Sb[:, c], C))
                    if not ok:
                        raise np.linalg.LinAlgError("an active-set Hessian is not positive definite")
                    self.n_direct += 1
                P[:, c] = -xp.cholesky_solve(G[:, c : c + 1], L)[:, 0]
            return P, True
        # One shared factorization, for the typical share of active rows (rounded to a power of 2^(1/4), so that
        # it is refactorized only when that share moves).
        frac = float(np.median(xp.numpy(Sb.sum(0)))) / p.n
        share = 1.0 if frac >= 1.0 else float(2.0 ** (round(4 * math.log2(max(frac, 1e-6))) / 4))
        Lp = feature_precond(p, C, min(share, 1.0))
        interrupt.raise_if_requested()
        S = xp.cast(Sb, xp.f64)
        # Truncated Newton: a relative residual that tightens as the gradient shrinks.
        eta = xp.clamp(xp.clamp(xp.sqrt(xp.norm0(G) / g0), None, 0.1), 1e-6)

        def hess(V: Any) -> Any:
            return V + 2 * C * xtr(p, S * xw(p, V))

        P, n_cg = batched_pcg(xp, hess, -G, lambda R: xp.cholesky_solve(R, Lp), eta, max_iter=CG_MAX)
        self.cg_total += n_cg
        if n_cg >= CG_MAX and p.d + 1 <= FEATURE_DIRECT_MAX and G.shape[1] <= DIRECT_MAX_CLASSES:
            # Measured: at large C (many inactive rows) the full-set preconditioner stops working and CG would
            # need thousands of iterations; per-class factorizations are then far cheaper.
            logger.debug("CG stalled (C=%g); switching to per-class factorizations", C)
            self.use_direct = True
        return P, False


def svm_feature(
    p: LinearProblem, Y: Any, C: float, tol: float, max_iter: int, W0: Any
) -> tuple[Any, int, bool, float, dict[str, Any]]:
    """Minimize the squared-hinge primal for the +-1 columns of ``Y`` from ``W0`` ((d+1), k) or zero.

    Returns the weights ((d+1), k) float64, the Newton steps taken, whether every column converged, the
    objective (summed over columns) and details (CG iterations, factorizations, the largest relative gap).
    """
    xp = p.xp
    n, k = Y.shape
    W = xp.zeros((p.d + 1, k), xp.f64) if W0 is None else xp.copy(W0)
    F = xw(p, W)
    directions = _Directions(p, C, xp.clamp(xp.norm0(xtr(p, -2 * C * Y)), 1e-300))
    done = xp.zeros((k,), bool)
    converged = False
    it = 0
    gap = xp.full((k,), math.inf, xp.f64)
    for it in range(1, max_iter + 1):
        interrupt.check("fit.iteration")
        Sb = (Y * F) < 1
        xi = xp.clamp(1 - Y * F, 0)
        # Gradient w - X~^T (2C xi y); the same vector X~^T (alpha y) gives the dual point's norm.
        Wd = xtr(p, 2 * C * xi * Y)
        G = W - Wd
        primal = 0.5 * (W * W).sum(0) + C * (xi * xi).sum(0)
        dual = (2 * C * xi).sum(0) - 0.5 * (Wd * Wd).sum(0) - C * (xi * xi).sum(0)
        gap = (primal - dual) / xp.clamp(primal, 1e-300)
        done |= gap <= tol
        if bool(done.all()):
            converged = True
            it -= 1
            break
        logger.debug("Newton step %d: %d columns left, largest gap %.2e, active rows up to %d", it,
                     int((~done).sum()), float(gap.max()), int(Sb.sum(0).max()))
        P, exact = directions(G, Sb, xp.numpy(xp.nonzero(~done)).tolist())
        FP = xw(p, P)
        t = exact_line_search(xp, (W * P).sum(0), (P * P).sum(0), F, FP, Y, C)
        t = xp.where(done, 0.0, t)
        W += t * P
        F += t * FP
        # Finite termination: an exact full Newton step that leaves the active set unchanged lands on the optimum.
        done |= exact & (((Y * F) < 1) == Sb).all(0) & (abs(t - 1) <= 1e-9)
        if bool(done.all()):
            converged = True
            break
    obj = float(0.5 * (W * W).sum() + C * (xp.clamp(1 - Y * F, 0) ** 2).sum())
    detail = {"cg_iterations": directions.cg_total, "n_direct_factorizations": directions.n_direct,
              "n_woodbury_solves": directions.n_woodbury, "max_rel_gap": float(gap.max())}
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
