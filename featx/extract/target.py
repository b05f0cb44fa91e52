"""What a run computes and where it goes: the finished set at a key, the command that makes it, the shard plan."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from featx.cache import atomic_write_json, hash_key, read_json, seal_ok
from featx.datasets import ImageDataset
from featx.errors import IntegrityError
from featx.store import FORMAT_VERSION, read_manifest, shard_problem

if TYPE_CHECKING:
    from featx.backbones import Preprocess

logger = logging.getLogger("featx.extract")


@dataclass
class ExtractResult:
    """What :func:`extract` produced: the feature set's directory and whether it was computed now."""

    path: Path
    computed: bool
    manifest: dict = field(default_factory=dict)


def complete_set(root: Path, key: str, *, quiet: bool = False) -> ExtractResult | None:
    """The finished feature set at ``root``, or None: a missing or damaged manifest, or a damaged or missing shard
    (every shard is read back past its checksums; what is damaged is recomputed)."""
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


def command_line(data, layers: list[str], *, backbone: str, weights: str, split: str | None, seed: int, views,
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


def pre_fields(pre: Preprocess) -> dict:
    return {"resize": pre.resize, "crop": pre.crop, "interpolation": pre.interpolation, "antialias": pre.antialias,
            "mean": pre.mean, "std": pre.std}


def images_per_shard(root: Path, n_items: int, views: int, shard_size: int) -> int:
    """Images per shard, fixed by the first run so that a resumed run cuts shards at the same places."""
    plan = read_json(root / "plan.json")
    if isinstance(plan, dict) and seal_ok(plan) is not False and plan.get("n_items") == n_items \
            and plan.get("views") == views:
        return int(plan["images_per_shard"])
    per = max(1, shard_size // views)
    atomic_write_json(root / "plan.json", {"n_items": n_items, "views": views, "images_per_shard": per}, seal=True)
    return per



def content_keys(config: dict, ds: ImageDataset, fps: list) -> tuple[str, str]:
    """The feature set's key (what it holds: the run's config, the images, their labels, splits and content) and
    its rows key: the same hash without the layers.  Feature sets that share a rows key hold the same rows of the
    same network, so a deeper layer of one can be computed from a shallower layer of another."""
    items = [(it.path, it.label, it.split) for it in ds.items]
    kept = {k: v for k, v in config.items() if k not in ("data", "source")}
    key = hash_key({"format": FORMAT_VERSION, "config": kept, "classes": ds.classes, "items": items,
                    "fingerprints": fps})
    rows_key = hash_key({"format": FORMAT_VERSION, "config": {k: v for k, v in kept.items() if k != "layers"},
                         "classes": ds.classes, "items": items, "fingerprints": fps})
    return key, rows_key
