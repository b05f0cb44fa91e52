"""Cross-validation folds as views of one matrix (:class:`FoldLayout`), and values kept within a memory budget
(:class:`Kept`): what lets a search hold its rows once and its solver states while memory allows."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FoldLayout:
    """K folds of the train rows as row ranges of ONE matrix, so that every fold's train and validation rows are
    contiguous views of it, never copies.

    The validation blocks ``B0 .. B(K-1)`` (each fold's rows, in file order) are laid out as
    ``B1 .. B(K-1), B0, B1 .. B(K-2)``: fold 0 trains on the first K-1 blocks, fold f >= 1 on the K-1 blocks from
    position f, and each fold's validation block is one of them.  The matrix holds ``(2K - 2) / K`` times the
    train rows (4/3 for 3 folds), where a copy per fold held ``K + 1`` times them.
    """

    order: np.ndarray  # train-row index (0 .. n-1) of each row of the matrix
    train: tuple[slice, ...]  # per fold: its train rows in the matrix
    val: tuple[slice, ...]  # per fold: its validation rows in the matrix

    @classmethod
    def of(cls, folds: list[tuple[np.ndarray, np.ndarray]]) -> FoldLayout:
        k = len(folds)
        blocks = [np.sort(np.asarray(va)) for _, va in folds]
        ids = list(range(1, k)) + [0] + list(range(1, k - 1))
        starts = np.cumsum([0] + [len(blocks[b]) for b in ids]).tolist()
        train = tuple(slice(starts[p], starts[p + k - 1]) for p in [0] + list(range(1, k)))
        val = tuple(slice(starts[k - 1 if f == 0 else f - 1], starts[k if f == 0 else f]) for f in range(k))
        return cls(np.concatenate([blocks[b] for b in ids]), train, val)

    def fit_rows(self, f: int) -> int:
        return self.train[f].stop - self.train[f].start


class Kept:
    """Values kept while their sizes fit ``limit`` bytes; the least recently used are released first.

    Keys are tuples; dropping ``("data", x)`` drops every ``("state", x, ...)`` with it (what was built on it).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()

    def get(self, key: Any, make: Any, size: int, *, keep: tuple = ()) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key][0]
        used = sum(sz for _, sz in self.items.values())
        for old in [k for k in self.items if k not in keep]:
            if used + size <= self.limit:
                break
            used -= self.drop(old)
        value = make()
        self.items[key] = (value, size)
        return value

    def drop(self, key: Any) -> int:
        _, size = self.items.pop(key)
        if key[0] == "data":  # a scaling's rows: the solver states built on them go with them
            for other in [k for k in self.items if k[0] == "state" and k[1] == key[1]]:
                size += self.items.pop(other)[1]
        return size
