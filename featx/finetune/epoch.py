"""One training epoch: its steps, each checked by the divergence guard, and the epoch's record.

Before each step the stop check runs (``finetune.step``, :mod:`featx.interrupt`): a stop requested then saves,
through ``on_stop``, the step's index, the epoch's running sums and the random state that drives dropout, so
that the next run takes that very step as this one would have.  Dropout draws from ``(seed, epoch)`` inside a
forked generator, the caller's random state untouched.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from featx import interrupt
from featx.backbones import Preprocess
from featx.devices import cuda_rng_devices
from featx.errors import DataError
from featx.finetune.data import TrainSet, batches_of, dropout_seed, epoch_seed, make_loader
from featx.finetune.guard import DivergenceGuard, grad_norm
from featx.finetune.learner import Learner, autocast
from featx.finetune.reducer import Reducer

logger = logging.getLogger(__name__)


@dataclass
class EpochSums:
    """An epoch's running figures: loss and correct predictions summed over the images, images seen and
    skipped, each step's gradient norm and loss (over every rank)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    bad: int = 0
    norms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    @classmethod
    def resumed(cls, partial: dict, *, is_main: bool) -> EpochSums:
        """The sums of the steps a stopped run took (on rank 0; the others start from 0, summed at the end)."""
        s = cls(norms=[float(v) for v in partial.get("grad_norms") or []],
                losses=[float(v) for v in partial.get("losses") or []])
        if is_main:
            s.loss_sum, s.correct = float(partial["loss_sum"]), int(partial["correct"])
            s.seen, s.bad = int(partial["seen"]), int(partial["bad"])
        return s

    def total(self, reducer: Reducer) -> EpochSums:
        """The sums over every rank (the lists are already global)."""
        loss_sum, correct, seen, bad = reducer.sum([self.loss_sum, self.correct, self.seen, self.bad])
        return EpochSums(loss_sum, int(correct), int(seen), int(bad), self.norms, self.losses)


def rng_state(devices: list[int]) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state(d) for d in devices]}


def set_rng_state(state: dict, devices: list[int]) -> None:
    torch.set_rng_state(state["cpu"])
    for d, s in zip(devices, state.get("cuda") or []):
        torch.cuda.set_rng_state(s, d)


class TrainEpoch:
    """Runs epochs of steps of ``learner`` over ``train_set`` (``train_labels``: the logit index of each image)."""

    def __init__(self, learner: Learner, train_set: TrainSet, train_labels: torch.Tensor, pre: Preprocess,
                 dev: torch.device, *, reducer: Reducer, guard: DivergenceGuard, workers: int, show: bool):
        self.learner = learner
        self.opts = learner.opts
        self.train_set = train_set
        self.train_labels = train_labels
        self.pre = pre
        self.dev = dev
        self.reducer = reducer
        self.guard = guard
        self.workers = workers
        self.show = show

    def __call__(self, epoch: int, top: set[int], partial: dict | None, on_stop: Callable[[dict], None]) -> dict:
        """Epoch ``epoch`` with the backbone groups ``top`` training, from step ``partial["step"]`` when a stopped
        run is resumed; its record (losses, accuracy, rates, gradient norms, what the guard compared).

        Raises:
            Diverged: the guard stopped a step. Interrupted: a stop was requested (``on_stop`` got the state).
            DataError: no training image could be decoded.
        """
        t0 = time.perf_counter()
        done = int(partial["step"]) if partial is not None else 0  # steps a stopped run already took
        batches = self._batches(epoch)
        loader = make_loader(self.train_set, batches[done:], workers=self.workers, pin=self.dev.type == "cuda")
        self.learner.net.set_trainable(top, dropout=self.opts.backbone_dropout)
        model = self.reducer.wrap(self.learner.net, self.dev)  # rebuilt each epoch: what trains may change
        sums = EpochSums.resumed(partial, is_main=self.reducer.is_main) if partial is not None else EpochSums()
        if partial is not None:
            t0 -= float(partial["train_seconds"])
        step, stop_rng = done, None
        bar = tqdm(total=sum(map(len, batches)), unit="img", disable=not self.show, file=sys.stderr,
                   desc=f"epoch {epoch}", dynamic_ncols=True)
        devices = cuda_rng_devices(self.dev)
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(dropout_seed(self.opts.seed, epoch, self.reducer.rank))
                steps = iter(loader)  # draws the loader's seed now, before a resumed RNG state is put back
                if partial is not None and self.reducer.is_main:
                    set_rng_state(partial["rng"], devices)
                for step, (idx, pixels, skipped) in enumerate(steps, done):
                    try:
                        n_step = self.reducer.step_images(len(idx))
                    except interrupt.Interrupted:
                        stop_rng = rng_state(devices)  # dropout's generator as step `step` would find it
                        raise
                    sums.bad += len(skipped)
                    bar.update(len(idx) + len(skipped))
                    if n_step == 0:
                        continue  # no image of the step decoded anywhere: every rank skips it
                    self._step(model, idx, pixels, n_step, sums, epoch, step)
        except interrupt.Interrupted:
            if stop_rng is not None:  # every rank stopped at this step: rank 0 saves the sums of all
                s = sums.total(self.reducer)
                on_stop({"epoch": epoch, "step": step, "loss_sum": s.loss_sum, "correct": s.correct,
                         "seen": s.seen, "bad": s.bad, "train_seconds": time.perf_counter() - t0, "rng": stop_rng,
                         "grad_norms": list(s.norms), "losses": list(s.losses)})
            raise
        finally:
            bar.close()
        return self._record(epoch, sums.total(self.reducer), t0)

    def _batches(self, epoch: int) -> list[list[int]]:
        """This rank's part of each global batch of the epoch, in the epoch's order (drawn from ``(seed, epoch)``)."""
        order = np.random.default_rng(epoch_seed(self.opts.seed, epoch)).permutation(len(self.train_set))
        self.train_set.epoch = epoch
        return [self.reducer.part(b) for b in batches_of(len(self.train_set), self.opts.batch_size, order)]

    def _step(self, model: torch.nn.Module, idx: list[int], pixels: torch.Tensor | None, n_step: int,
              sums: EpochSums, epoch: int, step: int) -> None:
        """One optimizer step on the decoded images ``idx`` (``n_step`` over every rank)."""
        learner, dev = self.learner, self.dev
        if pixels is None:  # this rank's part is empty or undecodable: it still joins the all-reduce
            pixels = torch.zeros((0, 3, self.pre.crop, self.pre.crop), dtype=torch.uint8)
        y = self.train_labels[idx].to(dev, non_blocking=True)
        x = self.pre.normalize(pixels.to(dev, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        with autocast(dev, self.opts.amp):
            z = model(x)
            loss = self.reducer.loss(z, y, n_step)
        value = float(loss.detach())
        # checked before backward (the step then changes nothing), on the global batch's mean loss, so that under
        # DDP every rank stops at the same step
        self.guard.record_loss(sums.losses, self.reducer.mean(value), epoch, step + 1)
        learner.opt.zero_grad(set_to_none=True)
        learner.scaler.scale(loss).backward()
        norm = grad_norm(learner.opt, learner.scaler, self.opts.clip_grad)
        self.guard.check_grad(norm, learner.scaler, epoch, step + 1)
        learner.scaler.step(learner.opt)
        learner.scaler.update()
        if math.isfinite(norm):
            sums.norms.append(norm)
        sums.loss_sum += value * (n_step / self.reducer.world_size)  # this rank's share of the global sum
        sums.correct += int((z.detach().argmax(1) == y).sum())
        sums.seen += len(idx)

    def _record(self, epoch: int, s: EpochSums, t0: float) -> dict:
        if s.bad:
            logger.warning("epoch %d: %d training image(s) could not be decoded and were skipped", epoch, s.bad)
        if not s.seen:
            raise DataError("no training image could be decoded")
        dt = time.perf_counter() - t0
        g = np.asarray(s.norms)
        clip = {"clipped_steps": int((g > self.opts.clip_grad).sum())} if self.opts.clip_grad else {}
        lrs = self.learner.lrs
        return {"epoch": epoch, "train_loss": s.loss_sum / s.seen, "train_accuracy": s.correct / s.seen,
                "lr": lrs[0], **({"backbone_lr": lrs[1]} if len(lrs) > 1 else {}),
                "train_images": s.seen, "train_seconds": round(dt, 3),
                "train_images_per_s": round(s.seen / dt, 2), "_t0": t0,
                # gradient L2 norms before clipping (head and backbone together): what --clip-grad is compared with
                "grad_norm_median": round(float(np.median(g)), 4) if len(g) else None,
                "grad_norm_max": round(float(g.max()), 4) if len(g) else None, **clip,
                **self.guard.loss_figures(s.losses)}
