"""BLAS threads on the CPU: limits that several fitting threads can share, and products split over Python threads.

OpenBLAS's own threads synchronize at many points inside one call (a Cholesky of 3,400 rows has hundreds): when any
of them waits for a core, all wait.  Measured on 2 cores at load ~4: a float32 Cholesky of 3,400 rows took 0.46 s
with one BLAS thread and 8.6 s with two.  A quiet machine may suffer too (not measured here): numpy and scipy
each bring their own OpenBLAS, whose idle threads spin for a while after each call, and the Gram solver alternates
numpy products with scipy factorizations; on a quiet 2-core machine `featx fit svm` took 8-11 s of wall and about
as much CPU time for ~3 s of single-threaded work.  So the Gram solver on the CPU runs its BLAS calls with one
thread fewer than configured (one on 2 cores: the process's other threads, such as the plot import that
`featx fit` starts beside the solver, keep a core), and computes its one big product, the Gram matrix, as
independent tiles on Python threads (numpy releases the GIL), each a single-threaded BLAS call: all the
configured cores, and no synchronization but the final join.
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from featx import interrupt

# The most flops one uninterruptible BLAS call of the products below may take: about a second on 2 cores, so that a
# stop request (SIGTERM, Ctrl-C) is noticed between calls well within 2 s.
CALL_FLOPS = 2e10

_controller: Any = None


def _threadpools() -> Any:
    """threadpoolctl's view of the BLAS libraries loaded (numpy's and scipy's), found once."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController().select(user_api="blas")
    return _controller


def blas_threads() -> int:
    """The BLAS threads configured now (``OPENBLAS_NUM_THREADS``, ``threadpool_limits``...): numpy's or scipy's,
    the most."""
    return max([int(i.get("num_threads") or 1) for i in _threadpools().info()], default=1)


_limit_lock = threading.Lock()
_limit_requests: list[int] = []  # the limits in force, from every thread (fits may run on several)
_limit_original: list[int] = []


@contextlib.contextmanager
def blas_limit(n: int) -> Iterator[None]:
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
                interrupt.raise_if_requested()
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
    # ... and enough of them that no tile exceeds CALL_FLOPS: a stop request is checked between tiles
    n_blocks = max(n_blocks, math.ceil(n / max(64.0, math.sqrt(CALL_FLOPS / (2.0 * max(X.shape[1], 1))))))
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
        with blas_limit(1):
            _run_threads([t for _, t in tasks], workers)
    return out


def crossprod(X: np.ndarray) -> np.ndarray:
    """``X^T X`` (d, d) in ``X``'s precision, as tiles of at most :data:`CALL_FLOPS` each, a stop request checked
    between them (one call of 51,000 x 4,096 rows is ~1.7e12 flops: many seconds with no way to stop it).

    Tiles of ``b`` columns against ``b`` columns over all rows (strided views of ``X``, no copy); the diagonal tiles
    are SYRKs, each off-diagonal one is written to its mirror too.  Each call uses BLAS's own threads.
    """
    n, d = X.shape
    if 2.0 * n * d * d <= CALL_FLOPS:
        return X.T @ X
    b = int(max(64, min(d, math.sqrt(CALL_FLOPS / (2.0 * max(n, 1))))))
    out = np.empty((d, d), dtype=X.dtype)
    edges = list(range(0, d, b)) + [d]
    for i in range(len(edges) - 1):
        bi = slice(edges[i], edges[i + 1])
        for j in range(i + 1):
            interrupt.raise_if_requested()
            bj = slice(edges[j], edges[j + 1])
            T = X[:, bi].T @ X[:, bj]
            out[bi, bj] = T
            if i != j:
                out[bj, bi] = T.T
    return out


def _row_step(A: np.ndarray, k: int) -> int:
    """Rows of ``A`` per product with ``k`` columns so that one call stays within :data:`CALL_FLOPS`."""
    return max(64, int(CALL_FLOPS / (2.0 * max(A.shape[1], 1) * max(k, 1))))


def rows_matmul(A: np.ndarray, V: np.ndarray) -> np.ndarray:
    """``A @ V`` in row blocks of at most :data:`CALL_FLOPS`, a stop request checked between them."""
    step = _row_step(A, V.shape[1])
    if A.shape[0] <= step:
        return A @ V
    out = np.empty((A.shape[0], V.shape[1]), dtype=np.result_type(A, V))
    for a in range(0, A.shape[0], step):
        interrupt.raise_if_requested()
        np.matmul(A[a : a + step], V, out=out[a : a + step])
    return out


def rows_t_matmul(A: np.ndarray, R: np.ndarray) -> np.ndarray:
    """``A^T R`` summed in float64 over row blocks of at most :data:`CALL_FLOPS` (each a product in the inputs'
    precision), a stop request checked between them."""
    step = _row_step(A, R.shape[1])
    if A.shape[0] <= step:
        return np.asarray(A.T @ R, dtype=np.float64)
    out = np.zeros((A.shape[1], R.shape[1]), dtype=np.float64)
    for a in range(0, A.shape[0], step):
        interrupt.raise_if_requested()
        out += A[a : a + step].T @ R[a : a + step]
    return out


def row_split_matmul(A: np.ndarray, V: np.ndarray, workers: int) -> np.ndarray:
    """``A @ V`` with ``A``'s rows split over ``workers`` threads, each a single-threaded BLAS call."""
    out = np.empty((A.shape[0], V.shape[1]), dtype=np.result_type(A, V))
    edges = np.linspace(0, A.shape[0], workers + 1).astype(int)

    def part(a: int, b: int) -> Callable[[], None]:
        def run() -> None:
            np.matmul(A[a:b], V, out=out[a:b])

        return run

    with blas_limit(1):
        _run_threads([part(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])], workers)
    return out
