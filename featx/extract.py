"""``featx extract``: from a folder of images to a feature set in the cache.

On the CPU, work runs in *lanes*: each lane is a thread that decodes one batch of images (Pillow releases the GIL
while it decodes and resizes), normalizes it and runs one forward pass over it for all requested layers
(channels_last, ``inference_mode``) with its own few intra-op threads, one lane per core by default.  Lanes
never wait for each other, so a core that is decoding does not stall the forward pass on the other cores, which
is what happens when decode processes preempt one of the threads of a single multi-threaded forward pass
(measured: benchmarks/bench_extract.py, docs/benchmarks.md).  On CUDA, decode worker processes (a DataLoader
with pinned memory) feed the device.  In both cases a writer thread puts each batch's rows into its shard's
temporary HDF5 file, so the forward pass never waits for the disk and memory holds batches, not shards.
Work is cut into shards of consecutive images; a shard's temporary file is renamed into place only when
complete, which is what makes a killed run resumable row for row.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from filelock import FileLock
from tqdm.auto import tqdm

import featx
from featx import distributed, interrupt
from featx.backbones import (
    VIEW_SETS,
    Backbone,
    Preprocess,
    check_layers,
    dataset_stats_to_preprocess,
    get_spec,
    load_backbone,
    start_layer,
    tapped,
    taps_config,
    weights_identity,
)
from featx.cache import StagePlan, atomic_write_json, cache_root, hash_key, read_json, seal_ok, write_command
from featx.datasets import DEFAULT_MAX_PIXELS, ImageDataset, discover, fingerprints, fingerprints_of
from featx.datasets.loading import CollateReady, DecodeSet, collate, decode, decode_loader
from featx.devices import cores as _cores
from featx.devices import default_workers, resolve_device
from featx.errors import DataError, IntegrityError, StrictError, UsageError
from featx.locks import hold
from featx.store import FORMAT_VERSION, ShardWriter, read_manifest, shard_is_valid, shard_name, shard_problem

logger = logging.getLogger(__name__)


# the decoding shared with finetune and predict lives in featx.datasets.loading; the old private names stay bound
# here because extract's lanes call them
_decode, _DecodeSet, _collate, _CollateReady, _loader = decode, DecodeSet, collate, CollateReady, decode_loader


def _lanes(files: Sequence[Path], batches: list[list[int]], pre: Preprocess, model: torch.nn.Module,
           layers: list[str], *, lanes: int, max_pixels: int | None, autocast, timings: dict):
    """Yield ``(indices, {layer: rows}, bad)`` per batch, in order: each batch decoded, normalized and passed
    through ``model`` by one of ``lanes`` threads (0 or 1: in the calling thread).  At most two batches per lane
    are in flight, which bounds memory."""
    ready = _CollateReady(pre)

    def work(batch: list[int]):
        t = time.perf_counter()
        idx, pixels, bad = ready([(i, *_decode(files[i], pre, max_pixels)) for i in batch])
        t_dec = time.perf_counter()
        feats = None
        if pixels is not None:
            with torch.inference_mode(), autocast:
                out = model(pixels)
            feats = {l: out[l].float().numpy() for l in layers}
        return idx, feats, bad, t_dec - t, time.perf_counter() - t_dec

    def account(r):
        timings["decode_s"] += r[3]
        timings["forward_s"] += r[4]
        return r[:3]

    if lanes <= 1:
        for b in batches:
            yield account(work(b))
        return
    pool = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="featx-lane")
    window: deque[Future] = deque()
    todo = iter(batches)
    try:
        for b in todo:
            window.append(pool.submit(work, b))
            if len(window) >= 2 * lanes:
                break
        while window:
            t = time.perf_counter()
            r = window.popleft().result()
            timings["wait_s"] += time.perf_counter() - t
            nxt = next(todo, None)
            if nxt is not None:
                window.append(pool.submit(work, nxt))
            yield account(r)
    finally:
        for f in window:
            f.cancel()
        pool.shutdown(wait=True)


def _decode_processes(files: Sequence[Path], batches: list[list[int]], pre: Preprocess, model: torch.nn.Module,
                      layers: list[str], dev: torch.device, *, workers: int, max_pixels: int | None, autocast,
                      timings: dict):
    """``workers`` decode processes feed one forward pass.  CUDA: uint8 batches in pinned memory, copied without
    blocking and normalized on the device (4x fewer bytes over the bus than float32).  CPU (``--decode
    processes``): the workers also normalize, so the main process only runs the network."""
    ready = dev.type == "cpu" and workers > 0
    loader = _loader(files, batches, pre, workers=workers, pin=dev.type == "cuda", max_pixels=max_pixels, ready=ready)
    t = time.perf_counter()
    for idx, pixels, bad in loader:
        t_got = time.perf_counter()
        timings["wait_s"] += t_got - t
        feats = None
        if pixels is not None:
            x = pixels if ready else \
                pre.normalize(pixels.to(dev, non_blocking=True)).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast:
                out = model(x)
            feats = {l: out[l].float().cpu().numpy() for l in layers}
        timings["forward_s"] += time.perf_counter() - t_got
        yield idx, feats, bad
        t = time.perf_counter()


# --------------------------------------------------------------------------------------------- resolution

@dataclass
class ExtractResult:
    """What :func:`extract` produced: the feature set's directory and whether it was computed now."""

    path: Path
    computed: bool
    manifest: dict = field(default_factory=dict)


def _views(n: int | str) -> int:
    try:
        return int(n)
    except (TypeError, ValueError):
        raise UsageError(f"--views {n!r}: use 1, 2, 5 or 10") from None


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
            forward pass on all cores, as on CUDA; measured 3% slower on 2 cores, kept for machines where the
            GIL would hold the lanes back).  CUDA always decodes in processes.
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
    spec = get_spec(backbone)
    layer_list = check_layers(spec, list(layers))
    dev = resolve_device(device)
    ctx = distributed.init(dev) if not plan else distributed.Context()  # under torchrun: this rank's place
    dev = ctx.device(dev)
    ds = discover(data, layout=layout, split=split, seed=seed)
    if plan:  # the same key as below, without building the network
        bb = None
        fps = fingerprints(ds)
        weights_id, base_pre = weights_identity(backbone, weights, seed=seed), Preprocess.from_weights(spec.weights_enum())
    else:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="featx-hash") as pool:
            hashing = pool.submit(_fingerprints, ds, ctx)  # hashlib and torch's weight init both release the GIL
            bb = load_backbone(backbone, weights, seed=seed)
            fps = hashing.result()
        weights_id, base_pre = bb.weights_id, bb.preprocess
    pre = Preprocess(**{**_pre_fields(base_pre), "views": _views(views)})
    config = {
        "data": str(ds.root), "source": ds.source, "layout": ds.layout, "backbone": spec.name,
        "weights": weights_id, "layers": layer_list, "preprocess": pre.to_json(), "normalize": normalize,
        "split": ds.split, "seed": seed, "amp": bool(amp), "max_pixels": max_pixels,
        **({"taps": t} if (t := taps_config(spec, layer_list)) else {}),  # graph nodes: where read, how reduced
    }
    if ctx.active:  # ranks that resolved different runs stop here, together, before anything is written
        ctx.agree({**{k: v for k, v in config.items() if k not in ("data", "source")}, "classes": ds.classes,
                   "files": [(it.path, it.label, it.split) for it in ds.items], "shard_size": shard_size})
        fps = _all_fingerprints(ctx, fps)
    key = hash_key({"format": FORMAT_VERSION, "config": {k: v for k, v in config.items() if k not in ("data", "source")},
                    "classes": ds.classes,
                    "items": [(it.path, it.label, it.split) for it in ds.items], "fingerprints": fps})
    # the same hash without the layers: feature sets that share it hold the same rows of the same network, so a
    # deeper layer of one can be computed from a shallower layer of another
    rows_key = hash_key({"format": FORMAT_VERSION, "config": {k: v for k, v in config.items()
                                                              if k not in ("data", "source", "layers")},
                         "classes": ds.classes,
                         "items": [(it.path, it.label, it.split) for it in ds.items], "fingerprints": fps})
    root = cache_root(cache) / "features" / key
    res = _complete(root, key) if not ctx.active else None
    if plan:
        return StagePlan(root, res is not None, {"key": key, "layout": ds.layout, "classes": list(ds.classes),
                                                 "counts": ds.counts(), "n_images": len(ds.items)})
    if ctx.active:
        res = _extract_ranks(ctx, ds, bb, pre, config, key, root, layer_list, dev, fps, batch_size=batch_size,
                             workers=default_workers(dev.type) if workers is None else int(workers),
                             shard_size=shard_size, amp=amp, max_pixels=max_pixels,
                             progress=progress if ctx.is_main else False, threads=threads, decode=decode, t0=t0,
                             rows_key=rows_key,
                             command=_command(data, layer_list, backbone=spec.name, weights=weights, split=split,
                                              seed=seed, views=views, normalize=normalize, amp=amp,
                                              cache=cache_root(cache)))
    elif res is None:
        with hold(root, what=f"feature set {key}"):
            res = _complete(root, key, quiet=True)  # it may have finished while we waited
            if res is None:
                atomic_write_json(root / "images.json", {"fields": ["path", "size", "sha256"], "images": fps})
                write_command(root, _command(data, layer_list, backbone=spec.name, weights=weights, split=split,
                                             seed=seed, views=views, normalize=normalize, amp=amp,
                                             cache=cache_root(cache)))
                source = reusable_source(root.parent, rows_key, spec.name, layer_list, key) if reuse else None
                manifest = _run(ds, bb, pre, config, key, root, layer_list, dev, batch_size=batch_size,
                                source=source, rows_key=rows_key,
                                workers=default_workers(dev.type) if workers is None else int(workers),
                                shard_size=shard_size, amp=amp, max_pixels=max_pixels, progress=progress,
                                threads=threads, decode=decode, t0=t0)
                res = ExtractResult(root, True, manifest)
    skipped = res.manifest["skipped"]
    if skipped:
        logger.warning("skipped %d file(s) that could not be used (listed in manifest.json 'skipped'), e.g. %s: %s",
                       len(skipped), skipped[0]["path"], skipped[0]["reason"])
    if strict and skipped:
        raise StrictError(f"--strict: {len(skipped)} file(s) were skipped (see {root / 'manifest.json'}); "
                          f"the feature set of the others is complete at {root}")
    return res


def _fingerprints(ds: ImageDataset, ctx: distributed.Context) -> list:
    """Every item's fingerprint; under torchrun only this rank's share (every ``world_size``-th item, from
    ``rank``), so that N ranks read the data once between them instead of N times."""
    if not ctx.active:
        return fingerprints(ds)
    return fingerprints_of(ds.root, [it.path for it in ds.items[ctx.rank::ctx.world_size]])


def _all_fingerprints(ctx: distributed.Context, mine: list) -> list:
    """The shares of :func:`_fingerprints` put back in item order on every rank."""
    shares = ctx.all_gather([list(f) for f in mine])
    out: list = [None] * sum(len(s) for s in shares)
    for r, share in enumerate(shares):
        out[r::ctx.world_size] = share
    return out


def _complete(root: Path, key: str, *, quiet: bool = False) -> ExtractResult | None:
    """The finished feature set at ``root``, or None: a missing or damaged manifest, or a damaged or missing shard
    (every shard is read back past its checksums; what is damaged is recomputed by :func:`_run`)."""
    try:
        done = read_manifest(root)
    except IntegrityError as e:
        if not quiet:
            logger.warning("the manifest of feature set %s is damaged (%s): rewriting it", key,
                           str(e).split(": run ")[0])
        return None
    if not (isinstance(done, dict) and done.get("key") == key):
        return None
    layers = list(done["config"]["layers"])
    bad = [(s["file"], why) for s in done.get("shards", [])
           if (why := shard_problem(root / s["file"], layers, int(s["rows"]))) is not None]
    if bad:
        if not quiet:
            logger.warning("feature set %s: %d shard(s) damaged or missing (%s): recomputing only those", key,
                           len(bad), ", ".join(f"{f}: {why}" for f, why in bad[:5]))
        return None
    logger.info("feature set %s is already complete (%d shard(s) verified)", key, len(done.get("shards", [])))
    return ExtractResult(root, False, done)


def _command(data, layers: list[str], *, backbone: str, weights: str, split: str | None, seed: int, views,
             normalize: str, amp: bool, cache: Path) -> list[str]:
    """The ``featx extract`` command line that makes this feature set (and so repairs it)."""
    w = weights if weights in ("imagenet", "random") else str(Path(weights).expanduser().absolute())
    argv = ["featx", "extract", str(Path(data).expanduser().absolute())]
    for layer in layers:
        argv += ["--layer", layer]
    argv += ["--backbone", backbone, "--weights", w, "--seed", str(seed)]
    if split:
        argv += ["--split", str(split)]
    if int(views) != 1:
        argv += ["--views", str(views)]
    if normalize != "weights":
        argv += ["--normalize", normalize]
    if amp:
        argv.append("--amp")
    return argv + ["--cache", str(cache)]


def _pre_fields(pre: Preprocess) -> dict:
    return {"resize": pre.resize, "crop": pre.crop, "interpolation": pre.interpolation, "antialias": pre.antialias,
            "mean": pre.mean, "std": pre.std}


def _plan(root: Path, n_items: int, views: int, shard_size: int) -> int:
    """Images per shard, fixed by the first run so that a resumed run cuts shards at the same places."""
    plan = read_json(root / "plan.json")
    if isinstance(plan, dict) and seal_ok(plan) is not False and plan.get("n_items") == n_items \
            and plan.get("views") == views:
        return int(plan["images_per_shard"])
    per = max(1, shard_size // views)
    atomic_write_json(root / "plan.json", {"n_items": n_items, "views": views, "images_per_shard": per}, seal=True)
    return per


def _dataset_stats(ds: ImageDataset, pre: Preprocess, root: Path, *, workers: int, batch_size: int,
                   max_pixels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std of the train split's network-input pixels (centre crop, in [0, 1])."""
    saved = read_json(root / "normalization.json")
    if isinstance(saved, dict) and seal_ok(saved) is not False:  # damaged or edited: measured again
        return np.asarray(saved["mean"]), np.asarray(saved["std"])
    train = [ds.abspath(it) for it in ds.items if it.split == "train"]
    base = Preprocess(**{**_pre_fields(pre), "views": 1})
    batches = [list(range(a, min(a + batch_size, len(train)))) for a in range(0, len(train), batch_size)]
    s = np.zeros(3)
    ss = np.zeros(3)
    n = 0
    for _, px, _ in _loader(train, batches, base, workers=workers, pin=False, max_pixels=max_pixels):
        interrupt.check("extract.stats")
        if px is None:
            continue
        x = px.to(torch.float64) / 255.0
        s += x.sum(dim=(0, 2, 3)).numpy()
        ss += (x * x).sum(dim=(0, 2, 3)).numpy()
        n += x.shape[0] * x.shape[2] * x.shape[3]
    if n == 0:
        raise DataError("--normalize dataset: no usable training image to measure")
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 1e-12))
    atomic_write_json(root / "normalization.json", {"mean": mean.tolist(), "std": std.tolist(), "pixels": n},
                      seal=True)
    logger.info("dataset normalization: mean %s std %s", np.round(mean, 4).tolist(), np.round(std, 4).tolist())
    return mean, std


def _run(ds: ImageDataset, bb: Backbone, pre: Preprocess, config: dict, key: str, root: Path, layers: list[str],
         dev: torch.device, *, batch_size: int, workers: int, shard_size: int, amp: bool, max_pixels: int | None,
         progress: bool | None, threads: int | None, decode: str, t0: float, source: _Source | None = None,
         rows_key: str = "") -> dict:
    for stale in root.glob(".tmp-*"):  # left by a killed run; we hold the lock, so nobody else is writing
        stale.unlink(missing_ok=True)
    if source is not None and config["normalize"] == "dataset" and not (root / "normalization.json").exists():
        stats = read_json(source.root / "normalization.json")  # the same train images: the same statistics
        if isinstance(stats, dict) and seal_ok(stats):  # copied with its seal, which still holds
            atomic_write_json(root / "normalization.json", stats)
    if config["normalize"] == "dataset":
        mean, std = _dataset_stats(ds, pre, root, workers=workers, batch_size=batch_size, max_pixels=max_pixels)
        pre = dataset_stats_to_preprocess(pre, mean, std)
        config = {**config, "preprocess": pre.to_json()}
    per = _plan(root, len(ds.items), pre.views, shard_size)
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
            _compute_from(source, ds, bb, root, layers, dev, todo, per, V=pre.views, amp=amp, progress=progress,
                          threads=threads, timings=timings)
            extra["computed_from"] = {"key": source.key, "layer": source.layer}
        except _SourceGone as e:
            logger.warning("cannot compute from the cached %s of %s (%s): computing from the images", source.layer,
                           source.key, e)
        todo = [s for s in todo if not shard_is_valid(root / shard_name(s), layers)]
    if todo:
        _compute(ds, bb, pre, root, layers, dev, todo, per, batch_size=batch_size, workers=workers, amp=amp,
                 max_pixels=max_pixels, progress=progress, threads=threads, decode=decode, timings=timings)
    return _finish(ds, config, key, root, layers, n_shards, timings, t0, extra)


def _compute(ds: ImageDataset, bb: Backbone, pre: Preprocess, root: Path, layers: list[str], dev: torch.device,
             todo: list[int], per: int, *, batch_size: int, workers: int, amp: bool, max_pixels: int | None,
             progress: bool | None, threads: int | None, decode: str, timings: dict) -> None:
    model = tapped(bb, layers).to(dev)
    model = model.to(memory_format=torch.channels_last)
    V = pre.views
    # Batches never cross a shard boundary, so a shard is complete exactly when its last batch is done.
    files: list[Path] = []
    owner: list[tuple[int, int]] = []  # per loader index: (shard, position of the image in the shard)
    batches: list[list[int]] = []
    img_batch = max(1, batch_size // V)
    for s in todo:
        lo, hi = s * per, min(len(ds.items), (s + 1) * per)
        first = len(files)
        for j in range(lo, hi):
            files.append(ds.abspath(ds.items[j]))
            owner.append((s, j - lo))
        for a in range(first, len(files), img_batch):
            batches.append(list(range(a, min(a + img_batch, len(files)))))
    autocast = torch.autocast(dev.type, dtype=torch.float16 if dev.type == "cuda" else torch.bfloat16, enabled=amp)
    threads_before = torch.get_num_threads()
    if dev.type == "cpu" and decode == "threads":
        lanes = max(0, min(workers, len(batches)))
        torch.set_num_threads(int(threads) if threads else max(1, _cores() // max(1, lanes)))
        source = _lanes(files, batches, pre, model, layers, lanes=lanes, max_pixels=max_pixels, autocast=autocast,
                        timings=timings)
    else:
        if threads:
            torch.set_num_threads(int(threads))
        source = _decode_processes(files, batches, pre, model, layers, dev, workers=workers, max_pixels=max_pixels,
                                   autocast=autocast, timings=timings)
    show = (sys.stderr.isatty() if progress is None else progress)
    bar = tqdm(total=len(files), unit="img", disable=not show, file=sys.stderr, desc="extract", dynamic_ncols=True)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featx-writer")  # FIFO: the file's only user
    pending: deque[Future] = deque()
    cur: _Shard | None = None
    view_names = list(pre.view_names)

    def submit(fn, *args):
        while pending and pending[0].done():
            pending.popleft().result()  # a failed write stops the run here
        while len(pending) >= 16:  # bound memory: a few batches' rows waiting for the disk
            pending.popleft().result()
        pending.append(writer.submit(_timed, timings, fn, *args))

    try:
        for idx, feats, bad in source:
            # a stop request abandons the shard in progress (its temporary file, below); finished shards stay
            interrupt.check("extract.batch")
            shard = owner[(idx or [i for i, _ in bad])[0]][0]
            if cur is None or cur.shard != shard:
                cur = _Shard(shard, ds, per, V)
                submit(cur.open, root, {l: bb.spec.dims[l] for l in layers})
            for i, why in bad:
                cur.skip(owner[i][1], why)
            if feats is not None:
                cur.seen += len(idx)
                submit(cur.write, [owner[i][1] for i in idx], feats)
            bar.update(len(idx) + len(bad))
            if cur.complete():
                submit(cur.finish, ds, view_names)
                cur = None
        while pending:
            pending.popleft().result()
    finally:
        source.close()
        bar.close()
        if cur is not None:  # stopped mid-shard: drop its temporary file (a rerun redoes the shard)
            writer.submit(cur.abort)
        writer.shutdown(wait=True)
        torch.set_num_threads(threads_before)
    logger.info("time: decode %.1fs, forward %.1fs (summed over lanes), waiting for them %.1fs, writing %.1fs "
                "(in the background)", timings["decode_s"], timings["forward_s"], timings["wait_s"], timings["write_s"])


# ------------------------------------------------------------------------- deeper layers from cached rows

@dataclass(frozen=True)
class _Source:
    """A complete feature set holding the same rows of the same network, and the layer to start from."""

    root: Path
    key: str
    layer: str
    manifest: dict = field(repr=False, compare=False)


class _SourceGone(Exception):
    """The source feature set cannot be read (removed or damaged meanwhile): compute from the images instead."""


def reusable_source(features: Path, rows_key: str, backbone: str, layers: Sequence[str],
                    key: str) -> _Source | None:
    """A finished feature set under ``features`` whose rows are those ``key`` would hold (same images, labels,
    splits, backbone, weights, transform, views, normalization and precision: the same ``rows_key``) and which
    holds a layer at or before the shallowest of ``layers``, so that those can be computed from its rows by the
    remaining stages; the deepest such layer wins (fewest stages to run).  None when there is none."""
    spec = get_spec(backbone)
    order = list(spec.layers)
    best: _Source | None = None
    for path in sorted(features.glob("*/manifest.json")):
        m = read_json(path)
        if not isinstance(m, dict) or m.get("rows_key") != rows_key or m.get("key") in (None, key) \
                or seal_ok(m) is False:  # an edited or damaged manifest is not trusted as a source
            continue
        start = start_layer(spec, m.get("config", {}).get("layers", []), layers)
        if start is not None and (best is None or order.index(start) > order.index(best.layer)):
            best = _Source(path.parent, m["key"], start, m)
    if best is not None:
        logger.info("computing %s from the cached %s of feature set %s (no image is decoded)", ",".join(layers),
                    best.layer, best.key)
    return best


def _source_rows(src: _Source, V: int) -> tuple[dict[str, tuple[Path, int]], dict[str, str]]:
    """Where each image's rows are in the source (``path -> (shard file, first row)``), and why the images it
    skipped were skipped."""
    where: dict[str, tuple[Path, int]] = {}
    try:
        for sh in src.manifest["shards"]:
            f = src.root / sh["file"]
            with h5py.File(f, "r") as h:
                if src.layer not in h:
                    raise _SourceGone(f"{f.name} has no {src.layer}")
                paths = h["path"][()]
                for r in range(0, len(paths), V):
                    where[paths[r].decode() if isinstance(paths[r], bytes) else str(paths[r])] = (f, r)
        reason = {sk["path"]: sk["reason"] for sk in src.manifest.get("skipped", [])}
    except (OSError, KeyError, TypeError) as e:
        raise _SourceGone(f"{type(e).__name__}: {e}") from None
    return where, reason


REUSE_ROWS = 1024  # rows per matrix product when computing from cached rows: the weights are read once per chunk


def _compute_from(src: _Source, ds: ImageDataset, bb: Backbone, root: Path, layers: list[str], dev: torch.device,
                  todo: list[int], per: int, *, V: int, amp: bool, progress: bool | None, threads: int | None,
                  timings: dict) -> None:
    """Write shards ``todo`` from the source's rows of ``src.layer`` through the stages after it.

    The stages after a convolutional trunk are matrix products whose cost is reading their weights (AlexNet's
    fc6 and fc7: 218 MB), so the rows go through them :data:`REUSE_ROWS` at a time on all cores rather than a
    direct pass's ``--batch-size``.  The values equal a direct extraction's up to float rounding (products over
    other numbers of rows may sum in another order; tests/test_extract.py bounds the difference at 1e-6
    relative), the same latitude two direct extractions with different ``--batch-size`` or ``--workers`` have."""
    model = tapped(bb, layers, start=src.layer).to(dev)
    where, reason = _source_rows(src, V)
    autocast = torch.autocast(dev.type, dtype=torch.float16 if dev.type == "cuda" else torch.bfloat16, enabled=amp)
    img_chunk = max(1, REUSE_ROWS // V)
    threads_before = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(int(threads) if threads else _cores())
    handles: dict[Path, h5py.File] = {}
    show = (sys.stderr.isatty() if progress is None else progress)
    bar = tqdm(total=sum(min(len(ds.items), (s + 1) * per) - s * per for s in todo), unit="img", disable=not show,
               file=sys.stderr, desc="extract (from cache)", dynamic_ncols=True)
    try:
        for s in todo:
            lo, hi = s * per, min(len(ds.items), (s + 1) * per)
            shard = _Shard(s, ds, per, V)
            try:
                shard.open(root, {l: bb.spec.dims[l] for l in layers})
                for a in range(lo, hi, img_chunk):
                    # a stop request abandons the shard in progress (aborted below); finished shards stay
                    interrupt.check("extract.batch")
                    t = time.perf_counter()
                    good, parts = [], []
                    for j in range(a, min(a + img_chunk, hi)):
                        p = ds.items[j].path
                        if p not in where:
                            shard.skip(j - lo, reason.get(p, "not in the source feature set"))
                            continue
                        f, r = where[p]
                        if f not in handles:
                            handles[f] = h5py.File(f, "r")
                        parts.append(handles[f][src.layer][r:r + V])
                        good.append(j - lo)
                    t_read = time.perf_counter()
                    timings["read_s"] = timings.get("read_s", 0.0) + t_read - t
                    if good:
                        with torch.inference_mode(), autocast:
                            out = model(torch.from_numpy(np.concatenate(parts)).to(dev))
                        shard.write(good, {l: out[l].float().cpu().numpy() for l in layers})
                        shard.seen += len(good)
                    timings["forward_s"] += time.perf_counter() - t_read
                    bar.update(min(a + img_chunk, hi) - a)
                shard.finish(ds, list(VIEW_SETS[V]))
            except BaseException:
                shard.abort()
                raise
    except (OSError, KeyError) as e:
        raise _SourceGone(f"{type(e).__name__}: {e}") from None
    finally:
        for h in handles.values():
            h.close()
        bar.close()
        torch.set_num_threads(threads_before)
    logger.info("time: reading the cached %s rows %.1fs, the stages after it %.1fs", src.layer,
                timings.get("read_s", 0.0), timings["forward_s"])


def _timed(timings: dict, fn, *args) -> None:
    t = time.perf_counter()
    fn(*args)
    timings["write_s"] += time.perf_counter() - t


class _Shard:
    """One shard as its rows arrive (in image order, a batch at a time), written by the writer thread straight
    into the shard's temporary file (:class:`~featx.store.ShardWriter`); bad images leave no row.
    ``skip``/``complete`` run on the main thread, ``open``/``write``/``finish``/``abort`` on the writer's."""

    def __init__(self, shard: int, ds: ImageDataset, per: int, views: int):
        self.shard = shard
        self.lo = shard * per
        self.n_images = min(len(ds.items), self.lo + per) - self.lo
        self.views = views
        self.ok = np.zeros(self.n_images, dtype=bool)
        self.seen = 0
        self.skipped: list[dict] = []
        self.ds = ds
        self.out: ShardWriter | None = None

    # main thread
    def skip(self, pos: int, why: str) -> None:
        self.skipped.append({"path": self.ds.items[self.lo + pos].path, "reason": why})
        self.seen += 1

    def complete(self) -> bool:
        return self.seen == self.n_images

    # writer thread
    def open(self, root: Path, dims: dict[str, int]) -> None:
        self.out = ShardWriter(root / shard_name(self.shard), self.n_images * self.views, dims)

    def write(self, positions: list[int], feats: dict[str, np.ndarray]) -> None:
        V = self.views
        k = 0
        while k < len(positions):  # one slice per run of consecutive images
            j = k
            while j + 1 < len(positions) and positions[j + 1] == positions[j] + 1:
                j += 1
            self.out.write_rows(positions[k] * V, {l: a[k * V:(j + 1) * V] for l, a in feats.items()})
            self.ok[positions[k]:positions[j] + 1] = True
            k = j + 1

    def finish(self, ds: ImageDataset, view_names: list[str]) -> None:
        V = self.views
        items = [ds.items[self.lo + p] for p in np.nonzero(self.ok)[0]]
        self.out.finish(np.repeat(self.ok, V),
                        label=np.repeat([it.label for it in items], V).astype(np.int64),
                        paths=[it.path for it in items for _ in range(V)],
                        split=[it.split for it in items for _ in range(V)],
                        view=view_names * len(items), classes=ds.classes,
                        attrs={"shard": self.shard, "first_image": self.lo, "n_images": self.n_images,
                               "skipped": self.skipped})

    def abort(self) -> None:
        if self.out is not None:
            self.out.abort()


def _finish(ds: ImageDataset, config: dict, key: str, root: Path, layers: list[str], n_shards: int,
            timings: dict, t0: float, extra: dict | None = None) -> dict:
    import json

    shards, skipped = [], []
    counts: dict[str, int] = {}
    per_class = np.zeros(len(ds.classes), dtype=np.int64)
    for s in range(n_shards):
        path = root / shard_name(s)
        with h5py.File(path, "r") as f:
            n = int(f["label"].shape[0])
            skipped.extend(json.loads(f.attrs.get("skipped", "[]")))
            for sp, c in zip(*np.unique(f["split"][()].astype(str), return_counts=True)) if n else []:
                counts[sp] = counts.get(sp, 0) + int(c)
            per_class += np.bincount(f["label"][()], minlength=len(ds.classes)) if n else 0
        shards.append({"file": path.name, "rows": n})
    n_rows = sum(s["rows"] for s in shards)
    if n_rows == 0:
        raise DataError(f"none of the {len(ds.items)} files could be used as an image (first: "
                        f"{skipped[0]['path']}: {skipped[0]['reason']})")
    elapsed = time.perf_counter() - t0
    views = config["preprocess"]["views"]
    manifest = {
        "key": key, "format_version": FORMAT_VERSION, "featx_version": featx.__version__,
        "config": config, "classes": list(ds.classes), "n_images": len(ds.items) - len(skipped),
        "n_rows": n_rows, "rows_per_image": views, "counts": {s: counts[s] for s in ("train", "val", "test") if s in counts},
        "rows_per_class": dict(zip(ds.classes, per_class.tolist())),
        "dims": {l: get_spec(config["backbone"]).dims[l] for l in layers},
        "shards": shards, "skipped": skipped,
        "timings": {**{k: round(v, 3) for k, v in timings.items()}, "total_s": round(elapsed, 3),
                    "images_per_s": round((len(ds.items) - len(skipped)) / elapsed, 2) if elapsed else None},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    atomic_write_json(root / "manifest.json", manifest, seal=True)
    return manifest


# --------------------------------------------------------------------------------------------- torchrun

def _extract_ranks(ctx: distributed.Context, ds: ImageDataset, bb: Backbone, pre: Preprocess, config: dict, key: str,
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
    import contextlib

    def manifest() -> dict | None:
        try:
            m = read_manifest(root)
        except IntegrityError:  # not yet, or torn on its way over a network filesystem: look again
            return None
        return m if isinstance(m, dict) and m.get("key") == key else None

    def finished(computed: bool) -> ExtractResult:  # rank 0 wrote it, or is about to
        distributed.wait_for_files([root / "manifest.json"], what="manifest", ready=lambda p: manifest() is not None)
        return ExtractResult(root, computed, manifest())

    if ctx.broadcast(_complete(root, key) is not None if ctx.is_main else None):
        return finished(False)
    ctx.check_shared(root.parents[1], what="cache")  # else rank 0 would wait forever for shards written elsewhere
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / ".lock")) if ctx.is_main else contextlib.nullcontext()
    plan: dict | None = None
    if ctx.is_main:
        try:
            lock.acquire(timeout=0)
        except Exception:  # filelock.Timeout: a process outside this job is extracting the same set
            plan = {"busy": True}
        if plan is None:
            if _complete(root, key) is not None:
                plan = {"done": True}
            else:
                for stale in root.glob(".tmp-*"):  # left by a killed rank; the job's ranks have not started
                    stale.unlink(missing_ok=True)
                atomic_write_json(root / "images.json", {"fields": ["path", "size", "sha256"], "images": fps})
                write_command(root, command)
                per = _plan(root, len(ds.items), pre.views, shard_size)
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
            mean, std = _dataset_stats_ranks(ctx, ds, pre, root, plan["stats"], workers=workers,
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
            _compute(ds, bb, pre, root, layers, dev, mine, per, batch_size=batch_size, workers=workers, amp=amp,
                     max_pixels=max_pixels, progress=progress, threads=threads, decode=decode, timings=timings)
        if not ctx.is_main:
            return finished(bool(mine))
        distributed.wait_for_files([root / shard_name(s) for s in todo], what="shards")
        extra = {"rows_key": rows_key, "dataset": ds.describe()}
        return ExtractResult(root, True, _finish(ds, config, key, root, layers, n_shards, timings, t0, extra))
    finally:
        if ctx.is_main:
            lock.release()


def _dataset_stats_ranks(ctx: distributed.Context, ds: ImageDataset, pre: Preprocess, root: Path, saved: dict | None,
                         *, workers: int, batch_size: int, max_pixels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_dataset_stats` shared out between the ranks: each measures every ``world_size``-th batch, the
    per-batch sums are gathered and added in batch order, so the result is bit for bit a single process's."""
    if isinstance(saved, dict):
        return np.asarray(saved["mean"]), np.asarray(saved["std"])
    train = [ds.abspath(it) for it in ds.items if it.split == "train"]
    base = Preprocess(**{**_pre_fields(pre), "views": 1})
    batches = [list(range(a, min(a + batch_size, len(train)))) for a in range(0, len(train), batch_size)]
    mine = list(range(ctx.rank, len(batches), ctx.world_size))
    sums: dict[int, tuple | None] = {}
    loader = _loader(train, [batches[b] for b in mine], base, workers=workers, pin=False, max_pixels=max_pixels)
    for b, (_, px, _) in zip(mine, loader):
        interrupt.check("extract.stats")
        if px is None:
            continue
        x = px.to(torch.float64) / 255.0
        sums[b] = (x.sum(dim=(0, 2, 3)).numpy(), (x * x).sum(dim=(0, 2, 3)).numpy(), x.shape[0] * x.shape[2] * x.shape[3])
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
