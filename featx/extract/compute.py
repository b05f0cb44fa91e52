"""The decode/forward pipeline: images to rows of the requested layers, written shard by shard."""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from featx import interrupt
from featx.backbones import Backbone, Preprocess, tapped
from featx.cache import atomic_write_json, read_json, seal_ok
from featx.datasets import ImageDataset
from featx.datasets.loading import CollateReady, decode_loader
from featx.datasets.loading import decode as decode_image
from featx.devices import cores
from featx.errors import DataError
from featx.extract.shards import Shard, timed
from featx.extract.target import pre_fields

logger = logging.getLogger("featx.extract")


def lane_batches(files: Sequence[Path], batches: list[list[int]], pre: Preprocess, model: torch.nn.Module,
           layers: list[str], *, lanes: int, max_pixels: int | None, autocast, timings: dict):
    """Yield ``(indices, {layer: rows}, bad)`` per batch, in order: each batch decoded, normalized and passed
    through ``model`` by one of ``lanes`` threads (0 or 1: in the calling thread).  At most two batches per lane
    are in flight, which bounds memory.

    A lane gives its batch up between two images, and before the forward pass, once a stop is requested (SIGINT,
    SIGTERM) or the generator is closed, so that a stop waits for at most one image's decoding and one forward
    pass, never for whole batches to be decoded; a batch given up raises :class:`~featx.interrupt.Interrupted`
    here, and its images are never written."""
    ready = CollateReady(pre)
    closing = threading.Event()

    def given_up() -> bool:
        return closing.is_set() or interrupt.stop_requested() is not None

    def work(batch: list[int]):
        t = time.perf_counter()
        decoded = []
        for i in batch:
            if given_up():
                return None
            decoded.append((i, *decode_image(files[i], pre, max_pixels)))
        idx, pixels, bad = ready(decoded)
        t_dec = time.perf_counter()
        feats = None
        if pixels is not None:
            if given_up():
                return None
            with torch.inference_mode(), autocast:
                out = model(pixels)
            feats = {l: out[l].float().numpy() for l in layers}
        return idx, feats, bad, t_dec - t, time.perf_counter() - t_dec

    def account(r):
        if r is None:  # given up: a stop was requested
            interrupt.raise_if_requested("extract.batch")
            raise RuntimeError("a lane gave its batch up without a stop request")
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
        closing.set()  # the lanes give their batches up
        pool.shutdown(wait=True, cancel_futures=True)


def process_batches(files: Sequence[Path], batches: list[list[int]], pre: Preprocess, model: torch.nn.Module,
                      layers: list[str], dev: torch.device, *, workers: int, max_pixels: int | None, autocast,
                      timings: dict):
    """``workers`` decode processes feed one forward pass.  CUDA: uint8 batches in pinned memory, copied without
    blocking and normalized on the device (4x fewer bytes over the bus than float32).  CPU (``--decode
    processes``): the workers also normalize, so the main process only runs the network."""
    ready = dev.type == "cpu" and workers > 0
    loader = decode_loader(files, batches, pre, workers=workers, pin=dev.type == "cuda", max_pixels=max_pixels,
                           ready=ready)
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



def dataset_stats(ds: ImageDataset, pre: Preprocess, root: Path, *, workers: int, batch_size: int,
                   max_pixels: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std of the train split's network-input pixels (centre crop, in [0, 1])."""
    saved = read_json(root / "normalization.json")
    if isinstance(saved, dict) and seal_ok(saved) is not False:  # damaged or edited: measured again
        return np.asarray(saved["mean"]), np.asarray(saved["std"])
    train = [ds.abspath(it) for it in ds.items if it.split == "train"]
    base = Preprocess(**{**pre_fields(pre), "views": 1})
    batches = [list(range(a, min(a + batch_size, len(train)))) for a in range(0, len(train), batch_size)]
    s = np.zeros(3)
    ss = np.zeros(3)
    n = 0
    for _, px, _ in decode_loader(train, batches, base, workers=workers, pin=False, max_pixels=max_pixels):
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



class _SteadyRate:
    """Images per second after the first ``warm`` batches (the pipeline filling up, the first passes through a
    cold network), recorded in ``timings["steady_images_per_s"]``: the run's rate without its start-up."""

    def __init__(self, *, warm: int, timings: dict):
        self.warm, self.timings = warm, timings
        self.batches = self.images = 0
        self.t_warm: float | None = None

    def batch(self, images: int) -> None:
        self.batches += 1
        if self.batches == self.warm:
            self.t_warm = time.perf_counter()
        elif self.batches > self.warm:
            self.images += images

    def done(self) -> None:
        if self.t_warm is not None and self.images and (dt := time.perf_counter() - self.t_warm) > 0:
            self.timings["steady_images_per_s"] = self.images / dt


def compute_shards(ds: ImageDataset, bb: Backbone, pre: Preprocess, root: Path, layers: list[str], dev: torch.device,
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
        torch.set_num_threads(int(threads) if threads else max(1, cores() // max(1, lanes)))
        source = lane_batches(files, batches, pre, model, layers, lanes=lanes, max_pixels=max_pixels, autocast=autocast,
                        timings=timings)
    else:
        if threads:
            torch.set_num_threads(int(threads))
        source = process_batches(files, batches, pre, model, layers, dev, workers=workers, max_pixels=max_pixels,
                                   autocast=autocast, timings=timings)
    show = (sys.stderr.isatty() if progress is None else progress)
    bar = tqdm(total=len(files), unit="img", disable=not show, file=sys.stderr, desc="extract", dynamic_ncols=True)
    steady = _SteadyRate(warm=max(2, 2 * workers), timings=timings)
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featx-writer")  # FIFO: the file's only user
    pending: deque[Future] = deque()
    cur: Shard | None = None
    view_names = list(pre.view_names)

    def submit(fn, *args):
        while pending and pending[0].done():
            pending.popleft().result()  # a failed write stops the run here
        while len(pending) >= 16:  # bound memory: a few batches' rows waiting for the disk
            pending.popleft().result()
        pending.append(writer.submit(timed, timings, fn, *args))

    try:
        for idx, feats, bad in source:
            # a stop request abandons the shard in progress (its temporary file, below); finished shards stay
            interrupt.check("extract.batch")
            shard = owner[(idx or [i for i, _ in bad])[0]][0]
            if cur is None or cur.shard != shard:
                cur = Shard(shard, ds, per, V)
                submit(cur.open, root, {l: bb.spec.dims[l] for l in layers})
            for i, why in bad:
                cur.skip(owner[i][1], why)
            if feats is not None:
                cur.seen += len(idx)
                submit(cur.write, [owner[i][1] for i in idx], feats)
            bar.update(len(idx) + len(bad))
            steady.batch(len(idx) + len(bad))
            if cur.complete():
                submit(cur.finish, ds, view_names)
                cur = None
        while pending:
            pending.popleft().result()
        steady.done()
    finally:
        source.close()
        bar.close()
        if cur is not None:  # stopped mid-shard: drop its temporary file (a rerun redoes the shard)
            writer.submit(cur.abort)
        writer.shutdown(wait=True)
        torch.set_num_threads(threads_before)
    logger.info("time: decode %.1fs, forward %.1fs (summed over lanes), waiting for them %.1fs, writing %.1fs "
                "(in the background)", timings["decode_s"], timings["forward_s"], timings["wait_s"], timings["write_s"])
