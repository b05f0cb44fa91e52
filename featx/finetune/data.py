"""The images a fine-tuning run trains and measures on, and how they reach the network.

The images are those of the head's source feature set (its data root and, in the shards, every image's path,
label and split), checked against the sizes and sha256 extraction recorded.  Every random draw of an epoch is
derived from ``(seed, epoch)`` (:func:`epoch_seed`): the order of the training images, and for an augmented
image its view, from its index too, so that a resumed run repeats exactly what the uninterrupted one would have
done, whatever the number of decode workers.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from featx.backbones import Preprocess
from featx.cache import read_json
from featx.datasets import DEFAULT_MAX_PIXELS, BadImage, fingerprints_of, open_rgb, stratified
from featx.datasets.loading import collate
from featx.errors import DataError

logger = logging.getLogger(__name__)

VAL_FRACTION = 0.1  # of each class's train images, held out for model selection when the data has no val split

Part = tuple[list[Path], np.ndarray]  # the paths of a split's images and their labels


@dataclass
class ImageRows:
    """The images of a feature set, one per path (views collapsed), with labels and splits."""

    root: Path
    paths: list[str]
    labels: np.ndarray
    splits: np.ndarray

    def select(self, split: str) -> Part:
        idx = np.nonzero(self.splits == split)[0]
        return [self.root / self.paths[i] for i in idx], self.labels[idx]


def feature_set_images(fdir: Path, manifest: dict) -> ImageRows:
    """Paths, labels and splits of every image that has rows in the feature set (skipped files have none).

    Raises:
        DataError: the data root is gone, or images are missing, unreadable or changed since extraction (the
        first is named).
    """
    from featx.store import FeatureSet

    fs = FeatureSet(fdir)
    paths = fs.column("path")
    splits = fs.splits()
    if splits is None:
        raise DataError(f"feature set {manifest.get('key')} records no train/test split of its images: re-extract it")
    labels = fs.labels()
    _, first = np.unique(paths, return_index=True)
    first.sort()  # views of an image are consecutive rows: keep the first, in the feature set's order
    root = Path(manifest["config"]["data"])
    rows = ImageRows(root, [str(p) for p in paths[first]], labels[first], np.asarray(splits[first], dtype=str))
    if not root.is_dir():
        raise DataError(f"the images of feature set {manifest.get('key')} were in {str(root)!r}, which is gone: "
                        f"put the data back there (fine-tuning trains on the images themselves)")
    missing = [p for p in rows.paths if not _readable(root / p)]
    if missing:
        raise DataError(f"{len(missing)} of the {len(rows.paths)} images of feature set {manifest.get('key')} are "
                        f"missing or unreadable, e.g. {str(root / missing[0])!r}: restore them or re-extract")
    _check_unchanged(fdir, root, rows.paths, manifest.get("key"))
    return rows


def _check_unchanged(fdir: Path, root: Path, paths: list[str], key: str | None) -> None:
    """Compare each image's size and sha256 with what extraction recorded (``images.json``)."""
    rec = read_json(fdir / "images.json")
    if not isinstance(rec, dict):
        logger.warning("feature set %s records no image fingerprints (made by an older featx): "
                       "changed images cannot be detected", key)
        return
    want = {p: (size, digest) for p, size, digest in rec["images"]}
    have = fingerprints_of(root, paths)
    changed = [p for p, size, digest in have if want.get(p) != (size, digest)]
    if changed:
        raise DataError(f"{len(changed)} of the {len(paths)} images of feature set {key} changed since extraction, "
                        f"e.g. {str(root / changed[0])!r}: re-extract (featx extract) and refit the head")


def _readable(p: Path) -> bool:
    try:
        return p.is_file() and os.access(p, os.R_OK)
    except OSError:
        return False


def split_rows(rows: ImageRows, seed: int) -> tuple[dict[str, Part], str]:
    """train / val / test images, and where val comes from: the feature set's val split, or a stratified
    ``VAL_FRACTION`` of each class's train images held out (never test images).

    Raises:
        DataError: no train or no test images.
    """
    parts = {s: rows.select(s) for s in ("train", "val", "test")}
    source = "val split"
    if not len(parts["val"][0]):
        paths, labels = parts["train"]
        assign = np.asarray(stratified(labels.tolist(), {"val": VAL_FRACTION}, seed), dtype=str)
        parts["val"] = ([p for p, a in zip(paths, assign) if a == "val"], labels[assign == "val"])
        parts["train"] = ([p for p, a in zip(paths, assign) if a == "train"], labels[assign == "train"])
        source = f"{VAL_FRACTION:.0%} of each class's train images, held out (seed {seed})"
    if not len(parts["train"][0]):
        raise DataError("the feature set has no train images to fine-tune on")
    if not len(parts["test"][0]):
        raise DataError("the feature set has no test images: the fine-tuned model could not be measured")
    if not len(parts["val"][0]):
        logger.warning("too few train images to hold any out for validation: the last epoch is kept, no early stopping")
        source = "none"
    return parts, source


# ------------------------------------------------------------------------------------------------ draws

def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s draws: the order of the training images, and dropout on rank 0."""
    return int(np.random.default_rng([seed, epoch, 7919]).integers(0, 2**62))


def dropout_seed(seed: int, epoch: int, rank: int) -> int:
    """What dropout draws from in ``epoch`` on ``rank``: rank 0 as one process does, the others their own."""
    if rank == 0:
        return epoch_seed(seed, epoch)
    return int(np.random.default_rng([seed, epoch, 7919, rank]).integers(0, 2**62))


def augmented_pixels(img, pre: Preprocess, augment: frozenset[str], rng: np.random.Generator) -> torch.Tensor:
    """uint8 ``[3, crop, crop]``: one random training view of a Pillow image.

    ``crop``: a random ``crop`` x ``crop`` window of the image resized as for testing (AlexNet's recipe);
    ``resized-crop``: a random window of 25-100% of the area and aspect 3/4-4/3, resized to the crop;
    ``sixview``: one of six views at random (centre, four corners, the whole image), mirrored half the time;
    ``flip``: mirrored half the time; ``jitter``: brightness, contrast and saturation x [0.6, 1.4], random order.
    Without a cropping augmentation the view is the test's centre crop.
    """
    interp = InterpolationMode(pre.interpolation)
    c = pre.crop
    if "resized-crop" in augment:
        out = _resized_crop(img, pre, interp, rng)
    else:
        r = TF.resize(img, [pre.resize], interpolation=interp, antialias=pre.antialias)
        W, H = r.size
        if "crop" in augment and W >= c and H >= c:
            out = TF.crop(r, int(rng.integers(0, H - c + 1)), int(rng.integers(0, W - c + 1)), c, c)
        elif "sixview" in augment and W >= c and H >= c:
            v = int(rng.integers(0, 6))
            if v == 5:
                out = TF.resize(img, [c, c], interpolation=interp, antialias=pre.antialias)
            else:
                out = TF.five_crop(r, [c, c])[(4, 0, 1, 2, 3)[v]]  # centre first, then the corners
            if rng.random() < 0.5:
                out = TF.hflip(out)
        else:
            out = TF.center_crop(r, [c])
    if "flip" in augment and rng.random() < 0.5:
        out = TF.hflip(out)
    if "jitter" in augment:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
        factors = rng.uniform(0.6, 1.4, size=3)
        for j in rng.permutation(3):
            out = ops[j](out, float(factors[j]))
    return TF.pil_to_tensor(out)


def _resized_crop(img, pre: Preprocess, interp: InterpolationMode, rng: np.random.Generator):
    """A random window of 25-100% of the area and aspect 3/4-4/3 (the centre square after 10 misses), resized."""
    c = pre.crop
    W, H = img.size
    box = None
    for _ in range(10):
        area = W * H * rng.uniform(0.25, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < w <= W and 0 < h <= H:
            box = (int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w)
            break
    if box is None:
        s = min(W, H)
        box = ((H - s) // 2, (W - s) // 2, s, s)
    return TF.resized_crop(img, *box, [c, c], interpolation=interp, antialias=pre.antialias)


# ------------------------------------------------------------------------------------------------ datasets

class TrainSet(torch.utils.data.Dataset):
    """Item i -> (i, uint8 [1, 3, c, c] or None, reason or None); the view is drawn from ``(seed, epoch, i)``."""

    def __init__(self, paths: Sequence[Path], pre: Preprocess, augment: frozenset[str], seed: int,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.paths = list(paths)
        self.pre = pre
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        try:
            img = open_rgb(self.paths[i], max_pixels=self.max_pixels)
            return i, augmented_pixels(img, self.pre, self.augment, rng)[None], None
        except BadImage as e:
            return i, None, str(e)
        except Exception as e:  # one bad file costs that file, not the run
            return i, None, f"cannot decode: {type(e).__name__}: {e}"


def make_loader(dataset: torch.utils.data.Dataset, batches: list[list[int]], *, workers: int,
                pin: bool) -> torch.utils.data.DataLoader:
    """Batches of ``(indices, pixels or None, [(index, why it was skipped)])`` decoded in ``workers`` processes."""
    if workers > 0:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                           pin_memory=pin, prefetch_factor=4)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=0, collate_fn=collate,
                                       pin_memory=pin)


def batches_of(n: int, batch_size: int, order: np.ndarray | None = None) -> list[list[int]]:
    """Consecutive batches of ``batch_size`` indices of ``range(n)``, in ``order`` when given."""
    idx = np.arange(n) if order is None else order
    return [idx[a:a + batch_size].tolist() for a in range(0, n, batch_size)]
