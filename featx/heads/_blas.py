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
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from featx import interrupt

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
