"""Array back-ends for the solvers: numpy and scipy's LAPACK on the CPU, torch tensors on an accelerator.

The solvers are written once against the small set of operations of :class:`NumpyOps` / :class:`TorchOps`.  On
the CPU they run on numpy and scipy, so that `featx fit svm` never imports torch (2-4 s of start-up); on a CUDA
device the same code runs on torch tensors.  :func:`backend_for` picks one for a device.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.linalg

from featx import interrupt

if TYPE_CHECKING:
    import torch

# Below this many matrix entries (rows x features) the solvers use float64 products: cheap there, and float32
# rounding in the objective can stall a line search once the gradient is tiny.
FLOAT64_BELOW = 20_000_000

def is_tensor(a: Any) -> bool:
    """True for a torch tensor, without importing torch."""
    return type(a).__module__.startswith("torch")


# Sorting and gathering n x k scores by blocks of columns of about this many values (a quarter of a second each on
# one core), a stop request checked between them: one call on 50,000 x 200 took 1.5-2.5 s.
_BLOCK_VALUES = 2_000_000


def _column_blocks(a: np.ndarray) -> Iterator[slice]:
    """Blocks of ``a``'s columns of about :data:`_BLOCK_VALUES` values, a stop request checked before each."""
    n, k = a.shape
    step = max(1, _BLOCK_VALUES // max(n, 1))
    for c in range(0, k, step):
        interrupt.raise_if_requested()
        yield slice(c, min(k, c + step))


class NumpyOps:
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

    def column_blocks(self, a: np.ndarray) -> Iterator[slice]:
        """Slices of ``a``'s columns to work through one at a time (a stop request checked before each)."""
        return _column_blocks(a)

    def sort0(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.empty(a.shape, dtype=np.intp)
        for cols in _column_blocks(a):
            order[:, cols] = np.argsort(a[:, cols], axis=0)
        return self.gather0(a, order), order

    def gather0(self, a: np.ndarray, idx: np.ndarray) -> np.ndarray:
        if idx.shape[0] * idx.shape[1] <= _BLOCK_VALUES:
            return np.take_along_axis(a, idx, 0)
        out = np.empty(idx.shape, dtype=a.dtype)
        for cols in _column_blocks(idx):
            out[:, cols] = np.take_along_axis(a[:, cols], idx[:, cols], 0)
        return out

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
        # its rows (see _gram.solve_active) reads contiguous memory.
        return inv.T if not inv.flags.c_contiguous else inv

    def solve(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.linalg.solve(a, b)


class TorchOps:
    """torch tensors on an accelerator: the same operations as :class:`NumpyOps`."""

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

    def column_blocks(self, a: torch.Tensor) -> Iterator[slice]:
        """All columns at once (an accelerator is fast enough), after a stop check."""
        interrupt.raise_if_requested()
        yield slice(0, a.shape[1])

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


_NUMPY = NumpyOps()


def backend_for(device: Any) -> NumpyOps | TorchOps:
    """The back-end for ``device``: numpy on ``"cpu"`` (no torch import), torch tensors elsewhere.

    Refuses CUDA when it is not available, with a :class:`~featx.errors.UsageError`.
    """
    if str(device) == "cpu":
        return _NUMPY
    return TorchOps(resolve_device(device))


def resolve_device(device: str | torch.device) -> torch.device:
    """Return ``device`` as a :class:`torch.device`, refusing CUDA when it is not available (imports torch)."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from ..errors import UsageError

        raise UsageError(f"device {device!r} was asked for but CUDA is not available on this machine")
    return dev

def lift(a: np.ndarray, like: Any) -> Any:
    """A float64 numpy array in the framework, device and dtype of ``like``."""
    if is_tensor(like):
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).to(device=like.device, dtype=like.dtype)
    return np.asarray(a, dtype=like.dtype)


def np64(a: Any) -> np.ndarray:
    if is_tensor(a):
        return a.detach().double().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def to64(a: Any) -> Any:
    return a.double() if is_tensor(a) else a.astype(np.float64, copy=False)
