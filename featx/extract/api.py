"""The public :func:`extract`: resolve the run (data, network, key), then reuse, compute or resume its feature set.

This module imports no torch when it is imported: :func:`extract` lists the images and starts hashing them
(hashlib releases the GIL) before it imports torch and torchvision, so the content hash is done while the
imports run instead of after them.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featx.cache import StagePlan, atomic_write_json, cache_root, read_json, seal_ok, write_command
from featx.datasets import DEFAULT_MAX_PIXELS, ImageDataset, discover, fingerprints
from featx.devices import default_workers, resolve_device_name
from featx.errors import StrictError, UsageError
from featx.extract.scan import BackgroundHash
from featx.extract.target import (
    ExtractResult,
    command_line,
    complete_set,
    content_keys,
    images_per_shard,
    pre_fields,
)
from featx.store import shard_is_valid, shard_name, shard_problem

if TYPE_CHECKING:
    import torch

    from featx.backbones import Backbone, Preprocess
    from featx.extract.reuse import Source

logger = logging.getLogger("featx.extract")


def _views(n: int | str) -> int:
    try:
        return int(n)
    except (TypeError, ValueError):
        raise UsageError(f"--views {n!r}: use 1, 2, 5 or 10") from None


def _one_process() -> bool:
    """Not under torchrun with several ranks (then each rank hashes its share, once the ranks are known)."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1) <= 1
    except ValueError:
        return False  # malformed: distributed.init says so


def extract(data: str | os.PathLike, *, layers: Sequence[str] = (), backbone: str = "alexnet",
            weights: str = "imagenet", split: str | None = None, seed: int = 0, views: int = 1,
            normalize: str = "weights", batch_size: int = 64, workers: int | None = None, device: str = "auto",
            shard_size: int = 2048, cache: str | os.PathLike | None = None, strict: bool = False,
            amp: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS, progress: bool | None = None,
            threads: int | None = None, decode: str = "threads", layout: str | None = None,
            reuse: bool = True, plan: bool = False) -> ExtractResult | StagePlan:
    """Extract ``layers`` of ``backbone`` for every image of ``data`` into a feature set.

    Args:
        data: image folder, a published dataset's folder, or CSV (see :func:`featx.datasets.discover`).
        layers: layer names (default: the backbone's default layer, ``pool5`` for AlexNet).
        backbone, weights, seed: see :func:`featx.backbones.load_backbone`; ``seed`` also seeds the split.
        split: stratified split to make when the data has none (``"test=0.15,val=0.1"``).
        views: 1 (centre crop), 2 (+ mirror), 5 (centre + four corners), 10 (+ their mirrors); one row per view.
        normalize: ``weights`` (the published mean/std) or ``dataset`` (per-channel mean/std of the train split).
        batch_size: images per forward pass. workers: on the CPU, lanes (threads that each decode a batch and run
            the network on it; 0: all in the calling thread); on CUDA, decode processes (see :func:`default_workers`).
        device: ``auto``, ``cpu`` or ``cuda``. amp: autocast (fp16 on CUDA, bf16 on CPU); changes the features.
        shard_size: rows per shard. cache: cache root. strict: raise :class:`StrictError` if any file was skipped
            (after the feature set is complete). threads: torch intra-op threads (on the CPU: per lane; default: the
            cores shared out between the lanes).
        decode: on the CPU, ``threads`` (the lanes above) or ``processes`` (``workers`` decode processes feed one
            forward pass on all cores, as on CUDA; kept for machines where the GIL would hold the lanes back).
            CUDA always decodes in processes.
        layout: force the layout of ``data`` (``oxford-pets``, ``tiny-imagenet``, ..., ``class-folders``, ``csv``;
            see :data:`featx.datasets.NAMES`) instead of detecting it.
        reuse: compute the layers from a shallower layer of the same images already in the cache (same backbone,
            weights, transform, views, normalization) instead of from the images, when there is one: the same
            feature set (same key, same rows), without decoding an image (see :func:`reusable_source`).
        plan: compute nothing: read the data and the weights' identity (no network is built), and return a
            :class:`~featx.cache.StagePlan` saying where the feature set is and whether it is complete; its
            ``info`` holds the layout, classes and split counts.

    Returns:
        :class:`ExtractResult` with the feature set's directory (``plan``: a :class:`~featx.cache.StagePlan`).

    Raises:
        DataError, UsageError, WeightsError, StrictError.

    Example:
        >>> extract("pets/", layers=["pool5", "fc7"], weights="random").path  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if batch_size < 1 or shard_size < 1:
        raise UsageError("--batch-size and --shard-size must be at least 1")
    if decode not in ("threads", "processes"):
        raise UsageError(f"--decode {decode!r}: use threads or processes")
    if normalize not in ("weights", "dataset"):
        raise UsageError(f"--normalize {normalize!r}: use weights or dataset")
    device_name = resolve_device_name(device)
    ds = discover(data, layout=layout, split=split, seed=seed)  # directories only: no image is opened
    hashing = BackgroundHash(ds) if _one_process() else None  # runs while torch is imported, below
    try:
        spec, layer_list, dev, ctx, bb, fps, weights_id, base_pre = _resolve(
            ds, hashing, backbone, layers, weights, device_name, seed=seed, plan=plan)
    except BaseException:
        if hashing is not None:
            hashing.stop()
        raise
    from featx.backbones import Preprocess, taps_config
    from featx.extract.ranks import extract_ranks
    from featx.extract.reuse import reusable_source
    from featx.extract.scan import all_fingerprints

    pre = Preprocess(**{**pre_fields(base_pre), "views": _views(views)})
    config = {
        "data": str(ds.root), "source": ds.source, "layout": ds.layout, "backbone": spec.name,
        "weights": weights_id, "layers": layer_list, "preprocess": pre.to_json(), "normalize": normalize,
        "split": ds.split, "seed": seed, "amp": bool(amp), "max_pixels": max_pixels,
        **({"taps": t} if (t := taps_config(spec, layer_list)) else {}),  # graph nodes: where read, how reduced
    }
    if ctx.active:  # ranks that resolved different runs stop here, together, before anything is written
        ctx.agree({**{k: v for k, v in config.items() if k not in ("data", "source")}, "classes": ds.classes,
                   "files": [(it.path, it.label, it.split) for it in ds.items], "shard_size": shard_size})
        fps = all_fingerprints(ctx, fps)
    key, rows_key = content_keys(config, ds, fps)
    root = cache_root(cache) / "features" / key
    res = complete_set(root, key) if not ctx.active else None
    if plan:
        return StagePlan(root, res is not None, {"key": key, "layout": ds.layout, "classes": list(ds.classes),
                                                 "counts": ds.counts(), "n_images": len(ds.items)})
    command = command_line(data, layer_list, backbone=spec.name, weights=weights, split=split, seed=seed, views=views,
                           normalize=normalize, amp=amp, cache=cache_root(cache))
    assert bb is not None  # built unless planning
    run_kw: dict[str, Any] = dict(batch_size=batch_size,
                                  workers=default_workers(dev.type) if workers is None else int(workers),
                                  shard_size=shard_size, amp=amp, max_pixels=max_pixels, threads=threads,
                                  decode=decode, t0=t0, rows_key=rows_key)
    if ctx.active:
        res = extract_ranks(ctx, ds, bb, pre, config, key, root, layer_list, dev, fps, command=command,
                            progress=progress if ctx.is_main else False, **run_kw)
    elif res is None:
        res = _locked(ds, bb, pre, config, key, root, layer_list, dev, fps, command=command, progress=progress,
                      source_of=(lambda: reusable_source(root.parent, rows_key, spec.name, layer_list, key))
                      if reuse else None, **run_kw)
    _report_skipped(res, strict=strict)
    return res


def _report_skipped(res: ExtractResult, *, strict: bool) -> None:
    """Say on stderr which files were skipped; with ``strict``, fail the run (the feature set stays complete)."""
    skipped, root = res.manifest["skipped"], res.path
    if skipped:
        logger.warning("skipped %d file(s) that could not be used (listed in manifest.json 'skipped'), e.g. %s: %s",
                       len(skipped), skipped[0]["path"], skipped[0]["reason"])
    if strict and skipped:
        raise StrictError(f"--strict: {len(skipped)} file(s) were skipped (see {root / 'manifest.json'}); "
                          f"the feature set of the others is complete at {root}")


def _resolve(ds: ImageDataset, hashing: BackgroundHash | None, backbone: str, layers: Sequence[str], weights: str,
             device_name: str, *, seed: int, plan: bool) -> tuple:
    """Import torch and the backbones, check the layers, start torchrun's process group, build the network
    (None for a plan: the weights' identity is read without building it) and collect the images' fingerprints
    (this rank's share under torchrun; ``hashing``, when given, has been computing them all meanwhile).

    Returns ``(spec, layers, device, ctx, backbone, fingerprints, weights identity, published preprocessing)``."""
    import torch

    from featx import distributed
    from featx.backbones import Preprocess, check_layers, get_spec, load_backbone, weights_identity
    from featx.extract.scan import rank_fingerprints

    spec = get_spec(backbone)
    layer_list = check_layers(spec, list(layers))
    dev = torch.device(device_name)
    ctx = distributed.init(dev) if not plan else distributed.Context()  # under torchrun: this rank's place
    dev = ctx.device(dev)
    if hashing is not None and ctx.active:  # started before the ranks were known: this rank hashes its share
        hashing.stop()
        hashing = None
    if plan:
        return (spec, layer_list, dev, ctx, None, hashing.result() if hashing is not None else fingerprints(ds),
                weights_identity(backbone, weights, seed=seed), Preprocess.from_weights(spec.weights_enum()))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="featx-hash") as pool:
        # hashlib and torch's weight init both release the GIL
        pending = pool.submit(rank_fingerprints, ds, ctx) if hashing is None else None
        bb = load_backbone(backbone, weights, seed=seed)
        fps = pending.result() if pending is not None else hashing.result()  # type: ignore[union-attr]
    return spec, layer_list, dev, ctx, bb, fps, bb.weights_id, bb.preprocess


def _locked(ds: ImageDataset, bb: Backbone, pre: Preprocess, config: dict, key: str, root: Path, layers: list[str],
            dev: torch.device, fps: list, *, command: list[str], source_of, **run_kw) -> ExtractResult:
    """The feature set computed under its lock (or found complete once another process let go of it)."""
    from featx.locks import hold

    with hold(root, what=f"feature set {key}"):
        res = complete_set(root, key, quiet=True)  # it may have finished while we waited
        if res is not None:
            return res
        atomic_write_json(root / "images.json", {"fields": ["path", "size", "sha256"], "images": fps})
        write_command(root, command)
        source = source_of() if source_of is not None else None
        manifest = _run(ds, bb, pre, config, key, root, layers, dev, source=source, **run_kw)
        return ExtractResult(root, True, manifest)


def _run(ds: ImageDataset, bb: Backbone, pre: Preprocess, config: dict, key: str, root: Path, layers: list[str],
         dev: torch.device, *, batch_size: int, workers: int, shard_size: int, amp: bool, max_pixels: int | None,
         progress: bool | None, threads: int | None, decode: str, t0: float, source: Source | None = None,
         rows_key: str = "") -> dict:
    """Compute the shards of ``root`` that are missing or damaged (from a cached layer when ``source`` allows,
    else from the images), then write the manifest."""
    from featx.backbones import dataset_stats_to_preprocess
    from featx.extract.compute import compute_shards, dataset_stats
    from featx.extract.reuse import SourceGone, compute_from
    from featx.extract.shards import finish_set

    for stale in root.glob(".tmp-*"):  # left by a killed run; we hold the lock, so nobody else is writing
        stale.unlink(missing_ok=True)
    if source is not None and config["normalize"] == "dataset" and not (root / "normalization.json").exists():
        stats = read_json(source.root / "normalization.json")  # the same train images: the same statistics
        if isinstance(stats, dict) and seal_ok(stats):  # copied with its seal, which still holds
            atomic_write_json(root / "normalization.json", stats)
    if config["normalize"] == "dataset":
        mean, std = dataset_stats(ds, pre, root, workers=workers, batch_size=batch_size, max_pixels=max_pixels)
        pre = dataset_stats_to_preprocess(pre, mean, std)
        config = {**config, "preprocess": pre.to_json()}
    per = images_per_shard(root, len(ds.items), pre.views, shard_size)
    n_shards = (len(ds.items) + per - 1) // per
    problems = {s: shard_problem(root / shard_name(s), layers) for s in range(n_shards)}
    todo = [s for s, why in problems.items() if why is not None]
    for s in todo:
        if problems[s] != "missing":
            logger.warning("%s is damaged (%s): recomputing it", root / shard_name(s), problems[s])
    logger.info("%s: %d images, %d classes, %d shard(s) (%d to compute), layers %s, %s weights, device %s",
                key, len(ds.items), len(ds.classes), n_shards, len(todo), ",".join(layers), bb.weights_id["kind"], dev)
    timings = {"decode_s": 0.0, "forward_s": 0.0, "wait_s": 0.0, "write_s": 0.0}
    extra: dict = {"rows_key": rows_key, "dataset": ds.describe()}
    if todo and source is not None:
        try:
            compute_from(source, ds, bb, root, layers, dev, todo, per, V=pre.views, amp=amp, progress=progress,
                         threads=threads, timings=timings)
            extra["computed_from"] = {"key": source.key, "layer": source.layer}
        except SourceGone as e:
            logger.warning("cannot compute from the cached %s of %s (%s): computing from the images", source.layer,
                           source.key, e)
        todo = [s for s in todo if not shard_is_valid(root / shard_name(s), layers)]
    if todo:
        compute_shards(ds, bb, pre, root, layers, dev, todo, per, batch_size=batch_size, workers=workers, amp=amp,
                       max_pixels=max_pixels, progress=progress, threads=threads, decode=decode, timings=timings)
    return finish_set(ds, config, key, root, layers, n_shards, timings, t0, extra)

