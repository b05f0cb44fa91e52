"""``C="auto"``: the SVM's ``C`` chosen on held-out rows along a grid of values, then the head refitted on every row.

The grid is anchored at SVMlight's default ``C = 1 / mean K(x, x)`` (T. Joachims, *Making large-scale SVM learning
practical*, 1999; the svm_learn ``-c`` option): for the linear head, whose intercept is a weight on a constant 1,
``K(x, x) = ||x||^2 + 1``; for the RBF kernel ``K(x, x) = 1``.  It spans ``10^-2.5`` to ``10^3`` times that
anchor in half decades and is walked upwards: the solvers are fastest at small ``C`` and each value warm-starts
from the previous one, while large values, slow to solve, are reached only while held-out accuracy still pays for
them.  The walk stops once ``PATIENCE`` values in a row score below the best so far; equal scores keep the
smaller ``C``.

Held out: a seeded ``featx.memory.C_HELD_OUT`` share of the rows.  With fewer than ``MIN_ROWS_PER_CLASS`` rows per
class (few-shot data) nothing is held out and the anchor itself is used.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ..memory import C_HELD_OUT

logger = logging.getLogger(__name__)

AUTO = "auto"
GRID = tuple(10.0 ** (e / 2) for e in range(-5, 7))  # multiples of the anchor, walked in this order
PATIENCE = 2
MIN_ROWS_PER_CLASS = 10


def is_auto(C: object) -> bool:
    """Whether ``C`` asks for the held-out choice."""
    return isinstance(C, str) and C == AUTO


def held_out_mask(n: int, n_classes: int, seed: int | None) -> np.ndarray | None:
    """Rows to hold out (a seeded ``C_HELD_OUT`` share), or None when there are too few rows to hold any out."""
    if n < MIN_ROWS_PER_CLASS * max(int(n_classes), 2):
        return None
    mask = np.random.default_rng(0 if seed is None else seed).random(n) < C_HELD_OUT
    return mask if 0 < int(mask.sum()) < n else None


def mean_sq_norm(X: np.ndarray, rows: int = 4096) -> float:
    """``mean ||x||^2`` over the rows of ``X``, in float64, a block of rows at a time."""
    total = 0.0
    for s in range(0, X.shape[0], rows):
        block = np.asarray(X[s : s + rows], dtype=np.float64)
        total += float(np.einsum("ij,ij->", block, block))
    return total / max(X.shape[0], 1)


def walk(anchor: float, score: Callable[[float], tuple[float, Any]]) -> tuple[float, list[tuple[float, float]], Any]:
    """Score ``C = anchor * g`` for ``g`` in :data:`GRID`, upwards, until ``PATIENCE`` scores in a row fall below
    the best.  ``score(C)`` returns the held-out accuracy and what to keep of that fit should it be the best.
    Returns the best ``C`` (the smallest among equals), every ``(C, accuracy)`` tried and what the best fit kept."""
    best_c, best, kept, worse = anchor, -np.inf, None, 0
    path: list[tuple[float, float]] = []
    for g in GRID:
        C = float(anchor * g)
        s, state = score(C)
        path.append((C, float(s)))
        logger.info("C=%.3g: held-out accuracy %.4f", C, s)
        if s > best:
            best_c, best, kept, worse = C, s, state, 0
        elif s < best:
            worse += 1
            if worse >= PATIENCE:
                break
    logger.info("C=%.3g chosen on held-out rows (%d values tried)", best_c, len(path))
    return best_c, path, kept


def linear_accuracy(X: np.ndarray, rows: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray,
                    block: int = 4096) -> float:
    """:func:`stream_accuracy` over ``X[rows]`` (class indices ``y``), a block of rows at a time."""

    def blocks():
        for s in range(0, len(rows), block):
            yield X[rows[s : s + block]], y[s : s + block]

    return stream_accuracy(blocks, coef, intercept)


def _predicted(scores: np.ndarray) -> np.ndarray:
    return (scores[:, 0] > 0).astype(np.int64) if scores.shape[1] == 1 else np.argmax(scores, axis=1)


def stream_accuracy(batches: Callable, coef: np.ndarray, intercept: np.ndarray) -> float:
    """Accuracy of the one-vs-rest scores over ``batches()`` of ``(X, class indices)``."""
    W = np.asarray(coef, dtype=np.float32).T
    b = np.asarray(intercept, dtype=np.float32)
    hits = seen = 0
    for Xc, yc in batches():
        hits += int((_predicted(np.asarray(Xc, dtype=np.float32) @ W + b) == yc).sum())
        seen += len(yc)
    return hits / max(seen, 1)
