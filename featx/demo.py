"""``featx demo``: the whole pipeline on scikit-learn's 1,797 real handwritten digits, with no download.

The digits (8x8 grey images, 10 classes) are written once as an image folder under the cache; then each stage
runs on them with the library API, exactly as the commands would, and a short summary is printed to stderr.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from featx.cache import cache_root
from featx.errors import WeightsError

logger = logging.getLogger(__name__)


def write_digits(root: str | os.PathLike, *, limit: int | None = None) -> Path:
    """Write scikit-learn's digits as ``root/<digit>/<index>.png`` (grey, 8x8, intensities scaled to 0-255).

    Idempotent: an existing complete folder is left as it is.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    n = len(digits.images) if limit is None else min(limit, len(digits.images))
    marker = root / f".complete-{n}"
    if marker.exists():
        return root
    for i in range(n):
        p = root / str(int(digits.target[i])) / f"digit-{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8), "L").save(p)
    marker.touch()
    return root


def _say(msg: str) -> None:
    import click

    click.echo(msg, err=True)


def run_demo(*, weights: str | None = None, cache: str | os.PathLike | None = None, device: str = "auto") -> Path:
    """Run the demo and return the directory of its last output."""
    from featx.extract import extract

    root = cache_root(cache)
    data = write_digits(root / "demo" / "digits")
    kw = dict(layers=["pool5"], split="test=0.15,val=0.1", seed=0, cache=root, device=device)
    if weights is None:
        try:
            res = extract(data, weights="imagenet", **kw)
            weights = "imagenet"
        except WeightsError as e:
            _say(f"featx demo: notice: ImageNet weights are not available here ({e}).")
            _say("featx demo: notice: using seeded RANDOM weights instead: the accuracies below show the pipeline "
                 "working, not what pretrained features reach.")
            weights = "random"
            res = extract(data, weights="random", **kw)
    else:
        res = extract(data, weights=weights, **kw)
    m = res.manifest
    lines = [
        "",
        "featx demo summary",
        f"  data      scikit-learn digits: {m['n_images']} images, {len(m['classes'])} classes, "
        f"split {m['counts']}",
        f"  features  alexnet pool5 ({m['dims']['pool5']} values per image), {weights} weights, "
        f"{m['timings']['images_per_s']} images/s this run" if res.computed else
        f"  features  alexnet pool5 ({m['dims']['pool5']} values per image), {weights} weights (from the cache)",
        f"  skipped   {len(m['skipped'])} file(s)",
        f"  output    {res.path}",
    ]
    _say("\n".join(lines))
    return res.path
