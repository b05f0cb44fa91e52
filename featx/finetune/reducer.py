"""One process or several: what the training loop does differently under torchrun, in one place.

The loop is written once, for any number of processes; what depends on it goes through a :class:`Reducer`:
which part of a batch and of an evaluation set this process takes, the loss of a step (the mean over the global
batch, whichever rank holds which images), sums and gatherings over the ranks, the model DDP wraps, and the
stop check of a step (the ranks stop together, at the same step).  :class:`Reducer` is the single process, where
each of these is the identity; :class:`DDPReducer` the torchrun ranks (DistributedDataParallel, ``batch_size``
the global batch).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from featx import distributed, interrupt

STOP_POINT = "finetune.step"


class Reducer:
    """One process: every image is this process's, every sum is already the total."""

    def __init__(self, ctx: distributed.Context | None = None):
        self.ctx = ctx or distributed.Context()

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def is_main(self) -> bool:
        """The process that writes (checkpoints, history, curves, the model)."""
        return self.ctx.is_main

    def part(self, batch: list[int]) -> list[int]:
        """This process's part of a training batch."""
        return batch

    def share(self, paths: list[Path], labels: np.ndarray) -> tuple[list[Path], np.ndarray]:
        """This process's share of an evaluation set."""
        return paths, labels

    def wrap(self, net: nn.Module, dev: torch.device) -> nn.Module:
        """The module a training epoch runs (rebuilt each epoch: what trains may change)."""
        return net

    def step_images(self, n: int) -> int:
        """The images of the step in every process, ``n`` of them here; raises :class:`~featx.interrupt.Interrupted`
        when a stop was requested (before the step: it then changes nothing)."""
        interrupt.check(STOP_POINT)
        return n

    def loss(self, logits: torch.Tensor, target: torch.Tensor, n_step: int) -> torch.Tensor:
        """The loss to step on: the mean cross-entropy over the step's ``n_step`` images."""
        return F.cross_entropy(logits.float(), target)

    def mean(self, value: float) -> float:
        """The step's loss over every process (what the divergence guard checks)."""
        return value

    def sum(self, values: Sequence[Any]) -> list[Any]:
        """Element-wise sums over the processes."""
        return list(values)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        return [obj]


class DDPReducer(Reducer):
    """The ranks of a torchrun job: each takes its consecutive part of every global batch and evaluation set."""

    def part(self, batch: list[int]) -> list[int]:
        return np.array_split(np.asarray(batch), self.world_size)[self.rank].tolist()

    def share(self, paths: list[Path], labels: np.ndarray) -> tuple[list[Path], np.ndarray]:
        idx = np.array_split(np.arange(len(paths)), self.world_size)[self.rank]
        return [paths[i] for i in idx], labels[idx]

    def wrap(self, net: nn.Module, dev: torch.device) -> nn.Module:
        """``net`` in DistributedDataParallel over its parameters that train now (DDP fixes that set when built).
        Building it broadcasts rank 0's parameters, so every rank starts the epoch from the same weights."""
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)

    def step_images(self, n: int) -> int:
        # one rank alone stopping would leave the others waiting in DDP: the request is shared with the count
        interrupt.mark(STOP_POINT)
        n_global, stops = self.ctx.all_reduce_sum([n, interrupt.stop_requested() is not None])
        if stops:
            raise interrupt.Interrupted(interrupt.stop_requested() or "SIGTERM", STOP_POINT)
        return int(n_global)

    def loss(self, logits: torch.Tensor, target: torch.Tensor, n_step: int) -> torch.Tensor:
        # DDP averages the ranks' gradients: x world_size / the global count makes that the global mean's
        return F.cross_entropy(logits.float(), target, reduction="sum") * (self.world_size / n_step)

    def mean(self, value: float) -> float:
        return self.ctx.all_reduce_sum([value])[0] / self.world_size

    def sum(self, values: Sequence[Any]) -> list[Any]:
        return self.ctx.all_reduce_sum(values)

    def gather(self, obj: Any) -> list[Any]:
        return self.ctx.all_gather(obj)


def reducer_for(ctx: distributed.Context) -> Reducer:
    """The reducer of this process's place: :class:`DDPReducer` under torchrun with several ranks."""
    return DDPReducer(ctx) if ctx.active else Reducer(ctx)
