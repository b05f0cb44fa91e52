"""L-BFGS on full-batch passes: softmax regression, and the streamed (bounded memory) SVM and softmax.

Softmax regression (``LogisticRegression``'s objective, intercept not penalized) and the streamed variants of
both problems use L-BFGS on full-batch objective/gradient evaluations, one pass over the chunks per evaluation.
The variables are preconditioned by a one-pass randomized Nystrom approximation of ``X~^T X~``; for the squared
hinge the stop is a relative duality gap, for the logistic losses the scaled gradient's largest entry.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.linalg

from featx import interrupt

from ._backend import FLOAT64_BELOW, NumpyOps, TorchOps, backend_for, is_tensor, lift, np64, to64
from .problem import Batches, SolveInfo

if TYPE_CHECKING:
    import torch

LOSSES = ("squared_hinge", "softmax", "binomial")


def chunk_loss_grad(kind: str, F: Any, yc: Any, C: float) -> tuple[float, Any]:
    """Loss ``C * sum_i l_i`` over one chunk and ``dLoss/dF`` (m, k), given the scores ``F`` (float64).

    Works on numpy arrays (CPU) and torch tensors (other devices) alike.
    """
    xp_torch = is_tensor(F)
    if xp_torch:
        import torch
    if kind == "squared_hinge":
        Y = yc  # +-1 matrix (m, k')
        xi = 1 - Y * F
        xi = xi.clamp(min=0) if xp_torch else np.maximum(xi, 0)
        return float(C * (xi * xi).sum()), -2 * C * Y * xi
    if kind == "binomial":
        y = yc[:, 0]  # +-1
        z = -y * F[:, 0]
        if xp_torch:
            loss = float(torch.nn.functional.softplus(z).sum())
            sig = torch.sigmoid(z)
        else:
            loss = float(np.logaddexp(0.0, z).sum())
            sig = np.exp(-np.logaddexp(0.0, -z))
        return C * loss, C * (-y * sig)[:, None]
    # softmax: yc holds class indices (m, 1)
    idx = yc[:, 0]
    rows = torch.arange(len(idx), device=F.device) if xp_torch else np.arange(len(idx))
    if xp_torch:
        logp = torch.log_softmax(F, dim=1)
        G = torch.exp(logp)
    else:
        Fm = F - F.max(axis=1, keepdims=True)
        logp = Fm - np.log(np.exp(Fm).sum(axis=1, keepdims=True))
        G = np.exp(logp)
    loss = -float(logp[rows, idx].sum())
    G[rows, idx] -= 1
    return C * loss, C * G


# Below this many matrix entries (rows x features) the L-BFGS passes use float64 products: cheap there, and


def device_chunks(
    batches: Batches, encode: Callable[[np.ndarray], np.ndarray], xp: NumpyOps | TorchOps, dtype: type
) -> Iterator[tuple[Any, Any]]:
    """Chunks as numpy arrays of ``dtype`` (CPU: numpy's BLAS, no torch) or tensors on ``xp``'s device."""
    for Xc, yc in batches():
        y_enc = encode(np.asarray(yc))
        if isinstance(xp, NumpyOps):
            yield np.asarray(Xc, dtype=dtype), y_enc
        else:
            tdt = xp.f64 if dtype == np.float64 else xp.f32
            yield xp.asarray(np.asarray(Xc), tdt), xp.asarray(y_enc)


def nystrom_sketch(
    batches: Batches, n_features: int, rank: int, device: str | torch.device, dtype: type, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``rank`` eigenpairs of ``X~^T X~`` (``X~ = [X, 1]``) from ONE pass: randomized Nystrom approximation.

    Follows Frangella, Tropp & Udell (2023), "Randomized Nystrom preconditioning", Algorithm 2.1: accumulate
    ``X~^T (X~ Omega)`` for an orthonormal test matrix ``Omega`` ((d+1) x rank), then a small Cholesky and SVD.
    Memory: (d+1) x rank, whatever the number of rows.  Returns ``(U, lam)``, ``U`` orthonormal columns,
    ``lam`` descending and non-negative.
    """
    d1 = n_features + 1
    rank = max(1, min(rank, d1))
    rng = np.random.default_rng(seed)
    Omega, _ = np.linalg.qr(rng.standard_normal((d1, rank)))
    Ysk = np.zeros((d1, rank))
    for Xa, _y in device_chunks(batches, lambda y: y, backend_for(device), dtype):
        Om = lift(Omega[:-1], Xa)
        T = to64(Xa @ Om)
        T = T + (lift(Omega[-1], T) if is_tensor(T) else Omega[-1])
        Ysk[:-1] += np64(Xa.T @ (T.to(Xa.dtype) if is_tensor(T) else T.astype(Xa.dtype)))
        Ysk[-1] += np64(T.sum(0))
    nu = np.sqrt(d1) * np.finfo(np.float64).eps * max(np.linalg.norm(Ysk, 2), 1e-300)
    Ynu = Ysk + nu * Omega
    core = Omega.T @ Ynu
    core = 0.5 * (core + core.T)
    try:
        Lc = np.linalg.cholesky(core)
    except np.linalg.LinAlgError:
        Lc = np.linalg.cholesky(core + 1e-8 * np.trace(core) / rank * np.eye(rank))
    B = scipy.linalg.solve_triangular(Lc, Ynu.T, lower=True).T
    U, sig, _ = np.linalg.svd(B, full_matrices=False)
    lam = np.maximum(sig**2 - nu, 0.0)
    return U, lam


class _Preconditioner:
    """The symmetric map ``T = U diag(s_top) U^T + s_rest (I - U U^T)`` approximating ``(I + c X~^T X~)^(-1/2)``.

    ``U, lam``: a rank-``rank`` Nystrom approximation of ``X~^T X~`` (one pass); ``c`` is the loss curvature
    (``2C`` for squared hinge, ``C/4`` for logistic).  Rank 0 is the identity.
    """

    def __init__(self, batches: Batches, d: int, rank: int, curv: float, device: Any, dtype: type) -> None:
        d1 = d + 1
        self.rank = rank
        if rank > 0:
            self.U, lam = nystrom_sketch(batches, d, rank, device, dtype)
            self.s_top = 1.0 / np.sqrt(1.0 + curv * lam)
            self.s_rest = 1.0 / np.sqrt(1.0 + curv * lam[-1]) if rank < d1 else 1.0
        else:
            self.U, self.s_top, self.s_rest = np.zeros((d1, 0)), np.zeros(0), 1.0

    def apply(self, V: np.ndarray) -> np.ndarray:
        """``T V``."""
        UtV = self.U.T @ V
        return self.s_rest * V + self.U @ ((self.s_top - self.s_rest)[:, None] * UtV)

    def inverse(self, W: np.ndarray) -> np.ndarray:
        """``T^-1 W``: a point expressed in the preconditioned variables."""
        UtW = self.U.T @ W
        return W / self.s_rest + self.U @ ((1 / self.s_top - 1 / self.s_rest)[:, None] * UtW)


class _Objective:
    """``(reg + C * sum_i loss_i) / (C n)`` and its gradient in the preconditioned variables, one pass per call.

    Keeps, from the latest call, the relative duality gap (squared hinge) and the scaled gradient's largest
    entry on the original problem, which decide the stop.
    """

    def __init__(self, batches: Batches, kind: str, n_out: int, d: int, C: float, n_rows: int, xp: Any,
                 dtype: type, encode: Callable[[np.ndarray], np.ndarray], T: _Preconditioner) -> None:
        self.batches, self.kind, self.n_out, self.d, self.C = batches, kind, n_out, d, C
        self.xp, self.dtype, self.encode, self.T = xp, dtype, encode, T
        self.reg_b = kind == "squared_hinge"
        self.scale = 1.0 / (C * max(n_rows, 1))
        self.n_eval = 0
        self.last_gap = math.inf
        self.last_gmax = math.inf

    def _pass(self, W: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """Loss and its gradient in ``W`` and ``b``, one pass over the chunks."""
        loss = 0.0
        gW = np.zeros((self.d, self.n_out))
        gb = np.zeros(self.n_out)
        Wc = None
        for Xa, ya in device_chunks(self.batches, self.encode, self.xp, self.dtype):
            interrupt.raise_if_requested()
            if Wc is None:
                Wc = lift(W, Xa)
                bc = lift(b, to64(Xa[:1, :1]))
            F = to64(Xa @ Wc) + bc
            lc, G = chunk_loss_grad(self.kind, F, ya, self.C)
            loss += lc
            Gc = G.to(Xa.dtype) if is_tensor(G) else G.astype(Xa.dtype)
            gW += np64(Xa.T @ Gc)
            gb += np64(G.sum(0))
        return loss, gW, gb

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        self.n_eval += 1
        d = self.d
        Wb = self.T.apply(theta.reshape(d + 1, self.n_out))
        W, b = Wb[:d], Wb[d]
        loss, gW, gb = self._pass(W, b)
        reg = 0.5 * float((W * W).sum()) + (0.5 * float((b * b).sum()) if self.reg_b else 0.0)
        if self.kind == "squared_hinge":
            # The dual point alpha = 2C xi gives w_dual = X~^T (alpha y) = -(gW, gb) and loss = sum alpha^2/(4C);
            # sum_i alpha_i (1 - y_i f_i) = 2 loss and sum_i alpha_i y_i f_i = w . w_dual, so
            # sum alpha = 2 loss - (W . gW + b . gb), and D = sum alpha - 0.5 ||w_dual||^2 - loss.
            wd2 = float((gW * gW).sum() + (gb * gb).sum())
            sum_alpha = 2 * loss - float((W * gW).sum() + (b * gb).sum())
            primal = reg + loss
            dual = sum_alpha - 0.5 * wd2 - loss
            self.last_gap = (primal - dual) / max(primal, 1e-300)
        gW = gW + W
        if self.reg_b:
            gb = gb + b
        raw = np.concatenate([gW, gb[None, :]], 0)
        self.last_gmax = float(np.abs(raw).max()) * self.scale
        return (reg + loss) * self.scale, self.T.apply(raw).ravel() * self.scale

    def converged(self, tol: float) -> bool:
        """Judged on the ORIGINAL problem: the preconditioned gradient is shrunk by T and would pass any gtol
        long before the optimum."""
        return self.last_gap <= tol if self.kind == "squared_hinge" else self.last_gmax <= tol


def lbfgs_linear(
    batches: Batches,
    kind: str,
    n_out: int,
    n_features: int,
    C: float,
    *,
    n_rows: int,
    tol: float,
    max_iter: int,
    device: str | torch.device,
    encode: Callable[[np.ndarray], np.ndarray],
    W0: np.ndarray | None = None,
    precond_rank: int = 256,
) -> tuple[np.ndarray, np.ndarray, SolveInfo]:
    """Minimize ``reg(W, b) + C * sum_i loss_i`` by preconditioned L-BFGS, one pass over ``batches()`` per evaluation.

    ``kind`` is ``"squared_hinge"`` (LinearSVC's problem; the intercept is a regularized weight),
    ``"softmax"`` or ``"binomial"`` (LogisticRegression's problems; the intercept is not regularized).
    ``encode`` maps a chunk's class indices to what :func:`chunk_loss_grad` expects.

    Conditioning: features of CNNs are strongly correlated, so plain L-BFGS crawls.  One extra pass builds a
    rank-``precond_rank`` Nystrom approximation ``U diag(lam) U^T`` of ``X~^T X~`` and L-BFGS runs on
    ``W = T V`` with ``T = (I + c X~^T X~)^(-1/2)`` approximated from it (``c`` = the loss curvature: ``2C``
    for squared hinge, ``C/4`` for logistic), which flattens the top of the Hessian's spectrum.

    Precision: float32 products for big data (the features' own precision), float64 below
    ``FLOAT64_BELOW`` entries; sums, parameters and L-BFGS in float64.  Memory: parameters, 10 L-BFGS
    correction pairs, the (d+1) x rank sketch and one chunk, whatever the number of rows.  Stopping: the
    scaled (divided by ``C * n_rows``, as scikit-learn does) gradient's largest entry ``<= tol``; for squared
    hinge instead a relative duality gap ``<= tol`` (computed for free from the gradient pass).  A stop request
    (SIGINT, SIGTERM) is noticed after every iteration and between chunks, without counting a stop point.
    """
    d1 = n_features + 1
    t0 = time.perf_counter()
    dtype = np.float64 if n_rows * n_features <= FLOAT64_BELOW else np.float32
    rank = min(int(precond_rank), d1)
    curv = 2 * C if kind == "squared_hinge" else C / 4
    T = _Preconditioner(batches, n_features, rank, curv, device, dtype)
    fun = _Objective(batches, kind, n_out, n_features, C, n_rows, backend_for(device), dtype, encode, T)

    def callback(intermediate_result: Any) -> None:
        # Uncounted: a search's folds take hundreds of iterations, too many to name as stop moments.
        interrupt.raise_if_requested("fit.iteration")
        if fun.converged(tol):
            raise StopIteration

    x0 = np.zeros(d1 * n_out) if W0 is None else T.inverse(np.asarray(W0, dtype=np.float64).reshape(d1, n_out)).ravel()
    import scipy.optimize  # ~0.5-1 s of imports, paid only by the L-BFGS solvers

    res = scipy.optimize.minimize(
        fun,
        x0,
        jac=True,
        method="L-BFGS-B",
        callback=callback,
        options={"maxiter": max_iter, "gtol": 0.0, "ftol": 64 * np.finfo(float).eps, "maxcor": 10},
    )
    Wb = T.apply(res.x.reshape(d1, n_out))
    # scipy reports a stop by our callback as a failure; ftol's "no more progress" is a success.
    converged = fun.converged(tol) or bool(res.success)
    detail = {"passes": fun.n_eval + (1 if rank > 0 else 0), "message": str(res.message), "precond_rank": rank,
              "rel_gap": fun.last_gap if kind == "squared_hinge" else None}
    info = SolveInfo("lbfgs", int(res.nit), time.perf_counter() - t0, float(res.fun) / fun.scale, converged, detail)
    return Wb[:n_features].T.copy(), Wb[n_features].copy(), info
