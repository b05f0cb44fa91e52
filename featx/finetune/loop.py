"""The training loop: epochs of a :class:`~featx.finetune.epoch.TrainEpoch` under the divergence guard, each
followed by its evaluation, the choice of the kept epoch, its TensorBoard points and its checkpoint.

:class:`Trainer` is the loop and what it calls; the pieces live beside it: :mod:`.epoch` (the steps),
:mod:`.guard` (divergence), :mod:`.evaluate` (measures and the kept-epoch rule), :mod:`.checkpoint` (what is
saved and resumed), :mod:`.reducer` (one process or torchrun ranks) and :mod:`featx.curves` (TensorBoard).
"""
from __future__ import annotations

import functools
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from featx.curves import EventLog
from featx.errors import DivergenceError
from featx.finetune.checkpoint import (
    CHECKPOINT,
    HISTORY,
    Checkpoint,
    Progress,
    checkpoint_to_resume,
    save_checkpoint,
    write_history,
)
from featx.finetune.data import ImageRows, TrainSet, split_rows
from featx.finetune.epoch import TrainEpoch
from featx.finetune.evaluate import Evaluator, better
from featx.finetune.guard import DivergenceGuard
from featx.finetune.learner import Learner, backbone_lr_scale, cpu_state
from featx.finetune.options import FinetuneOptions, trainable_groups
from featx.finetune.output import fmt, head_test_accuracy, write_model
from featx.finetune.reducer import Reducer
from featx.model import FinetuneNet, HeadModel

logger = logging.getLogger(__name__)

OnEpoch = Callable[[int, FinetuneNet, dict], None]


class Trainer:
    """Fine-tunes ``hm``'s network on ``rows`` into the model directory ``out`` (of key ``key``).

    ``resume``: see :func:`featx.finetune.checkpoint.checkpoint_to_resume`.  ``on_epoch(epoch, net, record)``
    is called after each epoch's checkpoint.
    """

    def __init__(self, hm: HeadModel, rows: ImageRows, out: Path, key: str, opts: FinetuneOptions,
                 dev: torch.device, *, reducer: Reducer, workers: int, resume: bool | None, progress: bool | None,
                 on_epoch: OnEpoch | None = None):
        self.hm, self.out, self.key, self.opts, self.dev, self.reducer = hm, out, key, opts, dev, reducer
        self.resume, self.on_epoch = resume, on_epoch
        net = hm.net
        index_of = np.full(len(hm.classes), -1, dtype=np.int64)  # class index -> logit index (-1: never seen)
        index_of[hm.logit_classes] = np.arange(len(hm.logit_classes))
        self.parts, self.val_source = split_rows(rows, opts.seed)
        self.lr_scale = backbone_lr_scale(hm.feature_spread) if opts.scale_backbone_lr else 1.0
        self._log_start()
        net.to(dev).to(memory_format=torch.channels_last)
        self.learner = Learner(net, opts, backbone_lr=opts.lr * opts.backbone_lr_factor * self.lr_scale,
                               cuda_amp=opts.amp and dev.type == "cuda")
        undo = tuple(f for f, on in (("--no-scale-backbone-lr", not opts.scale_backbone_lr),
                                     ("--backbone-dropout", opts.backbone_dropout)) if on)
        self.guard = DivergenceGuard(chance=math.log(max(2, len(hm.logit_classes))), recover=opts.recover, undo=undo)
        self.evaluate = Evaluator(self.parts, hm.preprocess, dev, index_of, amp=opts.amp, reducer=reducer,
                                  batch_size=opts.batch_size, workers=workers)
        train_set = TrainSet(self.parts["train"][0], hm.preprocess, opts.augments, opts.seed)
        self.train_epoch = TrainEpoch(self.learner, train_set, torch.from_numpy(index_of[self.parts["train"][1]]),
                                      hm.preprocess, dev, reducer=reducer, guard=self.guard, workers=workers,
                                      show=sys.stderr.isatty() if progress is None else bool(progress))

    def fit(self, t_start: float) -> dict:
        """Train, keep the best epoch's weights and write the model; its metrics (on every rank)."""
        p, resumed = self._start()
        events = EventLog(self.out, first_step=p.epoch + 1 if resumed else 0, enabled=self.reducer.is_main)
        if not resumed:
            events.write(0, p.initial, world_size=self.reducer.world_size)
        for epoch in range(p.epoch + 1, self.opts.epochs + 1):
            if p.stopped:
                break
            top = trainable_groups(self.learner.net.groups, self.opts.strategy, epoch, self.opts.gradual_every)
            if p.partial is None:  # a run stopped mid-epoch carries the retries it had made of that epoch
                p.recoveries = []
            rec, results = self.guard.run(epoch, functools.partial(self._epoch, epoch, top, p), self.learner, p)
            p.partial = None
            self._end_epoch(p, epoch, top, rec, results)
            # the curves' points before the checkpoint: a resume rewrites this epoch's, never duplicates them
            events.write(epoch, rec, world_size=self.reducer.world_size)
            self._save(p)
            if self.on_epoch is not None:
                self.on_epoch(epoch, self.learner.net, rec)
        events.close()
        return self._finish(p, t_start)

    def _epoch(self, epoch: int, top: set[int], p: Progress) -> tuple[dict, dict[str, dict]]:
        """One attempt at ``epoch``: its steps, then its evaluation, checked by the guard."""
        rec = self.train_epoch(epoch, top, p.partial, lambda partial: self._save(p, partial))
        results = self.evaluate(self.learner.net)
        before = p.history[-1]["val_loss"] if p.history else p.initial["val_loss"]  # where this epoch began
        self.guard.check_evaluation(results, before, epoch)
        return rec, results

    def _start(self) -> tuple[Progress, bool]:
        """``(progress, resumed)``: from the checkpoint, or from the head measured before any step."""
        ck = checkpoint_to_resume(self.out, self.key, self.resume)
        if ck is not None:
            self.learner.load(ck.learner)
            p = ck.progress
            start = p.epoch + 1
            if p.partial is not None and int(p.partial["epoch"]) == start:  # stopped mid-epoch: at that very step
                logger.info("resuming %s at step %d of epoch %d of %d (checkpoint %s)", self.key,
                            int(p.partial["step"]), start, self.opts.epochs, self.out / CHECKPOINT)
            else:
                p.partial = None
                logger.info("resuming %s after epoch %d of %d (checkpoint %s)", self.key, p.epoch, self.opts.epochs,
                            self.out / CHECKPOINT)
        else:
            net = self.learner.net
            initial, test0, val0 = self.evaluate.before_training(net)
            logger.info("before training: test accuracy %.4f (the head's own: %s), val accuracy %s",
                        initial["test_accuracy"], fmt(head_test_accuracy(self.hm)), fmt(initial["val_accuracy"]))
            best = {"epoch": 0, "val_accuracy": initial["val_accuracy"], "val_loss": initial["val_loss"]}
            p = Progress(initial, best, cpu_state(net) if val0 else None, test0)
        # every rank must start from the same place (a model directory only some ranks see would not)
        self.reducer.ctx.agree(
            {"checkpoint": (p.epoch + 1, len(p.history), int(p.partial["step"]) if p.partial is not None else None)},
            what="checkpoint (the model directory must be shared)")
        return p, ck is not None

    def _end_epoch(self, p: Progress, epoch: int, top: set[int], rec: dict, results: dict[str, dict]) -> None:
        """The epoch's record completed, the schedule stepped, the kept epoch and early stopping decided."""
        rec["recoveries"] = p.recoveries
        for s, r in results.items():
            rec[f"{s}_loss"], rec[f"{s}_accuracy"] = r["loss"], r["accuracy"]
        rec.setdefault("val_loss", None)
        rec.setdefault("val_accuracy", None)
        self.learner.schedule_step(rec["val_loss"], rec["train_loss"])
        rec["unfrozen"] = [self.learner.net.groups[i].name for i in sorted(top)]
        rec["seconds"] = round(time.perf_counter() - rec.pop("_t0"), 3)
        if not self.evaluate.has_val or better(rec, p.best):
            p.best = {"epoch": epoch, "val_accuracy": rec["val_accuracy"], "val_loss": rec["val_loss"]}
            p.best_state = cpu_state(self.learner.net) if self.evaluate.has_val else None
            p.best_test = results["test"]  # the final test measure is this one: no second pass over the images
            p.bad_epochs = 0
        else:
            p.bad_epochs += 1
        p.history.append(rec)
        p.epoch = epoch
        logger.info("epoch %d/%d: train loss %.4f acc %.4f | val loss %s acc %s | test loss %s acc %s | "
                    "%.1f images/s, lr %.3g, %d backbone layer(s) training", epoch, self.opts.epochs,
                    rec["train_loss"], rec["train_accuracy"], fmt(rec["val_loss"]), fmt(rec["val_accuracy"]),
                    fmt(rec["test_loss"]), fmt(rec["test_accuracy"]), rec["train_images_per_s"], rec["lr"], len(top))
        early = self.opts.early_stop
        p.stopped = bool(early and p.bad_epochs >= early and self.evaluate.has_val)
        if p.stopped:
            logger.info("early stop: %d epoch(s) without a better validation accuracy; keeping epoch %d",
                        p.bad_epochs, p.best["epoch"])
        rec["world_size"] = self.reducer.world_size

    def _save(self, p: Progress, partial: dict | None = None) -> None:
        """The checkpoint of the run as it stands (the one place one is made): after an epoch, with the history;
        or stopped before step ``partial["step"]`` of epoch ``partial["epoch"]``, with the model, optimizer,
        scheduler and random state as they are now, so that the next run takes that step as this one would have."""
        if not self.reducer.is_main:  # every rank holds the same state (DDP); rank 0 writes it
            return
        progress = p if partial is None else replace(p, partial=partial)
        save_checkpoint(self.out / CHECKPOINT,
                        Checkpoint(self.key, progress, self.learner.state(), self.opts.to_json(), self.opts.seed))
        if partial is None:
            write_history(self.out / HISTORY, p.history)
        else:
            logger.info("stopped before step %d of epoch %d: checkpoint %s; the same command continues from there",
                        int(partial["step"]) + 1, int(partial["epoch"]), self.out / CHECKPOINT)

    def _finish(self, p: Progress, t_start: float) -> dict:
        """The kept epoch's weights into the network, then the model written (rank 0); its metrics."""
        net = self.learner.net
        if p.best_state is None:  # no validation images: the last epoch
            p.best = {"epoch": len(p.history), "val_accuracy": None, "val_loss": None}
        else:
            net.load_state_dict(p.best_state)
        if p.best["epoch"] == 0:
            net.envelope = None  # the untouched network, as measured before training: the head itself
            if p.history and self.reducer.is_main:
                logger.warning("no epoch did better than the head on validation (accuracy %s before training; "
                               "after epoch%s %s): the model written is the head itself, unchanged; see curve.png",
                               fmt(p.initial["val_accuracy"]), "s" if len(p.history) > 1 else "",
                               ", ".join(fmt(h["val_accuracy"]) for h in p.history))
        bad = [k for k, v in net.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:  # cannot happen past the guard; never write a model that is not finite
            raise DivergenceError(f"fine-tuning diverged: the kept weights are not finite ({bad[0]}); nothing was "
                                  f"written: use a lower --lr or --clip-grad 1.0")
        ctx = self.reducer.ctx
        if not ctx.is_main:
            return ctx.broadcast(None)  # rank 0's metrics, once it has written the model
        return ctx.broadcast(write_model(
            self.hm, net, self.out, self.key, self.opts, p, self.dev, self.parts, self.val_source, t_start,
            world_size=ctx.world_size, extra={"feature_spread": self.hm.feature_spread,
                                              "backbone_lr_scale": self.lr_scale}))

    def _log_start(self) -> None:
        hm, opts, net = self.hm, self.opts, self.hm.net
        logger.info("%s: fine-tuning %s %s head on %s %s (%s weights): %d train, %d val (%s), %d test images, "
                    "%d backbone layers, unfreeze %s, device %s", self.key, hm.head.meta.get("kind"), hm.head.layer,
                    hm.manifest["config"]["backbone"], hm.head.layer, hm.weights_id.get("kind"),
                    len(self.parts["train"][0]), len(self.parts["val"][0]), self.val_source,
                    len(self.parts["test"][0]), len(net.groups), opts.unfreeze, self.dev)
        name, n = opts.strategy
        if name == "last" and n > len(net.groups):
            logger.warning("--unfreeze last:%d: the backbone has only %d layers with parameters; all of them train",
                           n, len(net.groups))
        if net.groups and name not in ("none", "head"):
            logger.info("backbone lr %.3g (lr %g x --backbone-lr-factor %g x %.3g: the head's features vary by %s in "
                        "the backbone's units%s), backbone dropout %s",
                        opts.lr * opts.backbone_lr_factor * self.lr_scale, opts.lr, opts.backbone_lr_factor,
                        self.lr_scale, fmt(hm.feature_spread, ".3g"),
                        "" if opts.scale_backbone_lr else ", not scaled (--no-scale-backbone-lr)",
                        "on" if opts.backbone_dropout else "off")
