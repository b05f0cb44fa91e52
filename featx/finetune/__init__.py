"""``featx finetune``: a fitted head put back on its backbone and trained end to end.

:func:`featx.model.build_from_head` rebuilds the network that made the head's features with the head on top::

    images -> truncated(backbone, layer) -> fixed feature scaling -> head.to_torch() -> logits

which, before any step, classifies the test images exactly as the head classified their features (recorded as
``initial_test_accuracy`` beside the head's own ``head_test_accuracy``).  The images come from the source
feature set: its data root and, in the shards, every image's path, label and split.

Training is resumable the way extraction is: after every epoch a checkpoint (model, optimizer, scheduler, best
state, history) is written atomically with its sha256 embedded, and the same call run again continues from it.
Every random draw of an epoch (shuffle, augmentation, dropout) is derived from ``(seed, epoch)`` and, for an
augmented image, from its index too, so a resumed run repeats exactly what the uninterrupted one would have done,
whatever the number of decode workers.  The output, ``<cache>/models/<key>/``, loads without running code
(``model.pt`` is a plain state dict read with ``torch.load(weights_only=True)``; ``model.json`` describes the
architecture; :func:`featx.model.load_model`).

The parts: :mod:`.options` (:class:`FinetuneOptions`, the model's key), :mod:`.data` (images, augmentation,
loaders), :mod:`.learner` (optimizer, schedule, loss scaler), :mod:`.loop` (the training loop) with
:mod:`.epoch` (the steps), :mod:`.evaluate`, :mod:`.guard` (divergence), :mod:`.checkpoint` and
:mod:`.reducer` (one process or torchrun ranks), and :mod:`.output` (the model directory).  This module finds
the model directory, holds its lock and runs the loop, in one process or under torchrun.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, overload

import torch
from filelock import FileLock

from featx import distributed
from featx.cache import StagePlan, cache_root, write_command
from featx.devices import default_workers, resolve_device
from featx.errors import UsageError
from featx.finetune.checkpoint import CHECKPOINT, HISTORY, Checkpoint, Progress, load_checkpoint
from featx.finetune.data import VAL_FRACTION, ImageRows, augmented_pixels, feature_set_images, split_rows
from featx.finetune.guard import EXPLODE_FACTOR, EXPLODE_WINDOW, RECOVER_FACTOR, VAL_EXPLODE_FACTOR
from featx.finetune.learner import backbone_lr_scale
from featx.finetune.loop import OnEpoch, Trainer
from featx.finetune.options import (
    AUGMENTS,
    OPTIMIZERS,
    SCHEDULES,
    UNFREEZE_HELP,
    FinetuneOptions,
    parse_augment,
    parse_unfreeze,
    trainable_groups,
)
from featx.finetune.output import finished
from featx.finetune.reducer import Reducer, reducer_for
from featx.fit import FittedHead, load_fitted
from featx.locks import hold
from featx.model import build_from_head

__all__ = [
    "finetune", "FinetuneOptions", "FinetuneResult", "load_checkpoint", "parse_unfreeze", "parse_augment",
    "trainable_groups", "backbone_lr_scale", "feature_set_images", "augmented_pixels", "split_rows", "ImageRows",
    "Checkpoint", "Progress", "CHECKPOINT", "HISTORY", "AUGMENTS", "OPTIMIZERS", "SCHEDULES", "UNFREEZE_HELP",
    "VAL_FRACTION", "EXPLODE_FACTOR", "EXPLODE_WINDOW", "RECOVER_FACTOR", "VAL_EXPLODE_FACTOR",
]

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced: the model directory, its metrics, and whether it was computed now."""

    path: Path
    metrics: dict
    computed: bool


@overload
def finetune(head: str | os.PathLike, options: FinetuneOptions | None = None, *, device: str = "auto",
             workers: int | None = None, resume: bool | None = None, cache: str | os.PathLike | None = None,
             progress: bool | None = None, on_epoch: OnEpoch | None = None, plan: Literal[False] = False,
             **changes: Any) -> FinetuneResult: ...


@overload
def finetune(head: str | os.PathLike, options: FinetuneOptions | None = None, *, device: str = "auto",
             workers: int | None = None, resume: bool | None = None, cache: str | os.PathLike | None = None,
             progress: bool | None = None, on_epoch: OnEpoch | None = None, plan: Literal[True],
             **changes: Any) -> StagePlan: ...


def finetune(head: str | os.PathLike, options: FinetuneOptions | None = None, *, device: str = "auto",
             workers: int | None = None, resume: bool | None = None, cache: str | os.PathLike | None = None,
             progress: bool | None = None, on_epoch: OnEpoch | None = None, plan: bool = False,
             **changes: Any) -> FinetuneResult | StagePlan:
    """Put a fitted head back on its backbone and train the network end to end on the feature set's images.

    Args:
        head: a head directory (``featx fit`` output) whose feature set came from ``featx extract``.
        options: what to train (:class:`FinetuneOptions`; default: its defaults).  The model's key hashes them.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. workers: decode processes (default: one per core, up
            to 4).
        resume: None (default) continues an interrupted run of the same call from its checkpoint; True insists
            on a checkpoint (UsageError if there is none); False ignores one and starts again.
        cache: cache root. progress: tqdm bar (default: when stderr is a terminal).
        on_epoch: called after each epoch's checkpoint with ``(epoch, net, record)``; an exception it raises
            stops the run with that checkpoint kept (tests use it to stand for a kill).
        plan: train nothing: return a :class:`~featx.cache.StagePlan` saying where the model is and whether it
            is already fine-tuned (the options are checked as for a run).
        **changes: options by name, a shorthand for ``dataclasses.replace(options, **changes)``:
            ``finetune(head, epochs=5)`` is ``finetune(head, FinetuneOptions(epochs=5))``.

    Returns:
        :class:`FinetuneResult`: ``<cache>/models/<key>/`` with ``model.pt``, ``model.json``, ``metrics.json``
        (``initial_test_accuracy``, ``head_test_accuracy``, ``test_accuracy``, ``best_epoch``, ``curve``, ...),
        ``history.jsonl``, ``curve.png``, ``confusion.png``.

    Raises:
        UsageError: bad options, a head that cannot become torch layers (RBF SVM). DataError: images missing,
        layer/backbone mismatch. IntegrityError: a corrupt checkpoint (not loaded), changed head or weights file.
        DivergenceError: the loss or a gradient stayed non-finite, or exploded, after ``recover`` halvings of
        the learning rate (nothing of the diverged epoch is written; the previous epoch's checkpoint is left as
        it was).  TypeError: a keyword that is neither an argument nor an option.

    Example:
        >>> finetune("cache/heads/0123abcd", FinetuneOptions(epochs=5, unfreeze="last:2")).path  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    opts = _with_changes(options, changes)
    dev = resolve_device(device)
    fh = load_fitted(head)
    key = opts.model_key(fh.meta)
    root = cache_root(cache)
    out = root / "models" / key
    if plan:
        return StagePlan(out, finished(out) is not None, {"key": key})
    ctx = distributed.init(dev)  # under torchrun: this rank's place
    n_workers = default_workers() if workers is None else int(workers)
    run = _Run(fh, out, key, opts, n_workers, resume, progress, on_epoch, t_start)
    if ctx.active:
        return _finetune_ranks(ctx, run, ctx.device(dev), command=opts.command(fh.path, root))
    done = finished(out)
    if done is not None:
        logger.info("model %s is already fine-tuned", key)
        return FinetuneResult(out, done, False)
    with hold(out, what=f"fine-tuned model {key}"):
        done = finished(out)
        if done is not None:
            return FinetuneResult(out, done, False)
        for stale in out.glob(".tmp-*"):  # left by a killed write; we hold the lock
            stale.unlink(missing_ok=True)
        write_command(out, opts.command(fh.path, root))
        metrics = run.train(dev, reducer_for(ctx))
    return FinetuneResult(out, metrics, True)


def _with_changes(options: FinetuneOptions | None, changes: dict[str, Any]) -> FinetuneOptions:
    base = options if options is not None else FinetuneOptions()
    names = {f.name for f in fields(FinetuneOptions)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(f"finetune() got an unexpected keyword argument {unknown[0]!r} (the options are "
                        f"FinetuneOptions' fields: {', '.join(sorted(names))})")
    return replace(base, **changes) if changes else base


@dataclass
class _Run:
    """One fine-tuning call, resolved: what to train, where, and how it reports."""

    fh: FittedHead
    out: Path
    key: str
    opts: FinetuneOptions
    workers: int
    resume: bool | None
    progress: bool | None
    on_epoch: OnEpoch | None
    t_start: float

    def train(self, dev: torch.device, reducer: Reducer) -> dict:
        """Build the network (the features held to the head's train range while training) and train it."""
        hm = build_from_head(self.fh, envelope=True)
        rows = feature_set_images(Path(self.fh.meta["source"]["features"]), hm.manifest)
        trainer = Trainer(hm, rows, self.out, self.key, self.opts, dev, reducer=reducer, workers=self.workers,
                          resume=self.resume, progress=self.progress if reducer.is_main else False,
                          on_epoch=self.on_epoch)
        return trainer.fit(self.t_start)


def _finetune_ranks(ctx: distributed.Context, run: _Run, dev: torch.device, *, command: list[str]) -> FinetuneResult:
    """:func:`finetune` under torchrun: DistributedDataParallel, ``batch_size`` the global batch.

    The ranks first agree on every option (one error otherwise, before anything is written) and on the cache
    being shared; rank 0 holds the model's lock and alone writes checkpoints, history, curves and the model;
    every rank reads the same checkpoint to resume, so a rerun after any rank was killed continues from the
    last finished epoch, with any number of processes.
    """
    out, key, opts = run.out, run.key, run.opts
    ctx.agree({**opts.to_json(), "seed": opts.seed, "head": run.fh.meta.get("files"),
               "features": (run.fh.meta.get("source") or {}).get("key")})
    if opts.batch_size < ctx.world_size:
        raise UsageError(f"--batch-size {opts.batch_size} is the global batch, shared out between the "
                         f"{ctx.world_size} processes: give at least {ctx.world_size}")
    done = ctx.broadcast(finished(out) if ctx.is_main else None)
    if done is not None:
        logger.info("model %s is already fine-tuned", key)
        return FinetuneResult(out, done, False)
    ctx.check_shared(out.parents[1], what="cache")  # a checkpoint only rank 0 can see would not resume the others
    lock = FileLock(str(out / ".lock"))
    busy = False
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Exception:  # filelock.Timeout: a process outside this job trains the same model
            busy = True
        else:
            for stale in out.glob(".tmp-*"):  # left by a killed write; the job's ranks write nothing before this
                stale.unlink(missing_ok=True)
            write_command(out, command)
    if ctx.broadcast(busy):
        raise UsageError(f"another featx process (not of this torchrun job) is fine-tuning {key} in {out}: let it "
                         f"finish, then run again (the finished model is reused)")
    threads = torch.get_num_threads()
    if dev.type == "cpu":  # torchrun sets OMP_NUM_THREADS=1; the node's cores are shared out between its ranks
        torch.set_num_threads(ctx.cores())
    try:
        metrics = run.train(dev, reducer_for(ctx))
    finally:
        torch.set_num_threads(threads)
        if ctx.is_main:
            lock.release()
    return FinetuneResult(out, metrics, True)
