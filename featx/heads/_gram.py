"""The Gram-space finite Newton method for the linear SVM (``n <= d + 1``: few rows, many features).

By the representer theorem ``w = X~^T beta`` with ``K = X~ X~^T = X X^T + 1``.  The finite Newton method for
squared hinge (Keerthi & DeCoste 2005, "A modified finite Newton method for fast solution of large scale linear
SVMs"; Chapelle 2007, "Training a support vector machine in the primal"): given the active set
``S = {i : y_i f_i < 1}``, the Newton point is ``beta_N = 0, (K_SS + I/(2C)) beta_S = y_S``, followed by an
exact line search on the piecewise-quadratic objective.  It terminates in a handful of iterations.  On
pool5-like data almost every row stays active (n < d: the solution nearly interpolates the margins), so the
per-class systems are solved from ONE explicit inverse ``(K + I/(2C))^-1`` per ``C`` (shared by all classes)
corrected for the few inactive rows ``N`` with a small ``|N| x |N|`` Schur-complement solve; when a class has
more inactive rows than active ones, ``K_SS + I/(2C)`` is factorized directly instead.  From 1,500 rows on the
inverse is computed in float32 (measured ~0.55 s vs ~1.4 s in float64 at n = 3,400, 2 cores) and each Newton
system gets one step of iterative refinement against float64 residuals; a condition-number guard, a
contraction check and a step limit fall back to float64 when float32 cannot resolve the matrix.  Cost per
``C``: one n x n Cholesky + inverse; ``K`` itself is computed once per data set (:class:`~.problem.LinearProblem`).
The loop stops when the relative duality gap (primal vs. the dual point ``alpha = 2C xi``) is ``<= tol``, a
certificate.
"""
from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from featx import interrupt

from ._backend import NumpyOps
from ._blas import row_split_matmul
from ._hinge import exact_line_search, svm_relative_gap

if TYPE_CHECKING:
    from .problem import LinearProblem

logger = logging.getLogger(__name__)

# From this many rows on, the Gram solver inverts K + I/(2C) in float32 (with refinement, see svm_gram).
MIXED_PRECISION_FROM = 1500
# float32 is refused when cond(K + I/2C) may exceed this (float32 resolves ~1e-7; refinement needs margin).
FLOAT32_MAX_COND = 1e5
# Newton steps allowed with a float32 inverse before switching to float64.
FLOAT32_MAX_STEPS = 10


def gram_inverse(p: LinearProblem, C: float, dtype: Any) -> Any:
    """``(K + I/(2C))^-1`` in ``dtype``, cached for the most recent ``C`` (and precision).

    Returns None for float32 when the matrix is too ill-conditioned for it (the caller uses float64).
    """
    xp = p.xp
    key = (C, dtype)
    if p._factor_C == key and p._factor is not None:
        return p._factor
    p._factor = None  # release the previous one before allocating the next
    t0 = time.perf_counter()

    def shifted(extra: float = 0.0) -> Any:
        A = xp.copy(p.K, dtype)
        xp.add_diag_(A, 0.5 / C + extra)
        return A

    # Factorized where it lies (overwrite): the float32 path holds one n x n copy of K besides K itself.
    L, ok = xp.cholesky(shifted(), overwrite=True)
    if dtype != xp.f64:
        # (max L_ii / min L_ii)^2 is a lower bound on cond(A); refuse float32 where it cannot resolve A.
        if not ok:
            return None
        diag = abs(xp.cast(xp.diag(L), xp.f64))
        if (float(diag.max()) / max(float(diag.min()), 1e-300)) ** 2 > FLOAT32_MAX_COND:
            return None
    if not ok and not p._K_exact:
        # K + I/(2C) is positive definite in exact arithmetic, but a float32 Gram matrix carries rounding
        # errors ~1e-7 |K| that a tiny I/(2C) (huge C, rank-deficient X) cannot cover: redo K in float64.
        logger.debug("Cholesky of K + I/2C failed (C=%g); recomputing K in float64", C)
        p._K = None
        p._K_exact = True
        L, ok = xp.cholesky(shifted(), overwrite=True)
    jitter, added = 1e-12, 0.0
    mean_diag = float(xp.diag(p.K).mean()) + 0.5 / C
    while not ok and jitter < 1e-3:
        logger.warning("K + I/(2C) is numerically singular (C=%g); adding %.0e x mean(diag) to it", C, jitter)
        added += jitter * mean_diag
        L, ok = xp.cholesky(shifted(added), overwrite=True)
        jitter *= 100
    if not ok:
        raise np.linalg.LinAlgError("K + I/(2C) is not numerically positive definite")
    inv = xp.cholesky_inverse(L)
    p._factor, p._factor_C = inv, key
    logger.debug("inverse of K + I/2C (C=%g, %s) in %.2fs", C, dtype, time.perf_counter() - t0)
    return inv

def solve_active(
    p: LinearProblem,
    R: Any,
    S: Any,
    Ainv: Any,
    cols: list[int],
    gamma: float,
    cache: dict[int, Any],
) -> tuple[Any, int]:
    """``D`` with ``D_N = 0`` and ``(K_SS + gamma I) D_S = R_S`` for each column in ``cols`` (others 0).

    ``Ainv`` approximates ``(K + gamma I)^-1`` (float32 or float64).  Columns with at most as many
    inactive rows N as active ones use it with a Schur-complement correction that pins ``D_N = 0`` (a
    ``|N| x |N|`` solve); the others factorize ``K_SS + gamma I`` directly in float64.  ``cache`` keeps
    each column's gathered rows and factorization for further calls with the same ``S`` and ``Ainv``.
    """
    xp = p.xp
    K = p.K
    n = K.shape[0]
    D = xp.zeros(R.shape, xp.f64)
    U = xp.cast(Ainv @ xp.cast(S * R, Ainv.dtype), xp.f64)
    n_direct = 0
    for c in cols:
        interrupt.raise_if_requested()
        s_c = S[:, c]
        n_act = int(s_c.sum())
        if n_act == 0:
            continue
        if n_act == n:
            D[:, c] = U[:, c]
        elif n - n_act <= n_act:
            if c not in cache:
                N = xp.nonzero(~s_c)
                # Rows, not columns, of the symmetric inverse: a contiguous gather.
                AN = xp.cast(xp.rows(Ainv, N), xp.f64)
                G = xp.cols(AN, N)
                L, ok = xp.cholesky(0.5 * (G + G.T))
                cache[c] = (N, AN, L if ok else None, G)
            N, AN, L, G = cache[c]
            rhs = xp.rows(U, N)[:, c : c + 1]
            lam = xp.cholesky_solve(rhs, L) if L is not None else xp.solve(G, rhs)
            col = U[:, c] - (AN.T @ lam)[:, 0]
            col[N] = 0
            D[:, c] = col
        else:
            if c not in cache:
                Sidx = xp.nonzero(s_c)
                A = xp.cols(xp.rows(K, Sidx), Sidx)
                xp.add_diag_(A, gamma)
                L, ok = xp.cholesky(A)
                if not ok:
                    raise np.linalg.LinAlgError("K_SS + I/(2C) is not numerically positive definite")
                cache[c] = (Sidx, L)
                n_direct += 1
            Sidx, L = cache[c]
            D[Sidx, c] = xp.cholesky_solve(R[Sidx, c : c + 1], L)[:, 0]
    return D, n_direct

def kmm(p: LinearProblem, V: Any) -> Any:
    """``K @ V`` (float64); on the CPU split by rows over the solve's threads (see gram_plus_one)."""
    K = p.K
    if not isinstance(p.xp, NumpyOps) or p._workers <= 1 or K.shape[0] < 1024:
        return K @ V
    return row_split_matmul(K, V, p._workers)


def svm_gram(
    p: LinearProblem, Y: Any, C: float, tol: float, max_iter: int, B0: Any
) -> tuple[Any, int, bool, float, dict[str, Any]]:
    xp = p.xp
    n, k = Y.shape
    gamma = 0.5 / C
    # Mixed precision: a float32 inverse costs ~1/3 of a float64 one; the Newton systems are then solved
    # with one step of iterative refinement against float64 residuals.  If refinement does not contract
    # (K + I/2C too ill-conditioned for float32, e.g. duplicate rows and a large C) we switch to float64.
    inv_dtype = xp.f32 if n >= MIXED_PRECISION_FROM else xp.f64
    Ainv = gram_inverse(p, C, inv_dtype)
    if Ainv is None:
        logger.debug("K + I/2C too ill-conditioned for a float32 inverse (C=%g); using float64", C)
        Ainv = gram_inverse(p, C, xp.f64)
    assert Ainv is not None
    B = xp.zeros((n, k), xp.f64) if B0 is None else xp.copy(B0)
    F = kmm(p, B)
    done = xp.zeros((k,), bool)
    converged = False
    it = 0
    n_direct = 0
    gap = xp.full((k,), math.inf, xp.f64)
    from_zero = B0 is None
    for it in range(1, max_iter + 1):
        interrupt.check("fit.iteration")
        S = (Y * F) < 1
        Sf = xp.cast(S, xp.f64)
        B0s = B * Sf
        KB0s = None
        if not (from_zero and it == 1):  # at w = 0 the gap is never small: save the GEMM
            alpha = 2 * C * xp.clamp(1 - Y * F, 0)
            # K (Y alpha) for the gap and K B0s for the Newton residual below: one pass over K for both
            KV = kmm(p, xp.cat1([Y * alpha, B0s]))
            gap = svm_relative_gap(xp, B, F, alpha, Y, C, KV[:, :k])
            KB0s = KV[:, k:]
            done |= gap <= tol
            if bool(done.all()):
                converged = True
                it -= 1
                break
        cols = xp.nonzero(~done).tolist()
        if Ainv.dtype != xp.f64 and it > FLOAT32_MAX_STEPS:
            # The Newton method normally ends in a handful of steps; slow progress means float32 hurts.
            logger.debug("no convergence after %d steps with a float32 inverse; switching to float64", it - 1)
            Ainv = gram_inverse(p, C, xp.f64)
            assert Ainv is not None
        # Newton point for the active sets S: beta_N = 0, (K_SS + gamma I) beta_S = y_S, found as a
        # correction to the current beta restricted to S (so an approximate solve refines, not restarts).
        R = Sf * (Y - gamma * B0s) if KB0s is None else Sf * (Y - KB0s - gamma * B0s)
        cache: dict[int, Any] = {}
        D, nd = solve_active(p, R, S, Ainv, cols, gamma, cache)
        n_direct += nd
        Bhat = B0s + D
        if Ainv.dtype != xp.f64:
            R2 = Sf * (Y - kmm(p, Bhat) - gamma * Bhat)
            r1 = xp.norm0(R[:, cols])
            r2 = xp.norm0(R2[:, cols])
            if bool((r2 > 0.25 * r1 + 1e-12 * xp.norm0(Y[:, cols])).any()):
                logger.debug("float32 inverse not accurate enough (C=%g); switching to float64", C)
                Ainv = gram_inverse(p, C, xp.f64)
                assert Ainv is not None
                D, nd = solve_active(p, R, S, Ainv, cols, gamma, {})
                Bhat = B0s + D
            else:
                D2, nd = solve_active(p, R2, S, Ainv, cols, gamma, cache)
                Bhat = Bhat + D2
            n_direct += nd
        P = Bhat - B
        P[:, done] = 0
        KP = kmm(p, P)
        t = exact_line_search(xp, (B * KP).sum(0), (P * KP).sum(0), F, KP, Y, C)
        t = xp.where(done, 0.0, t)
        B += t * P
        F += t * KP
        S_new = (Y * F) < 1
        # Finite termination: a full Newton step that leaves the active set unchanged lands on the optimum.
        exact = (S_new == S).all(0) & (abs(t - 1) <= 1e-9)
        done |= exact
        if bool(done.all()):
            converged = True
            break
    obj = float(0.5 * (B * F).sum() + C * (xp.clamp(1 - Y * F, 0) ** 2).sum())
    detail = {"n_direct_factorizations": n_direct, "max_rel_gap": float(gap.max()),
              "inverse": str(Ainv.dtype).replace("torch.", "")}
    return B, it, converged, obj, detail
