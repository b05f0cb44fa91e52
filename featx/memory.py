"""How much memory fitting a head takes, and which way of fitting it fits: featx's memory plan.

Each head can be fitted in more than one way (a *path*):

* ``svm``: ``gram`` (Newton in the Gram space: an n x n matrix and its inverse; fastest when n is small
  against d), ``feature`` (Newton in feature space: (d+1) x (d+1) matrices; fastest when n is larger than d),
  ``stream`` (L-BFGS over chunks read from disk: memory independent of n);
* ``logreg`` and ``mlp``: ``memory`` (the train rows in memory) or ``stream``;
* ``svm-rbf``: ``memory`` only (scikit-learn's SVC needs every row).

:func:`estimate` predicts the peak memory of one path from the shape of the problem: the rows ``n``, the
features ``d`` and the classes.  It counts every large array the path allocates (the float32 train matrix,
float64 copies of it, the Gram matrix and its inverse, the (d+1) x (d+1) cross-products and factors, the
per-class caches of the Newton steps, the n x k margins, the L-BFGS history, the scores kept for the metrics),
and leaves out the interpreter and the libraries' own code (what ``import featx.heads`` costs, and torch's
import for the MLP).  :func:`plan_fit` picks the fastest path whose estimate fits a budget (:func:`budget`:
``--max-memory``, by default 70% of :func:`available`) and raises :class:`NotEnoughMemory` when none does.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from featx.errors import FeatxError, UsageError

# the paths of each head, fastest first (the svm's first two are reordered by shape, see plan_fit)
PATHS: dict[str, tuple[str, ...]] = {
    "svm": ("gram", "feature", "stream"),
    "logreg": ("memory", "stream"),
    "mlp": ("memory", "stream"),
    "svm-rbf": ("memory",),
}
DEFAULT_SHARE = 0.7  # of available(): the budget when --max-memory is not given
C_HELD_OUT = 0.2  # share of the rows an SVM with C="auto" holds out to choose C (featx.heads)

# What the estimates assume of the solvers (see featx.heads): keep in step with them.
CHUNK_ROWS = 4096  # rows per chunk read from a feature set (featx.store.CHUNK_ROWS)
_FLOAT64_BELOW = 20_000_000  # n x d entries below which the linear solvers compute in float64
_MIXED_PRECISION_FROM = 1500  # rows from which the Gram solver inverts in float32 first
_FEATURE_DIRECT_MAX = 4097  # d + 1 up to which the feature-space solver factorizes per-class Hessians
# Share of rows per class taken as inactive in the Gram solver's per-class caches, which every class of a Newton
# step keeps at once (rows of the inverse, or the active block and its factor): measured ~0.15 at 3,000 x 4,096
# rows in 100 classes; with many classes these caches, not the Gram matrix, dominate the path's memory.
_INACTIVE_SHARE = 0.2
_NEWTON_MARGINS = 32  # n x k float64 arrays alive at once in a Newton step and its exact line search
_LBFGS_VECTORS = 40  # parameter-sized float64 vectors of L-BFGS (10 pairs, scipy's workspace, gradients)
_SOFTMAX_MARGINS = 8  # n x k float64 arrays of one softmax objective evaluation
_NYSTROM_RANK = 256  # rank of the streamed SVM's preconditioner
_NYSTROM_MATRICES = 7  # (d+1) x rank float64 matrices of that sketch
_MLP_HIDDEN = 256  # hidden units assumed for the MLP (its default)
_MLP_COPIES = 6  # weights, gradients, two Adam moments, the best epoch's copy, one spare
_TORCH_RUNTIME = 384 << 20  # what torch allocates on its first training steps beyond its import (measured ~300 MB)
_SVC_CACHE = 200 << 20  # scikit-learn SVC's kernel cache (cache_size=200 MB)
_FIXED = 64 << 20  # small temporaries: scaling blocks, scoring blocks, label arrays, bookkeeping


class NotEnoughMemory(FeatxError, MemoryError):
    """No way of fitting the head fits the memory budget (``--max-memory``)."""


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_left() -> int | None:
    """``memory.max - memory.current`` of this process's cgroup (v2, or v1's limit and usage), None when unlimited."""
    roots = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and (parts[0] == "0" or "memory" in parts[1].split(",")):
                roots.append(parts[2])
    except OSError:
        pass
    candidates = [Path("/sys/fs/cgroup") / r.lstrip("/") for r in roots] + [Path("/sys/fs/cgroup"),
                                                                            Path("/sys/fs/cgroup/memory")]
    for base in candidates:
        for limit_name, usage_name in (("memory.max", "memory.current"),
                                       ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            try:
                limit_text = (base / limit_name).read_text().strip()
                usage = int((base / usage_name).read_text().strip())
            except (OSError, ValueError):
                continue
            if limit_text == "max":
                return None
            try:
                limit = int(limit_text)
            except ValueError:
                return None
            if limit >= 1 << 60:  # cgroup v1's "unlimited"
                return None
            return max(0, limit - usage)
    return None


def available() -> int:
    """Bytes this process can still use: MemAvailable of /proc/meminfo, or less where a cgroup limit says so."""
    values = [v for v in (_meminfo_available(), _cgroup_left()) if v is not None]
    if not values:
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return 16 << 30
    return min(values)


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in a size such as ``24G``, ``512M``, ``1.5GiB`` or ``1000000`` (units of 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"--max-memory {text!r}: give a size such as 24G, 512M or 1.5G")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not math.isfinite(value) or value < 1:
        raise UsageError(f"--max-memory {text!r}: the size must be positive")
    return int(value)


def budget(max_memory: str | int | None = None) -> int:
    """The memory budget in bytes: ``max_memory`` (bytes, or a size like ``24G``), or 70% of :func:`available`."""
    if max_memory is None:
        return int(DEFAULT_SHARE * available())
    if isinstance(max_memory, bool):
        raise UsageError(f"--max-memory {max_memory!r}: give a size such as 24G or 512M")
    if isinstance(max_memory, int):
        if max_memory < 1:
            raise UsageError(f"--max-memory {max_memory}: the size must be positive")
        return max_memory
    return parse_size(max_memory)


def gb(n_bytes: float) -> str:
    """``n_bytes`` as GB with one decimal (``31.2 GB``), or MB below 1 GB."""
    if n_bytes < 1e9:
        return f"{n_bytes / 1e6:.0f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e6:.1f} MB"
    return f"{n_bytes / 1e9:.1f} GB"


@dataclass(frozen=True)
class Plan:
    """The path chosen for a fit: its predicted ``peak`` (bytes), the ``budget`` and every path's estimate."""

    head: str
    path: str
    peak: int
    budget: int
    estimates: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the log: the path, its predicted peak and the budget."""
        return f"{self.head}: {self.path} path, predicted peak {gb(self.peak)} of a {gb(self.budget)} budget"


def _check(head: str, path: str, n: int, d: int, n_classes: int) -> None:
    if head not in PATHS:
        raise UsageError(f"unknown head {head!r} for the memory plan: use one of {', '.join(PATHS)}")
    if path not in PATHS[head]:
        raise UsageError(f"the {head} head has no {path!r} path: use one of {', '.join(PATHS[head])}")
    for name, value in (("rows", n), ("features", d), ("classes", n_classes)):
        if int(value) < 1:
            raise UsageError(f"the memory plan needs at least one of {name}, got {value}")


def parts(head: str, path: str, n: int, d: int, n_classes: int, *, data_in_memory: bool = True,
          choose_c: bool = False) -> tuple[dict[str, int], dict[str, int]]:
    """The arrays behind :func:`estimate`: ``(held, transient)``, bytes by name.

    ``held`` arrays live together through the fit; of the ``transient`` ones (phases that follow each other) only
    the largest is counted.  :func:`estimate` is ``sum(held) + max(transient)``.
    """
    _check(head, path, n, d, n_classes)
    n, d, k = int(n), int(d), int(n_classes)
    k_out = 1 if k == 2 else k  # one-vs-rest columns (one score for two classes)
    k_scores = max(k, 2)
    d1 = d + 1
    small = n * d <= _FLOAT64_BELOW
    held: dict[str, int] = {"fixed": _FIXED, "scores": 2 * n * k_scores * 8}
    transient: dict[str, int] = {}
    if path != "stream" and data_in_memory:
        held["data"] = n * d * 4  # the float32 train rows, scaled in place
    if choose_c and head in ("svm", "svm-rbf") and path != "stream":
        # C="auto" first fits on a copy of the rows it does not hold out; that phase's solver arrays, built on
        # fewer rows, are freed before the final fit's, so the copy is all it adds
        held["c_choice_rows"] = (n - int(C_HELD_OUT * n)) * d * 4
    m = min(n, CHUNK_ROWS)
    if head == "svm" and path == "gram":
        held["gram"] = n * n * 8
        # the inverse of K + I/2C: float64 below _MIXED_PRECISION_FROM rows; above, float32 and possibly a float64
        # one computed while the float32 one is still referenced (when float32 cannot resolve the matrix)
        held["gram_inverse"] = n * n * (8 + (4 if n >= _MIXED_PRECISION_FROM else 0))
        held["margins"] = _NEWTON_MARGINS * n * k_out * 8
        inactive = max(1, int(_INACTIVE_SHARE * n))
        held["class_caches"] = k_out * (inactive * n * 8 + 2 * inactive * inactive * 8)
        if small:
            transient["float64_rows"] = n * d * 8  # for the exact Gram product
        transient["coef"] = 3 * k_out * d * 8
    elif head == "svm" and path == "feature":
        held["cross_product"] = d1 * d1 * 8
        held["preconditioner"] = d1 * d1 * 8
        held["margins"] = _NEWTON_MARGINS * n * k_out * 8
        held["cg_vectors"] = 14 * d1 * k_out * 8
        if small:
            held["float64_rows"] = n * d * 8
        transient["hessian_copy"] = d1 * d1 * 8  # I + 2C M before its factorization
        if d1 <= _FEATURE_DIRECT_MAX:
            # per-class active-set Hessians: the rows of the smaller set, their product, the Hessian and its factor
            transient["class_hessians"] = (n // 2 + 1) * d * (8 if small else 4) + d * d * 4 + 3 * d1 * d1 * 8
    elif path == "stream" and head in ("svm", "logreg", "mlp"):
        chunk_bytes = m * d * 4
        held["chunks"] = 2 * chunk_bytes + (m * d * 8 if small else 0)  # read, scaled copy, float64 copy
        if head == "mlp":
            held["torch_runtime"] = _TORCH_RUNTIME
            held["network"] = _MLP_COPIES * (d * _MLP_HIDDEN + _MLP_HIDDEN * k + _MLP_HIDDEN + k) * 4
        else:
            held["lbfgs"] = _LBFGS_VECTORS * d1 * k_out * 8
            held["chunk_margins"] = _SOFTMAX_MARGINS * m * k_out * 8
        if head == "svm":
            r = min(_NYSTROM_RANK, d1)
            held["nystrom"] = _NYSTROM_MATRICES * d1 * r * 8 + m * r * 8
    elif head == "logreg":  # memory
        held["lbfgs"] = _LBFGS_VECTORS * d1 * k_out * 8
        held["margins"] = _SOFTMAX_MARGINS * n * k_out * 8
        if small:
            transient["float64_rows"] = n * d * 8  # one float64 copy per objective evaluation
    elif head == "mlp":  # memory
        held["split_copies"] = n * d * 4 if data_in_memory else 0  # training and validation rows, taken apart
        held["torch_runtime"] = _TORCH_RUNTIME
        held["network"] = _MLP_COPIES * (d * _MLP_HIDDEN + _MLP_HIDDEN * k + _MLP_HIDDEN + k) * 4
    else:  # svm-rbf, memory
        held["float64_rows"] = n * d * 8  # SVC works on float64
        held["support_vectors"] = n * d * 8  # at most every row
        held["kernel_cache"] = _SVC_CACHE
        held["dual"] = n * max(k - 1, 1) * 8 * 2
        transient["ovo_scores"] = 3 * m * max(k * (k - 1) // 2, 1) * 8  # one-vs-one decisions of a scored chunk
    return held, transient


def estimate(head: str, path: str, n: int, d: int, n_classes: int, *, data_in_memory: bool = True,
             choose_c: bool = False) -> int:
    """Predicted peak bytes of fitting ``head`` by ``path`` on ``n`` rows of ``d`` features in ``n_classes`` classes.

    ``data_in_memory``: count the float32 train rows the fit holds (False when a caller counts them once for
    several fits, as a search does).  A ``stream`` path never holds them: only a chunk at a time.
    ``choose_c``: the SVM chooses its C on held-out rows first (``C="auto"``).
    """
    held, transient = parts(head, path, n, d, n_classes, data_in_memory=data_in_memory, choose_c=choose_c)
    return int(sum(held.values()) + max(transient.values(), default=0))


def paths_by_speed(head: str, n: int, d: int) -> tuple[str, ...]:
    """``head``'s paths, fastest first for ``n`` rows of ``d`` features (the order :func:`plan_fit` tries)."""
    if head not in PATHS:
        raise UsageError(f"unknown head {head!r} for the memory plan: use one of {', '.join(PATHS)}")
    if head == "svm":
        return ("gram", "feature", "stream") if n <= d + 1 else ("feature", "gram", "stream")
    return PATHS[head]


def plan_fit(head: str, n: int, d: int, n_classes: int, *, budget: int, path: str | None = None,
             data_in_memory: bool = True, choose_c: bool = False) -> Plan:
    """The fastest path of ``head`` whose :func:`estimate` fits ``budget`` bytes (or ``path``, when given, if it fits).

    Order: for the svm ``gram`` first when ``n <= d + 1`` (few rows, many features) else ``feature``, then the
    other, then ``stream``; for the others ``memory`` then ``stream``.

    Raises:
        NotEnoughMemory: ``path`` was given and exceeds the budget, or every path does (one line, naming what the
            cheapest path needs).
        UsageError: an unknown head or path.
    """
    order = paths_by_speed(head, int(n), int(d))
    if path is not None:
        _check(head, path, n, d, n_classes)
    estimates = {p: estimate(head, p, n, d, n_classes, data_in_memory=data_in_memory, choose_c=choose_c)
                 for p in order}
    if path is not None:
        if estimates[path] > budget:
            raise NotEnoughMemory(_refusal(head, path, estimates[path], budget))
        return Plan(head, path, estimates[path], int(budget), estimates)
    for p in order:
        if estimates[p] <= budget:
            return Plan(head, p, estimates[p], int(budget), estimates)
    cheapest = min(order, key=lambda p: estimates[p])
    raise NotEnoughMemory(_refusal(head, cheapest, estimates[cheapest], budget))


def _refusal(head: str, path: str, need: int, have: int) -> str:
    return f"needs {gb(need)} for the {head} {path} path, budget {gb(have)} (--max-memory)"
