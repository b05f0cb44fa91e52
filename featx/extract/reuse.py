"""Reusing an existing feature set: deeper layers computed from a shallower cached layer of the same rows."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from featx import interrupt
from featx.backbones import VIEW_SETS, Backbone, get_spec, start_layer, tapped
from featx.cache import read_json, seal_ok
from featx.datasets import ImageDataset
from featx.devices import cores
from featx.extract.shards import Shard

logger = logging.getLogger("featx.extract")


@dataclass(frozen=True)
class Source:
    """A complete feature set holding the same rows of the same network, and the layer to start from."""

    root: Path
    key: str
    layer: str
    manifest: dict = field(repr=False, compare=False)


class SourceGone(Exception):
    """The source feature set cannot be read (removed or damaged meanwhile): compute from the images instead."""


def reusable_source(features: Path, rows_key: str, backbone: str, layers: Sequence[str],
                    key: str) -> Source | None:
    """A finished feature set under ``features`` whose rows are those ``key`` would hold (same images, labels,
    splits, backbone, weights, transform, views, normalization and precision: the same ``rows_key``) and which
    holds a layer at or before the shallowest of ``layers``, so that those can be computed from its rows by the
    remaining stages; the deepest such layer wins (fewest stages to run).  None when there is none."""
    spec = get_spec(backbone)
    order = list(spec.layers)
    best: Source | None = None
    for path in sorted(features.glob("*/manifest.json")):
        m = read_json(path)
        if not isinstance(m, dict) or m.get("rows_key") != rows_key or m.get("key") in (None, key) \
                or seal_ok(m) is False:  # an edited or damaged manifest is not trusted as a source
            continue
        start = start_layer(spec, m.get("config", {}).get("layers", []), layers)
        if start is not None and (best is None or order.index(start) > order.index(best.layer)):
            best = Source(path.parent, m["key"], start, m)
    if best is not None:
        logger.info("computing %s from the cached %s of feature set %s (no image is decoded)", ",".join(layers),
                    best.layer, best.key)
    return best


def source_rows(src: Source, V: int) -> tuple[dict[str, tuple[Path, int]], dict[str, str]]:
    """Where each image's rows are in the source (``path -> (shard file, first row)``), and why the images it
    skipped were skipped."""
    where: dict[str, tuple[Path, int]] = {}
    try:
        for sh in src.manifest["shards"]:
            f = src.root / sh["file"]
            with h5py.File(f, "r") as h:
                if src.layer not in h:
                    raise SourceGone(f"{f.name} has no {src.layer}")
                paths = h["path"][()]
                for r in range(0, len(paths), V):
                    where[paths[r].decode() if isinstance(paths[r], bytes) else str(paths[r])] = (f, r)
        reason = {sk["path"]: sk["reason"] for sk in src.manifest.get("skipped", [])}
    except (OSError, KeyError, TypeError) as e:
        raise SourceGone(f"{type(e).__name__}: {e}") from None
    return where, reason


REUSE_ROWS = 1024  # rows per matrix product when computing from cached rows: the weights are read once per chunk


def compute_from(src: Source, ds: ImageDataset, bb: Backbone, root: Path, layers: list[str], dev: torch.device,
                  todo: list[int], per: int, *, V: int, amp: bool, progress: bool | None, threads: int | None,
                  timings: dict) -> None:
    """Write shards ``todo`` from the source's rows of ``src.layer`` through the stages after it.

    The stages after a convolutional trunk are matrix products whose cost is reading their weights (AlexNet's
    fc6 and fc7: 218 MB), so the rows go through them :data:`REUSE_ROWS` at a time on all cores rather than a
    direct pass's ``--batch-size``.  The values equal a direct extraction's up to float rounding (products over
    other numbers of rows may sum in another order; tests/test_extract.py bounds the difference at 1e-6
    relative), the same latitude two direct extractions with different ``--batch-size`` or ``--workers`` have."""
    model = tapped(bb, layers, start=src.layer).to(dev)
    where, reason = source_rows(src, V)
    autocast = torch.autocast(dev.type, dtype=torch.float16 if dev.type == "cuda" else torch.bfloat16, enabled=amp)
    img_chunk = max(1, REUSE_ROWS // V)
    threads_before = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(int(threads) if threads else cores())
    handles: dict[Path, h5py.File] = {}
    show = (sys.stderr.isatty() if progress is None else progress)
    bar = tqdm(total=sum(min(len(ds.items), (s + 1) * per) - s * per for s in todo), unit="img", disable=not show,
               file=sys.stderr, desc="extract (from cache)", dynamic_ncols=True)
    try:
        for s in todo:
            lo, hi = s * per, min(len(ds.items), (s + 1) * per)
            shard = Shard(s, ds, per, V)
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
        raise SourceGone(f"{type(e).__name__}: {e}") from None
    finally:
        for h in handles.values():
            h.close()
        bar.close()
        torch.set_num_threads(threads_before)
    logger.info("time: reading the cached %s rows %.1fs, the stages after it %.1fs", src.layer,
                timings.get("read_s", 0.0), timings["forward_s"])

