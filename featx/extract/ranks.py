"""torchrun: the ranks' split of the missing shards, and rank 0's merge into one feature set."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from featx import distributed, interrupt
from featx.backbones import Backbone, Preprocess, dataset_stats_to_preprocess
from featx.cache import atomic_write_json, read_json, seal_ok, write_command
from featx.datasets import ImageDataset
from featx.datasets.loading import decode_loader
from featx.errors import DataError, IntegrityError, UsageError
from featx.extract.compute import compute_shards
from featx.extract.shards import finish_set
from featx.extract.target import ExtractResult, complete_set, images_per_shard, pre_fields
from featx.store import read_manifest, shard_name, shard_problem

logger = logging.getLogger("featx.extract")


def extract_ranks(ctx: distributed.Context, ds: ImageDataset, bb: Backbone, pre: Preprocess, config: dict, key: str,
                   root: Path, layers: list[str], dev: torch.device, fps: list, *, batch_size: int, workers: int,
                   shard_size: int, amp: bool, max_pixels: int | None, progress: bool | None, threads: int | None,
                   decode: str, t0: float, rows_key: str, command: list[str]) -> ExtractResult:
    """The feature set of :func:`extract`, computed by every torchrun rank: the same key, shards and rows.

    Rank 0 holds the set's lock, looks at what is on disk and broadcasts the plan (images per shard, the
    missing shards, the dataset's normalization if already measured).  Rank r then computes the missing shards
    ``todo[r::world_size]``, each written atomically exactly as a single process writes it, so an elastic
    restart or a rerun finds the finished ones and computes only the rest.  After the plan there is no
    collective: rank 0 waits on the filesystem for every shard, then writes the manifest once; the other ranks
    wait for the manifest.  Uneven work therefore never meets a collective's timeout, and a rank that dies
    is torchrun's to handle (it stops the others; ``--max-restarts`` starts them again).  Layers are computed
    from the images (a single process may compute them from a shallower cached layer instead: the same rows).
    """

    def manifest() -> dict | None:
        try:
            m = read_manifest(root)
        except IntegrityError:  # not yet, or torn on its way over a network filesystem: look again
            return None
        return m if isinstance(m, dict) and m.get("key") == key else None

    def finished(computed: bool) -> ExtractResult:  # rank 0 wrote it, or is about to
        distributed.wait_for_files([root / "manifest.json"], what="manifest", ready=lambda p: manifest() is not None)
        return ExtractResult(root, computed, manifest() or {})

    if ctx.broadcast(complete_set(root, key) is not None if ctx.is_main else None):
        return finished(False)
    ctx.check_shared(root.parents[1], what="cache")  # else rank 0 would wait forever for shards written elsewhere
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / ".lock")) if ctx.is_main else None
    plan: dict | None = None
    if lock is not None:
        try:
            lock.acquire(timeout=0)
        except Exception:  # filelock.Timeout: a process outside this job is extracting the same set
            plan = {"busy": True}
        if plan is None:
            if complete_set(root, key) is not None:
                plan = {"done": True}
            else:
                for stale in root.glob(".tmp-*"):  # left by a killed rank; the job's ranks have not started
                    stale.unlink(missing_ok=True)
                atomic_write_json(root / "images.json", {"fields": ["path", "size", "sha256"], "images": fps})
                write_command(root, command)
                per = images_per_shard(root, len(ds.items), pre.views, shard_size)
                n_shards = (len(ds.items) + per - 1) // per
                problems = {s: shard_problem(root / shard_name(s), layers) for s in range(n_shards)}
                for s, why in problems.items():
                    if why not in (None, "missing"):
                        logger.warning("%s is damaged (%s): recomputing it", root / shard_name(s), why)
                stats = read_json(root / "normalization.json") if config["normalize"] == "dataset" else None
                plan = {"per": per, "n_shards": n_shards, "todo": [s for s, why in problems.items() if why is not None],
                        "stats": stats if isinstance(stats, dict) and seal_ok(stats) is not False else None}
    plan = ctx.broadcast(plan)
    if plan.get("busy"):
        raise UsageError(f"another featx process (not of this torchrun job) is extracting {key} into {root}: "
                         f"let it finish, then run again (the finished set is reused)")
    try:
        if plan.get("done"):
            return finished(False)
        if config["normalize"] == "dataset":
            mean, std = dataset_stats_ranks(ctx, ds, pre, root, plan["stats"], workers=workers,
                                             batch_size=batch_size, max_pixels=max_pixels)
            pre = dataset_stats_to_preprocess(pre, mean, std)
            config = {**config, "preprocess": pre.to_json()}
        per, n_shards, todo = plan["per"], plan["n_shards"], plan["todo"]
        mine = todo[ctx.rank::ctx.world_size]
        logger.info("%s: %s: %d images, %d shard(s), %d to compute by %d ranks, %d by this one (%s), device %s",
                    key, ctx, len(ds.items), n_shards, len(todo), ctx.world_size, len(mine),
                    ",".join(map(str, mine[:8])) + (",..." if len(mine) > 8 else ""), dev)
        timings = {"decode_s": 0.0, "forward_s": 0.0, "wait_s": 0.0, "write_s": 0.0}
        if mine:
            compute_shards(ds, bb, pre, root, layers, dev, mine, per, batch_size=batch_size, workers=workers, amp=amp,
                     max_pixels=max_pixels, progress=progress, threads=threads, decode=decode, timings=timings)
        if not ctx.is_main:
            return finished(bool(mine))
        distributed.wait_for_files([root / shard_name(s) for s in todo], what="shards")
        extra = {"rows_key": rows_key, "dataset": ds.describe()}
        return ExtractResult(root, True, finish_set(ds, config, key, root, layers, n_shards, timings, t0, extra))
    finally:
        if lock is not None:
            lock.release()


def dataset_stats_ranks(ctx: distributed.Context, ds: ImageDataset, pre: Preprocess, root: Path, saved: dict | None,
                         *, workers: int, batch_size: int, max_pixels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`dataset_stats` shared out between the ranks: each measures every ``world_size``-th batch, the
    per-batch sums are gathered and added in batch order, so the result is bit for bit a single process's."""
    if isinstance(saved, dict):
        return np.asarray(saved["mean"]), np.asarray(saved["std"])
    train = [ds.abspath(it) for it in ds.items if it.split == "train"]
    base = Preprocess(**{**pre_fields(pre), "views": 1})
    batches = [list(range(a, min(a + batch_size, len(train)))) for a in range(0, len(train), batch_size)]
    mine = list(range(ctx.rank, len(batches), ctx.world_size))
    sums: dict[int, tuple | None] = {}
    loader = decode_loader(train, [batches[b] for b in mine], base, workers=workers, pin=False, max_pixels=max_pixels)
    for b, (_, px, _) in zip(mine, loader):
        interrupt.check("extract.stats")
        if px is None:
            continue
        x = px.to(torch.float64) / 255.0
        sums[b] = (x.sum(dim=(0, 2, 3)).numpy(), (x * x).sum(dim=(0, 2, 3)).numpy(),
                   x.shape[0] * x.shape[2] * x.shape[3])
    merged: dict[int, tuple] = {}
    for part in ctx.all_gather(sums):  # after every rank's share: they arrive together, give or take a batch
        merged.update(part)
    s, ss, n = np.zeros(3), np.zeros(3), 0
    for b in sorted(merged):
        s += merged[b][0]
        ss += merged[b][1]
        n += merged[b][2]
    if n == 0:
        raise DataError("--normalize dataset: no usable training image to measure")
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 1e-12))
    if ctx.is_main:
        atomic_write_json(root / "normalization.json", {"mean": mean.tolist(), "std": std.tolist(), "pixels": n},
                          seal=True)
        logger.info("dataset normalization: mean %s std %s", np.round(mean, 4).tolist(), np.round(std, 4).tolist())
    return mean, std
