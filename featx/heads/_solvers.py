"""Numerical solvers behind :mod:`featx.heads`: L2-regularized squared-hinge SVMs and softmax regression.

Nothing here is public API; the heads of :mod:`featx.heads` wrap it in scikit-learn estimators.

The linear SVM problem (per one-vs-rest column ``c`` with labels ``y`` in {-1, +1}) is exactly LIBLINEAR's /
``sklearn.svm.LinearSVC``'s default::

    P(w) = 0.5 * ||w||^2 + C * sum_i max(0, 1 - y_i * w . [x_i, 1])^2

with the intercept as the weight of a constant feature 1 that is regularized like the others
(``intercept_scaling=1``).  Two exact solvers are used, picked by the shape of the data:

* ``n <= d + 1`` (few rows, many features, e.g. 4,000 pool5 rows of 9,216 floats): the **Gram space**.  By the
  representer theorem ``w = X~^T beta`` with ``K = X~ X~^T = X X^T + 1``.  We run the finite Newton method for
  squared hinge (Keerthi & DeCoste 2005, "A modified finite Newton method for fast solution of large scale
  linear SVMs"; Chapelle 2007, "Training a support vector machine in the primal"): given the active set
  ``S = {i : y_i f_i < 1}``, the Newton point is ``beta_N = 0, (K_SS + I/(2C)) beta_S = y_S``, followed by an
  exact line search on the piecewise-quadratic objective.  It terminates in a handful of iterations.  On
  pool5-like data almost every row stays active (n < d: the solution nearly interpolates the margins), so the
  per-class systems are solved from ONE explicit inverse ``(K + I/(2C))^-1`` per ``C`` (shared by all classes)
  corrected for the few inactive rows ``N`` with a small ``|N| x |N|`` Schur-complement solve; when a class has
  more inactive rows than active ones, ``K_SS + I/(2C)`` is factorized directly instead.  From 1,500 rows on
  the inverse is computed in float32 (measured ~0.55 s vs ~1.4 s in float64 at n = 3,400, 2 cores) and
  each Newton system gets one step of iterative refinement against float64 residuals; a condition-number
  guard, a contraction check and a step limit fall back to float64 when float32 cannot resolve the matrix.
  Cost per ``C``: one n x n Cholesky + inverse; ``K`` itself is computed once per data set
  (:class:`LinearProblem`).  The loop stops when the
  relative duality gap (primal vs. the dual point ``alpha = 2C xi``) is ``<= tol``, a certificate.
* ``n > d + 1``: the **feature space**.  Same Newton method on ``w`` with the Newton systems
  ``(I + 2C X~_S^T X~_S) p = -g``, first solved inexactly by conjugate gradients batched over all classes
  (each Hessian-vector product two GEMMs), preconditioned by the Cholesky factor of the full-active-set
  Hessian ``I + 2C X~^T X~``: fast at small ``C``.  At large ``C`` many rows leave the active set and that
  preconditioner stops working; when CG stalls (and ``d + 1 <= 4097``) the solver switches to forming and
  factorizing each class's Hessian (from the active rows, or as ``X~^T X~`` minus the inactive ones).

Small problems (n x d <= 2e7 entries) use float64 products everywhere; big ones float32 products (the
features' own precision) with float64 parameters and sums.

Softmax regression (``LogisticRegression``'s objective, intercept not penalized) and the streamed (bounded
memory) variants of both problems use L-BFGS on full-batch objective/gradient evaluations, one pass over the
chunks per evaluation.  For the squared hinge the L-BFGS variables are preconditioned by a one-pass
randomized Nystrom approximation of ``X~^T X~`` and the stop is again a relative duality gap.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.linalg

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Batches = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


# -- array back-ends ---------------------------------------------------------------------------------------------
# The solvers are written once against the small set of operations below.  On the CPU they run on numpy and
# scipy's LAPACK, so that `featx fit svm` never imports torch (2-4 s of start-up); on a CUDA device the same code
# runs on torch tensors.


def _is_tensor(a: Any) -> bool:
    """True for a torch tensor, without importing torch."""
    return type(a).__module__.startswith("torch")


class _NumpyOps:
    """numpy arrays and scipy's LAPACK: the CPU back-end."""

    name = "numpy"
    device_type = "cpu"
    f32 = np.dtype(np.float32)
    f64 = np.dtype(np.float64)

    def asarray(self, a: Any, dtype: Any = None) -> np.ndarray:
        return np.asarray(a, dtype=dtype)

    def numpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def cast(self, a: np.ndarray, dtype: Any) -> np.ndarray:
        return a.astype(dtype, copy=False)

    def copy(self, a: np.ndarray, dtype: Any = None) -> np.ndarray:
        return a.astype(a.dtype if dtype is None else dtype, copy=True)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def full(self, shape: tuple[int, ...], value: float, dtype: Any) -> np.ndarray:
        return np.full(shape, value, dtype=dtype)

    def where(self, cond: Any, a: Any, b: Any) -> np.ndarray:
        return np.where(cond, a, b)

    def clamp(self, a: Any, lo: float | None = None, hi: float | None = None) -> Any:
        return np.clip(a, lo, hi)

    def sqrt(self, a: Any) -> Any:
        return np.sqrt(a)

    def isfinite(self, a: Any) -> Any:
        return np.isfinite(a)

    def sort0(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(a, axis=0)
        return np.take_along_axis(a, order, 0), order

    def gather0(self, a: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a, idx, 0)

    def cumsum0(self, a: np.ndarray) -> np.ndarray:
        return np.cumsum(a, axis=0)

    def cat0(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts, axis=0)

    def cat1(self, parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts, axis=1)

    def argmax0(self, a: np.ndarray) -> np.ndarray:
        return np.argmax(a, axis=0)

    def norm0(self, a: np.ndarray) -> np.ndarray:
        return np.sqrt(np.einsum("ij,ij->j", a, a)) if a.ndim == 2 else np.linalg.norm(a, axis=0)

    def nonzero(self, mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask)

    def rows(self, a: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return a[idx]

    def cols(self, a: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return a[:, idx]

    def diag(self, a: np.ndarray) -> np.ndarray:
        return np.diagonal(a)

    def add_diag_(self, a: np.ndarray, value: float) -> None:
        n = a.shape[0]
        a.flat[:: n + 1] += value

    def colsum64(self, a: np.ndarray) -> np.ndarray:
        return a.sum(0, dtype=np.float64)

    def cholesky(self, a: np.ndarray, *, overwrite: bool = False) -> tuple[np.ndarray, bool]:
        """Lower Cholesky factor and whether the factorization succeeded (no exception, as torch's _ex).

        ``overwrite``: ``a`` (symmetric) may be destroyed, and holds the factor when ``a`` is contiguous (no copy).
        """
        if overwrite and a.flags.c_contiguous:
            a = a.T  # the same symmetric matrix in Fortran order, which LAPACK factorizes where it lies
        try:
            return scipy.linalg.cholesky(a, lower=True, overwrite_a=overwrite, check_finite=False), True
        except np.linalg.LinAlgError:
            return a, False

    def cholesky_solve(self, b: np.ndarray, L: np.ndarray) -> np.ndarray:
        return scipy.linalg.cho_solve((L, True), b, check_finite=False)

    def cholesky_inverse(self, L: np.ndarray) -> np.ndarray:
        """``(L L^T)^-1``, written over ``L``."""
        potri = scipy.linalg.get_lapack_funcs("potri", (L,))
        inv, info = potri(L, lower=1, overwrite_c=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"LAPACK potri failed (info={info})")
        # potri fills the lower triangle and leaves the upper one as it was: zero, since scipy's cholesky
        # cleans it.  Mirror it in place, block by block (no n x n temporary).
        n = inv.shape[0]
        step = 512
        for a in range(0, n, step):
            blk = inv[a : a + step, a : a + step]
            blk += np.tril(blk, -1).T
            for b in range(a + step, n, step):
                inv[a : a + step, b : b + step] = inv[b : b + step, a : a + step].T
        # Symmetric: hand it over in C order (the transposed view of a Fortran-ordered result), so that gathering
        # its rows (see _solve_active) reads contiguous memory.
        return inv.T if not inv.flags.c_contiguous else inv

    def solve(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.linalg.solve(a, b)


class _TorchOps:
    """torch tensors on an accelerator: the same operations as :class:`_NumpyOps`."""

    name = "torch"

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.device_type = device.type
        self.f32 = torch.float32
        self.f64 = torch.float64

    def asarray(self, a: Any, dtype: Any = None) -> torch.Tensor:
        return self.torch.as_tensor(a, dtype=dtype, device=self.device)

    def numpy(self, a: torch.Tensor) -> np.ndarray:
        return a.detach().cpu().numpy()

    def cast(self, a: torch.Tensor, dtype: Any) -> torch.Tensor:
        return a.to(dtype)

    def copy(self, a: torch.Tensor, dtype: Any = None) -> torch.Tensor:
        return a.to(a.dtype if dtype is None else dtype, copy=True)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> torch.Tensor:
        return self.torch.zeros(shape, dtype=dtype, device=self.device)

    def full(self, shape: tuple[int, ...], value: float, dtype: Any) -> torch.Tensor:
        return self.torch.full(shape, value, dtype=dtype, device=self.device)

    def where(self, cond: Any, a: Any, b: Any) -> torch.Tensor:
        t = self.torch
        like = a if isinstance(a, t.Tensor) else b if isinstance(b, t.Tensor) else None
        if like is None:  # two scalars: torch would make float32
            a = t.tensor(a, dtype=t.float64, device=cond.device)
        return t.where(cond, a, b)

    def clamp(self, a: Any, lo: float | None = None, hi: float | None = None) -> Any:
        return a.clamp(min=lo, max=hi)

    def sqrt(self, a: Any) -> Any:
        return self.torch.sqrt(a)

    def isfinite(self, a: Any) -> Any:
        return self.torch.isfinite(a)

    def sort0(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.torch.sort(a, dim=0)

    def gather0(self, a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.torch.gather(a, 0, idx)

    def cumsum0(self, a: torch.Tensor) -> torch.Tensor:
        return self.torch.cumsum(a, 0)

    def cat0(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return self.torch.cat(parts, 0)

    def cat1(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return self.torch.cat(parts, 1)

    def argmax0(self, a: torch.Tensor) -> torch.Tensor:
        return self.torch.argmax(a.to(self.torch.int8), dim=0)

    def norm0(self, a: torch.Tensor) -> torch.Tensor:
        return self.torch.linalg.vector_norm(a, dim=0)

    def nonzero(self, mask: torch.Tensor) -> torch.Tensor:
        return self.torch.nonzero(mask).flatten()

    def rows(self, a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return a.index_select(0, idx)

    def cols(self, a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return a.index_select(1, idx)

    def diag(self, a: torch.Tensor) -> torch.Tensor:
        return a.diagonal()

    def add_diag_(self, a: torch.Tensor, value: float) -> None:
        a.diagonal().add_(value)

    def colsum64(self, a: torch.Tensor) -> torch.Tensor:
        return a.sum(0, dtype=self.torch.float64)

    def cholesky(self, a: torch.Tensor, *, overwrite: bool = False) -> tuple[torch.Tensor, bool]:
        L, info = self.torch.linalg.cholesky_ex(a)
        return L, int(info) == 0

    def cholesky_solve(self, b: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        return self.torch.cholesky_solve(b, L)

    def cholesky_inverse(self, L: torch.Tensor) -> torch.Tensor:
        return self.torch.cholesky_inverse(L)

    def solve(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.torch.linalg.solve(a, b)


_NUMPY = _NumpyOps()


def backend_for(device: Any) -> _NumpyOps | _TorchOps:
    """The back-end for ``device``: numpy on ``"cpu"`` (no torch import), torch tensors elsewhere.

    Refuses CUDA when it is not available, with a :class:`~featx.errors.UsageError`.
    """
    if str(device) == "cpu":
        return _NUMPY
    return _TorchOps(resolve_device(device))


# -- CPU threads ---------------------------------------------------------------------------------------------------
# OpenBLAS's own threads synchronize at many points inside one call (a Cholesky of 3,400 rows has hundreds): when any
# of them waits for a core, all wait.  Measured on 2 cores at load ~4: a float32 Cholesky of 3,400 rows took 0.46 s
# with one BLAS thread and 8.6 s with two.  A quiet machine may suffer too (not measured here): numpy and scipy
# each bring their own OpenBLAS, whose idle threads spin for a while after each call, and the Gram solver alternates
# numpy products with scipy factorizations; on a quiet 2-core machine `featx fit svm` took 8-11 s of wall and about
# as much CPU time for ~3 s of single-threaded work.  So the Gram solver on the CPU runs its BLAS calls with one
# thread fewer than configured (one on 2 cores: the process's other threads, such as the plot import that
# `featx fit` starts beside the solver, keep a core), and computes its one big product, the Gram matrix, as
# independent tiles on Python threads (numpy releases the GIL), each a single-threaded BLAS call: all the
# configured cores, and no synchronization but the final join.


_controller: Any = None


def _threadpools() -> Any:
    """threadpoolctl's view of the BLAS libraries loaded (numpy's and scipy's), found once."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController().select(user_api="blas")
    return _controller


def blas_threads() -> int:
    """The BLAS threads configured now (``OPENBLAS_NUM_THREADS``, ``threadpool_limits``...): numpy's or scipy's, the most."""
    return max([int(i.get("num_threads") or 1) for i in _threadpools().info()], default=1)


_limit_lock = threading.Lock()
_limit_requests: list[int] = []  # the limits in force, from every thread (fits may run on several)
_limit_original: list[int] = []


@contextlib.contextmanager
def _blas_limit(n: int) -> Iterator[None]:
    """A context in which numpy's and scipy's BLAS use at most ``n`` threads.

    Safe when fits run on several threads at once: the strictest limit in force applies, and the thread counts
    found before the first one are restored when the last one ends (threadpoolctl's own contexts, each restoring
    what it found, could leave BLAS limited for good when they interleave).
    """
    global _limit_original
    n = max(1, int(n))
    libs = _threadpools().lib_controllers

    def apply() -> None:
        cap = min(_limit_requests) if _limit_requests else None
        for lib, original in zip(libs, _limit_original):
            lib.set_num_threads(original if cap is None else min(original, cap))

    with _limit_lock:
        if not _limit_requests:
            _limit_original = [int(lib.num_threads) for lib in libs]
        _limit_requests.append(n)
        apply()
    try:
        yield
    finally:
        with _limit_lock:
            _limit_requests.remove(n)
            apply()


def _run_threads(tasks: list[Callable[[], None]], workers: int) -> None:
    """Run ``tasks`` (in order of submission, largest first) on ``workers`` threads; re-raise the first error."""
    todo = iter(tasks)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while not errors:
            with lock:
                task = next(todo, None)
            if task is None:
                return
            try:
                task()
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                errors.append(e)

    threads = [threading.Thread(target=work, name=f"featx-gram-{i}", daemon=True) for i in range(max(1, workers) - 1)]
    for t in threads:
        t.start()
    work()  # the calling thread is one of the workers
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def gram_plus_one(X: np.ndarray, workers: int) -> np.ndarray:
    """``X X^T + 1`` in float64 from float32 products, on ``workers`` threads, each a single-threaded BLAS call.

    The rows are cut into ``2 * workers`` blocks; each tile of the lower triangle is one product (a SYRK on the
    diagonal, half the cost) written, plus one and in float64, into its place and its mirror's, largest tiles
    first, so that the threads finish together whatever their number.
    """
    n = X.shape[0]
    out = np.empty((n, n), dtype=np.float64)
    n_blocks = max(1, min(2 * workers, n // 256)) if workers > 1 else 1
    edges = np.linspace(0, n, n_blocks + 1).astype(int)
    blocks = [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

    def tile(bi: slice, bj: slice) -> Callable[[], None]:
        def run() -> None:
            T = X[bi] @ X[bj].T  # float32; X[bi] @ X[bi].T is one SYRK
            np.add(T, 1.0, out=out[bi, bj])
            if bi != bj:
                np.add(T.T, 1.0, out=out[bj, bi])

        return run

    tasks = [(1 if i == j else 2, tile(blocks[i], blocks[j])) for i in range(n_blocks) for j in range(i + 1)]
    tasks.sort(key=lambda t: -t[0])  # off-diagonal tiles cost twice a diagonal one
    if n_blocks == 1:
        tasks[0][1]()
    else:
        with _blas_limit(1):
            _run_threads([t for _, t in tasks], workers)
    return out


def row_split_matmul(A: np.ndarray, V: np.ndarray, workers: int) -> np.ndarray:
    """``A @ V`` with ``A``'s rows split over ``workers`` threads, each a single-threaded BLAS call."""
    out = np.empty((A.shape[0], V.shape[1]), dtype=np.result_type(A, V))
    edges = np.linspace(0, A.shape[0], workers + 1).astype(int)

    def part(a: int, b: int) -> Callable[[], None]:
        return lambda: np.matmul(A[a:b], V, out=out[a:b])

    with _blas_limit(1):
        _run_threads([part(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])], workers)
    return out


def resolve_device(device: str | torch.device) -> torch.device:
    """Return ``device`` as a :class:`torch.device`, refusing CUDA when it is not available (imports torch)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from ..errors import UsageError

        raise UsageError(f"device {device!r} was asked for but CUDA is not available on this machine")
    return dev


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


def _exact_line_search(xp: Any, a: Any, b: Any, F: Any, FP: Any, Y: Any, C: float) -> Any:
    """Exact minimizer ``t >= 0`` of ``phi(t) = reg(t) + C sum_i max(0, 1 - y_i (f_i + t fp_i))^2`` per column.

    ``reg(t)`` is quadratic with ``reg'(t) = a + t b``.  ``phi'`` is continuous, increasing and piecewise linear
    with breakpoints where a row enters or leaves the active set, so sorting the breakpoints and scanning the
    segments finds the root exactly; all columns are handled at once.
    """
    c = 1.0 - Y * F
    m = Y * FP
    active0 = (c > 0) | ((c == 0) & (m < 0))
    A0 = a - 2 * C * xp.where(active0, m * c, 0.0).sum(0)
    B0 = b + 2 * C * xp.where(active0, m * m, 0.0).sum(0)
    tb = xp.where(m != 0, c / xp.where(m != 0, m, 1.0), math.inf)
    tb = xp.where((tb > 0) & xp.isfinite(tb), tb, math.inf)
    ts, order = xp.sort0(tb)
    ms = xp.gather0(m, order)
    cs = xp.gather0(c, order)
    finite = xp.isfinite(ts)
    # Crossing its breakpoint, a row with m > 0 leaves the active set and one with m < 0 enters it.
    sgn = xp.cast(xp.where(ms > 0, -1.0, 1.0), F.dtype) * finite
    dA = sgn * (-2 * C * ms * cs)
    dB = sgn * (2 * C * ms * ms)
    k = F.shape[1]
    zrow = xp.zeros((1, k), F.dtype)
    Acum = A0 + xp.cat0([zrow, xp.cumsum0(dA)])
    Bcum = B0 + xp.cat0([zrow, xp.cumsum0(dB)])
    tlo = xp.cat0([zrow, ts])
    thi = xp.cat0([ts, xp.full((1, k), math.inf, F.dtype)])
    safe = xp.where(Bcum > 0, Bcum, 1.0)
    troot = -Acum / safe
    ok = (Bcum > 0) & (troot >= tlo) & (troot <= thi)
    first = xp.argmax0(ok)
    t = xp.gather0(troot, first[None, :])[0]
    return xp.where(ok.any(0), xp.clamp(t, 0.0), 0.0)


def _svm_relative_gap(xp: Any, B: Any, F: Any, alpha: Any, Y: Any, C: float, K_ya: Any) -> Any:
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


# From this many rows on, the Gram solver inverts K + I/(2C) in float32 (with refinement, see _svm_gram).
_MIXED_PRECISION_FROM = 1500
# float32 is refused when cond(K + I/2C) may exceed this (float32 resolves ~1e-7; refinement needs margin).
_FLOAT32_MAX_COND = 1e5
# Newton steps allowed with a float32 inverse before switching to float64.
_FLOAT32_MAX_STEPS = 10
# Feature-space Newton factorizes each class's (d+1) x (d+1) active-set Hessian up to this size, else uses CG.
_FEATURE_DIRECT_MAX = 4097
# CG iterations per Newton step before the feature-space solver gives up on CG (see _svm_feature).
_CG_MAX = 200


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
    current factorization (about 280 MB at n = 3,400).
    """

    def __init__(self, X: np.ndarray, *, device: str | torch.device = "cpu", space: str = "auto") -> None:
        X = np.asarray(X)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D, got shape {X.shape}")
        self.X = np.ascontiguousarray(X, dtype=np.float32)
        if not self.X.flags.writeable:  # torch only wraps writable buffers without a warning
            self.X = self.X.copy()
        self.n, self.d = self.X.shape
        # numpy and scipy on the CPU (no torch import), torch tensors on an accelerator.
        self.xp = backend_for(device)
        if space == "auto":
            space = "gram" if self.n <= self.d + 1 else "feature"
        if space not in ("gram", "feature"):
            raise ValueError(f"space must be 'auto', 'gram' or 'feature', got {space!r}")
        self.space = space
        self._X_t: Any = None
        self._K: Any = None
        # Small problems use float64 products throughout (cheap, and exact enough for tight tolerances);
        # big ones float32 products (the features' own precision), upgraded only where a factorization fails.
        self._small = self.n * self.d <= _FLOAT64_BELOW
        self._K_exact = self._small
        self._M_exact = self._small
        self._X_mm: Any = None
        self._M: Any = None
        self._factor_C: tuple[float, Any] | None = None
        self._factor: Any = None
        self._warm: dict[str, tuple[float, Any]] = {}
        self._workers = 0  # the BLAS threads configured when a CPU solve starts (see solve_svm)

    @property
    def device(self) -> str:
        """Where the products run: ``"cpu"`` (numpy) or the torch device's name."""
        xp = self.xp
        return "cpu" if isinstance(xp, _NumpyOps) else str(xp.device)

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
            xp = self.xp
            t0 = time.perf_counter()
            if self._K_exact:
                X64 = xp.cast(self.X_t, xp.f64)
                K = X64 @ X64.T
                del X64
                K += 1.0
            elif isinstance(xp, _NumpyOps):
                # float32 tiles on as many threads as BLAS may use (see gram_plus_one), + 1 and float64 in place.
                K = gram_plus_one(self.X_t, self._workers or blas_threads())
            else:
                K = xp.cast(self.X_t @ self.X_t.T, xp.f64)
                K += 1.0
            self._K = K
            logger.debug("Gram matrix %dx%d in %.2fs", self.n, self.n, time.perf_counter() - t0)
        return self._K

    @property
    def M(self) -> Any:
        """``X~^T X~`` in float64 ((d+1), (d+1)) with ``X~ = [X, 1]``, computed on first use."""
        if self._M is None:
            xp = self.xp
            t0 = time.perf_counter()
            Xt = self.X_t
            d = self.d
            M = xp.zeros((d + 1, d + 1), xp.f64)
            if self._M_exact:
                X64 = xp.cast(Xt, xp.f64)
                M[:d, :d] = X64.T @ X64
                del X64
            else:
                M[:d, :d] = Xt.T @ Xt
            s = xp.colsum64(Xt)
            M[:d, d] = s
            M[d, :d] = s
            M[d, d] = float(self.n)
            self._M = M
            logger.debug("cross-product %dx%d in %.2fs", d + 1, d + 1, time.perf_counter() - t0)
        return self._M

    def _warm_key(self, Y: np.ndarray) -> str:
        return _array_fingerprint(Y)

    # -- the SVM ----------------------------------------------------------------------------------------------
    def solve_svm(
        self, Y: np.ndarray, C: float, *, tol: float = 1e-4, max_iter: int = 100, warm_start: bool = True
    ) -> tuple[np.ndarray, np.ndarray, SolveInfo]:
        """Minimize the squared-hinge SVM primal for the +-1 label matrix ``Y`` (n, k').

        Returns ``coef`` (k', d) float64, ``intercept`` (k',) float64 and a :class:`SolveInfo`.  ``tol`` is
        on the gradient norm relative to its value at ``w = 0``; the Newton method usually stops earlier, at
        an exact optimum (active sets unchanged and a full step).
        """
        if C <= 0 or not math.isfinite(C):
            raise ValueError(f"C must be positive and finite, got {C}")
        xp = self.xp
        key = self._warm_key(Y)
        warm = self._warm.get(key) if warm_start else None
        Yt = xp.asarray(np.asarray(Y, dtype=np.float64))
        t0 = time.perf_counter()
        if self.space == "gram":
            if isinstance(xp, _NumpyOps):
                # One BLAS thread fewer than configured for the factorizations and the small products; the Gram
                # matrix's tiles on all of them (see gram_plus_one and the note above blas_threads).
                self._workers = blas_threads()
                with _blas_limit(self._workers - 1):
                    B, n_iter, converged, obj, detail = self._svm_gram(Yt, C, tol, max_iter, warm[1] if warm else None)
            else:
                B, n_iter, converged, obj, detail = self._svm_gram(Yt, C, tol, max_iter, warm[1] if warm else None)
            self._warm[key] = (C, B)
            # w = X^T beta with float32 GEMMs: beta split into a float32 head and the float32 rounding
            # remainder, so beta's float64 precision survives (X itself is float32 anyway).
            hi = xp.cast(B, xp.f32)
            lo = xp.cast(B - xp.cast(hi, xp.f64), xp.f32)
            coef = xp.cast(hi.T @ self.X_t, xp.f64) + xp.cast(lo.T @ self.X_t, xp.f64)
            intercept = B.sum(0)
        else:
            W, n_iter, converged, obj, detail = self._svm_feature(Yt, C, tol, max_iter, warm[1] if warm else None)
            self._warm[key] = (C, W)
            coef = W[:-1].T
            intercept = W[-1]
        info = SolveInfo(self.space, n_iter, time.perf_counter() - t0, obj, converged, detail)
        logger.debug("svm C=%g: %s", C, info)
        return np.array(xp.numpy(coef), dtype=np.float64), np.array(xp.numpy(intercept), dtype=np.float64), info

    def _gram_inverse(self, C: float, dtype: Any) -> Any:
        """``(K + I/(2C))^-1`` in ``dtype``, cached for the most recent ``C`` (and precision).

        Returns None for float32 when the matrix is too ill-conditioned for it (the caller uses float64).
        """
        xp = self.xp
        key = (C, dtype)
        if self._factor_C == key and self._factor is not None:
            return self._factor
        self._factor = None  # release the previous one before allocating the next
        t0 = time.perf_counter()

        def shifted(extra: float = 0.0) -> Any:
            A = xp.copy(self.K, dtype)
            xp.add_diag_(A, 0.5 / C + extra)
            return A

        # Factorized where it lies (overwrite): the float32 path holds one n x n copy of K besides K itself.
        L, ok = xp.cholesky(shifted(), overwrite=True)
        if dtype != xp.f64:
            # (max L_ii / min L_ii)^2 is a lower bound on cond(A); refuse float32 where it cannot resolve A.
            if not ok:
                return None
            diag = abs(xp.cast(xp.diag(L), xp.f64))
            if (float(diag.max()) / max(float(diag.min()), 1e-300)) ** 2 > _FLOAT32_MAX_COND:
                return None
        if not ok and not self._K_exact:
            # K + I/(2C) is positive definite in exact arithmetic, but a float32 Gram matrix carries rounding
            # errors ~1e-7 |K| that a tiny I/(2C) (huge C, rank-deficient X) cannot cover: redo K in float64.
            logger.debug("Cholesky of K + I/2C failed (C=%g); recomputing K in float64", C)
            self._K = None
            self._K_exact = True
            L, ok = xp.cholesky(shifted(), overwrite=True)
        jitter, added = 1e-12, 0.0
        mean_diag = float(xp.diag(self.K).mean()) + 0.5 / C
        while not ok and jitter < 1e-3:
            logger.warning("K + I/(2C) is numerically singular (C=%g); adding %.0e x mean(diag) to it", C, jitter)
            added += jitter * mean_diag
            L, ok = xp.cholesky(shifted(added), overwrite=True)
            jitter *= 100
        if not ok:
            raise np.linalg.LinAlgError("K + I/(2C) is not numerically positive definite")
        inv = xp.cholesky_inverse(L)
        self._factor, self._factor_C = inv, key
        logger.debug("inverse of K + I/2C (C=%g, %s) in %.2fs", C, dtype, time.perf_counter() - t0)
        return inv

    def _solve_active(
        self,
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
        xp = self.xp
        K = self.K
        n = K.shape[0]
        D = xp.zeros(R.shape, xp.f64)
        U = xp.cast(Ainv @ xp.cast(S * R, Ainv.dtype), xp.f64)
        n_direct = 0
        for c in cols:
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

    def _kmm(self, V: Any) -> Any:
        """``K @ V`` (float64); on the CPU split by rows over the solve's threads (see gram_plus_one)."""
        K = self.K
        if not isinstance(self.xp, _NumpyOps) or self._workers <= 1 or K.shape[0] < 1024:
            return K @ V
        return row_split_matmul(K, V, self._workers)

    def _svm_gram(
        self, Y: Any, C: float, tol: float, max_iter: int, B0: Any
    ) -> tuple[Any, int, bool, float, dict[str, Any]]:
        xp = self.xp
        n, k = Y.shape
        gamma = 0.5 / C
        # Mixed precision: a float32 inverse costs ~1/3 of a float64 one; the Newton systems are then solved
        # with one step of iterative refinement against float64 residuals.  If refinement does not contract
        # (K + I/2C too ill-conditioned for float32, e.g. duplicate rows and a large C) we switch to float64.
        inv_dtype = xp.f32 if n >= _MIXED_PRECISION_FROM else xp.f64
        Ainv = self._gram_inverse(C, inv_dtype)
        if Ainv is None:
            logger.debug("K + I/2C too ill-conditioned for a float32 inverse (C=%g); using float64", C)
            Ainv = self._gram_inverse(C, xp.f64)
        assert Ainv is not None
        B = xp.zeros((n, k), xp.f64) if B0 is None else xp.copy(B0)
        F = self._kmm(B)
        done = xp.zeros((k,), bool)
        converged = False
        it = 0
        n_direct = 0
        gap = xp.full((k,), math.inf, xp.f64)
        from_zero = B0 is None
        for it in range(1, max_iter + 1):
            S = (Y * F) < 1
            Sf = xp.cast(S, xp.f64)
            B0s = B * Sf
            KB0s = None
            if not (from_zero and it == 1):  # at w = 0 the gap is never small: save the GEMM
                alpha = 2 * C * xp.clamp(1 - Y * F, 0)
                # K (Y alpha) for the gap and K B0s for the Newton residual below: one pass over K for both
                KV = self._kmm(xp.cat1([Y * alpha, B0s]))
                gap = _svm_relative_gap(xp, B, F, alpha, Y, C, KV[:, :k])
                KB0s = KV[:, k:]
                done |= gap <= tol
                if bool(done.all()):
                    converged = True
                    it -= 1
                    break
            cols = xp.nonzero(~done).tolist()
            if Ainv.dtype != xp.f64 and it > _FLOAT32_MAX_STEPS:
                # The Newton method normally ends in a handful of steps; slow progress means float32 hurts.
                logger.debug("no convergence after %d steps with a float32 inverse; switching to float64", it - 1)
                Ainv = self._gram_inverse(C, xp.f64)
                assert Ainv is not None
            # Newton point for the active sets S: beta_N = 0, (K_SS + gamma I) beta_S = y_S, found as a
            # correction to the current beta restricted to S (so an approximate solve refines, not restarts).
            R = Sf * (Y - gamma * B0s) if KB0s is None else Sf * (Y - KB0s - gamma * B0s)
            cache: dict[int, Any] = {}
            D, nd = self._solve_active(R, S, Ainv, cols, gamma, cache)
            n_direct += nd
            Bhat = B0s + D
            if Ainv.dtype != xp.f64:
                R2 = Sf * (Y - self._kmm(Bhat) - gamma * Bhat)
                r1 = xp.norm0(R[:, cols])
                r2 = xp.norm0(R2[:, cols])
                if bool((r2 > 0.25 * r1 + 1e-12 * xp.norm0(Y[:, cols])).any()):
                    logger.debug("float32 inverse not accurate enough (C=%g); switching to float64", C)
                    Ainv = self._gram_inverse(C, xp.f64)
                    assert Ainv is not None
                    D, nd = self._solve_active(R, S, Ainv, cols, gamma, {})
                    Bhat = B0s + D
                else:
                    D2, nd = self._solve_active(R2, S, Ainv, cols, gamma, cache)
                    Bhat = Bhat + D2
                n_direct += nd
            P = Bhat - B
            P[:, done] = 0
            KP = self._kmm(P)
            t = _exact_line_search(xp, (B * KP).sum(0), (P * KP).sum(0), F, KP, Y, C)
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

    def _feature_precond(self, C: float) -> Any:
        """Cholesky factor of the full-active-set Hessian ``I + 2C X~^T X~``, cached for the latest ``C``."""
        if self._factor_C == (C, "feature") and self._factor is not None:
            return self._factor
        xp = self.xp
        self._factor = None
        H = self.M * (2 * C)
        xp.add_diag_(H, 1.0)
        L, ok = xp.cholesky(H)
        if not ok and not self._M_exact:
            # Rounding in a float32 X^T X can make it slightly indefinite, which a huge C magnifies.
            self._M, self._M_exact = None, True
            H = self.M * (2 * C)
            xp.add_diag_(H, 1.0)
            L, ok = xp.cholesky(H)
        if not ok:
            raise np.linalg.LinAlgError("I + 2C X^T X is not numerically positive definite")
        self._factor = L
        self._factor_C = (C, "feature")
        return self._factor

    def _active_hessian(self, active: Any, C: float) -> Any:
        """``I + 2C X~_S^T X~_S`` (float64) for the rows ``active``, from the rows themselves or as ``M``
        minus the inactive rows, whichever set is smaller."""
        xp = self.xp
        n_act = int(active.sum())
        use_active = n_act <= self.n - n_act
        idx = xp.nonzero(active if use_active else ~active)
        Xs = xp.rows(self.X_mm, idx)
        d = self.d
        part = xp.zeros((d + 1, d + 1), xp.f64)
        part[:d, :d] = xp.cast(Xs.T @ Xs, xp.f64)
        colsum = xp.colsum64(Xs)
        part[:d, d] = colsum
        part[d, :d] = colsum
        part[d, d] = float(len(idx))
        H = part if use_active else self.M - part
        H *= 2 * C
        xp.add_diag_(H, 1.0)
        return H

    def _xw(self, W: Any) -> Any:
        """``X~ W`` for W ((d+1), k) float64 (a float32 GEMM for big data, see :attr:`X_mm`)."""
        xp = self.xp
        Xm = self.X_mm
        return xp.cast(Xm @ xp.cast(W[:-1], Xm.dtype), xp.f64) + W[-1]

    def _xtr(self, R: Any) -> Any:
        """``X~^T R`` for R (n, k) float64 (a float32 GEMM for big data, see :attr:`X_mm`)."""
        xp = self.xp
        Xm = self.X_mm
        top = xp.cast(Xm.T @ xp.cast(R, Xm.dtype), xp.f64)
        return xp.cat0([top, R.sum(0)[None, :]])

    def _svm_feature(
        self, Y: Any, C: float, tol: float, max_iter: int, W0: Any
    ) -> tuple[Any, int, bool, float, dict[str, Any]]:
        xp = self.xp
        n, k = Y.shape
        d1 = self.d + 1
        Lp = self._feature_precond(C)
        W = xp.zeros((d1, k), xp.f64) if W0 is None else xp.copy(W0)
        F = self._xw(W)
        g0 = xp.clamp(xp.norm0(self._xtr(-2 * C * Y)), 1e-300)
        converged = False
        cg_total = 0
        n_direct = 0
        use_direct = False
        it = 0
        gap = xp.full((k,), math.inf, xp.f64)
        for it in range(1, max_iter + 1):
            Sb = (Y * F) < 1
            S = xp.cast(Sb, xp.f64)
            xi = xp.clamp(1 - Y * F, 0)
            # Gradient w - X~^T (2C xi y); the same vector X~^T (alpha y) gives the dual point's norm.
            Wd = self._xtr(2 * C * xi * Y)
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
                    if bool(Sb[:, c].all()):
                        L = Lp
                    else:
                        L, ok = xp.cholesky(self._active_hessian(Sb[:, c], C))
                        if not ok:
                            raise np.linalg.LinAlgError("an active-set Hessian is not positive definite")
                        n_direct += 1
                    P[:, c] = -xp.cholesky_solve(G[:, c : c + 1], L)[:, 0]
            else:
                gnorm = xp.norm0(G)
                # Truncated Newton: solve (I + 2C X~_S^T X~_S) P = -G by preconditioned CG, all columns at
                # once, to a relative residual that tightens as the gradient shrinks.
                eta = xp.clamp(xp.clamp(xp.sqrt(gnorm / g0), None, 0.1), 1e-6)

                def hess(V: Any) -> Any:
                    return V + 2 * C * self._xtr(S * self._xw(V))

                P, n_cg = _batched_pcg(xp, hess, -G, lambda R: xp.cholesky_solve(R, Lp), eta, max_iter=_CG_MAX)
                cg_total += n_cg
                P[:, done] = 0
                if n_cg >= _CG_MAX and d1 <= _FEATURE_DIRECT_MAX:
                    # Measured: at large C (many inactive rows) the full-set preconditioner stops working and CG
                    # would need thousands of iterations; per-class factorizations are then far cheaper.
                    logger.debug("CG stalled (C=%g); switching to per-class factorizations", C)
                    use_direct = True
            FP = self._xw(P)
            t = _exact_line_search(xp, (W * P).sum(0), (P * P).sum(0), F, FP, Y, C)
            W += t * P
            F += t * FP
        obj = float(0.5 * (W * W).sum() + C * (xp.clamp(1 - Y * F, 0) ** 2).sum())
        detail = {"cg_iterations": cg_total, "n_direct_factorizations": n_direct, "max_rel_gap": float(gap.max())}
        return W, it, converged, obj, detail


def _batched_pcg(
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
    for it in range(1, max_iter + 1):
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


# -- L-BFGS on full-batch passes (softmax regression; streamed SVM and softmax) ----------------------------------

LOSSES = ("squared_hinge", "softmax", "binomial")


def _chunk_loss_grad(kind: str, F: Any, yc: Any, C: float) -> tuple[float, Any]:
    """Loss ``C * sum_i l_i`` over one chunk and ``dLoss/dF`` (m, k), given the scores ``F`` (float64).

    Works on numpy arrays (CPU) and torch tensors (other devices) alike.
    """
    xp_torch = _is_tensor(F)
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
# float32 rounding in the objective can stall L-BFGS's line search once the gradient is tiny.
_FLOAT64_BELOW = 20_000_000


def _device_chunks(
    batches: Batches, encode: Callable[[np.ndarray], np.ndarray], xp: _NumpyOps | _TorchOps, dtype: type
) -> Iterator[tuple[Any, Any]]:
    """Chunks as numpy arrays of ``dtype`` (CPU: numpy's BLAS, no torch) or tensors on ``xp``'s device."""
    for Xc, yc in batches():
        y_enc = encode(np.asarray(yc))
        if isinstance(xp, _NumpyOps):
            yield np.asarray(Xc, dtype=dtype), y_enc
        else:
            tdt = xp.f64 if dtype == np.float64 else xp.f32
            yield xp.asarray(np.asarray(Xc), tdt), xp.asarray(y_enc)


def _lift(a: np.ndarray, like: Any) -> Any:
    """A float64 numpy array in the framework, device and dtype of ``like``."""
    if _is_tensor(like):
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).to(device=like.device, dtype=like.dtype)
    return np.asarray(a, dtype=like.dtype)


def _np64(a: Any) -> np.ndarray:
    if _is_tensor(a):
        return a.detach().double().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _to64(a: Any) -> Any:
    return a.double() if _is_tensor(a) else a.astype(np.float64, copy=False)


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
    for Xa, _y in _device_chunks(batches, lambda y: y, backend_for(device), dtype):
        Om = _lift(Omega[:-1], Xa)
        T = _to64(Xa @ Om)
        T = T + (_lift(Omega[-1], T) if _is_tensor(T) else Omega[-1])
        Ysk[:-1] += _np64(Xa.T @ (T.to(Xa.dtype) if _is_tensor(T) else T.astype(Xa.dtype)))
        Ysk[-1] += _np64(T.sum(0))
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
    ``encode`` maps a chunk's class indices to what :func:`_chunk_loss_grad` expects.

    Conditioning: features of CNNs are strongly correlated, so plain L-BFGS crawls.  One extra pass builds a
    rank-``precond_rank`` Nystrom approximation ``U diag(lam) U^T`` of ``X~^T X~`` and L-BFGS runs on
    ``W = T V`` with ``T = (I + c X~^T X~)^(-1/2)`` approximated from it (``c`` = the loss curvature: ``2C``
    for squared hinge, ``C/4`` for logistic), which flattens the top of the Hessian's spectrum.

    Precision: float32 products for big data (the features' own precision), float64 below
    ``_FLOAT64_BELOW`` entries; sums, parameters and L-BFGS in float64.  Memory: parameters, 10 L-BFGS
    correction pairs, the (d+1) x rank sketch and one chunk, whatever the number of rows.  Stopping: the
    scaled (divided by ``C * n_rows``, as scikit-learn does) gradient's largest entry ``<= tol``; for squared
    hinge also, and first, a relative duality gap ``<= tol`` (computed for free from the gradient pass).
    """
    xp = backend_for(device)
    d = n_features
    d1 = d + 1
    reg_b = kind == "squared_hinge"
    scale = 1.0 / (C * max(n_rows, 1))
    n_eval = 0
    t0 = time.perf_counter()
    # Products in float32 (the features' own precision) for big data, float64 for small (see _FLOAT64_BELOW).
    dtype = np.float64 if n_rows * d <= _FLOAT64_BELOW else np.float32

    rank = min(int(precond_rank), d1)
    if rank > 0:
        U, lam = nystrom_sketch(batches, d, rank, device, dtype)
        curv = 2 * C if kind == "squared_hinge" else C / 4
        s_top = 1.0 / np.sqrt(1.0 + curv * lam)
        s_rest = 1.0 / np.sqrt(1.0 + curv * lam[-1]) if rank < d1 else 1.0
    else:
        U, s_top, s_rest = np.zeros((d1, 0)), np.zeros(0), 1.0

    def T(V: np.ndarray) -> np.ndarray:
        """Apply the symmetric preconditioner ``U diag(s_top) U^T + s_rest (I - U U^T)``."""
        UtV = U.T @ V
        return s_rest * V + U @ ((s_top - s_rest)[:, None] * UtV)

    last_gap = math.inf
    last_gmax = math.inf

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal n_eval, last_gap, last_gmax
        n_eval += 1
        Wb = T(theta.reshape(d1, n_out))
        W, b = Wb[:d], Wb[d]
        loss = 0.0
        gW = np.zeros((d, n_out))
        gb = np.zeros(n_out)
        Wc = None
        for Xa, ya in _device_chunks(batches, encode, xp, dtype):
            if Wc is None:
                Wc = _lift(W, Xa)
                bc = _lift(b, _to64(Xa[:1, :1]))
            F = _to64(Xa @ Wc) + bc
            lc, G = _chunk_loss_grad(kind, F, ya, C)
            loss += lc
            Gc = G.to(Xa.dtype) if _is_tensor(G) else G.astype(Xa.dtype)
            gW += _np64(Xa.T @ Gc)
            gb += _np64(G.sum(0))
        reg = 0.5 * float((W * W).sum()) + (0.5 * float((b * b).sum()) if reg_b else 0.0)
        if kind == "squared_hinge":
            # Dual point alpha = 2C xi: w_dual = X~^T (alpha y) = -(gW, gb); loss = C sum xi^2 = sum alpha^2/(4C).
            # D = sum alpha - 0.5 ||w_dual||^2 - loss, and sum alpha = sum_i 2C xi_i needs one more scalar:
            # sum alpha = sum_i alpha_i y_i * y_i f_i + sum alpha_i xi_i  ->  w_dual . w + 2 loss / ... (see below).
            wd2 = float((gW * gW).sum() + (gb * gb).sum())
            # sum_i alpha_i (1 - y_i f_i) = 2 loss, and sum_i alpha_i y_i f_i = w . w_dual, so
            # sum alpha = 2 loss + w . w_dual = 2 loss - (W . gW + b . gb).
            sum_alpha = 2 * loss - float((W * gW).sum() + (b * gb).sum())
            primal = reg + loss
            dual = sum_alpha - 0.5 * wd2 - loss
            last_gap = (primal - dual) / max(primal, 1e-300)
        gW = gW + W
        if reg_b:
            gb = gb + b
        raw = np.concatenate([gW, gb[None, :]], 0)
        last_gmax = float(np.abs(raw).max()) * scale
        return (reg + loss) * scale, T(raw).ravel() * scale

    def stop_now() -> bool:
        # Judge convergence on the ORIGINAL problem: the preconditioned gradient is shrunk by T and would
        # pass any gtol long before the optimum.
        return last_gap <= tol if kind == "squared_hinge" else last_gmax <= tol

    def callback(intermediate_result: Any) -> None:
        if stop_now():
            raise StopIteration

    if W0 is None:
        x0 = np.zeros(d1 * n_out)
    else:
        # Start from W0 expressed in the preconditioned variables: V = T^-1 W0.
        W0m = np.asarray(W0, dtype=np.float64).reshape(d1, n_out)
        UtW = U.T @ W0m
        x0 = (W0m / s_rest + U @ ((1 / s_top - 1 / s_rest)[:, None] * UtW)).ravel()
    import scipy.optimize  # ~0.5-1 s of imports, paid only by the L-BFGS solvers

    res = scipy.optimize.minimize(
        fun,
        x0,
        jac=True,
        method="L-BFGS-B",
        callback=callback,
        options={"maxiter": max_iter, "gtol": 0.0, "ftol": 64 * np.finfo(float).eps, "maxcor": 10},
    )
    Wb = T(res.x.reshape(d1, n_out))
    # scipy reports a stop by our callback as a failure; ftol's "no more progress" is a success.
    converged = stop_now() or bool(res.success)
    info = SolveInfo(
        "lbfgs",
        int(res.nit),
        time.perf_counter() - t0,
        float(res.fun) / scale,
        converged,
        {"passes": n_eval + (1 if rank > 0 else 0), "message": str(res.message), "precond_rank": rank,
         "rel_gap": last_gap if kind == "squared_hinge" else None},
    )
    return Wb[:d].T.copy(), Wb[d].copy(), info
