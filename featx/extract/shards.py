"""Writing shards: one shard's rows as they arrive, and the manifest over the finished shards."""
from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np

import featx
from featx.backbones import get_spec
from featx.cache import atomic_write_json
from featx.datasets import ImageDataset
from featx.errors import DataError
from featx.store import FORMAT_VERSION, ShardWriter, shard_name


def timed(timings: dict, fn, *args) -> None:
    t = time.perf_counter()
    fn(*args)
    timings["write_s"] += time.perf_counter() - t


class Shard:
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
        out = self.out
        assert out is not None, "open() runs first"
        k = 0
        while k < len(positions):  # one slice per run of consecutive images
            j = k
            while j + 1 < len(positions) and positions[j + 1] == positions[j] + 1:
                j += 1
            out.write_rows(positions[k] * V, {l: a[k * V:(j + 1) * V] for l, a in feats.items()})
            self.ok[positions[k]:positions[j] + 1] = True
            k = j + 1

    def finish(self, ds: ImageDataset, view_names: list[str]) -> None:
        V = self.views
        items = [ds.items[self.lo + p] for p in np.nonzero(self.ok)[0]]
        assert self.out is not None, "open() runs first"
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


def finish_set(ds: ImageDataset, config: dict, key: str, root: Path, layers: list[str], n_shards: int,
            timings: dict, t0: float, extra: dict | None = None) -> dict:

    shards: list[dict] = []
    skipped: list = []
    counts: dict[str, int] = {}
    per_class = np.zeros(len(ds.classes), dtype=np.int64)
    for s in range(n_shards):
        path = root / shard_name(s)
        with h5py.File(path, "r") as f:
            n = int(f["label"].shape[0])
            skipped.extend(json.loads(f.attrs.get("skipped", "[]")))
            if n:
                names, per_split = np.unique(f["split"][()].astype(str), return_counts=True)
                for sp, c in zip(names.tolist(), per_split.tolist()):
                    counts[sp] = counts.get(sp, 0) + int(c)
                per_class += np.bincount(f["label"][()], minlength=len(ds.classes))
        shards.append({"file": path.name, "rows": n})
    n_rows = sum(int(s["rows"]) for s in shards)
    if n_rows == 0:
        raise DataError(f"none of the {len(ds.items)} files could be used as an image (first: "
                        f"{skipped[0]['path']}: {skipped[0]['reason']})")
    elapsed = time.perf_counter() - t0
    views = config["preprocess"]["views"]
    manifest = {
        "key": key, "format_version": FORMAT_VERSION, "featx_version": featx.__version__,
        "config": config, "classes": list(ds.classes), "n_images": len(ds.items) - len(skipped),
        "n_rows": n_rows, "rows_per_image": views,
        "counts": {s: counts[s] for s in ("train", "val", "test") if s in counts},
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
