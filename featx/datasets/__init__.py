"""From a folder on disk to labelled items and splits.

:func:`discover` detects the layout of DATA (a published dataset as its publisher ships it, class folders,
split folders, or a CSV file) and returns an :class:`ImageDataset`.  The modules: :mod:`.base` (the items and
fingerprints), :mod:`.folder` (the generic layouts), :mod:`.splits` (``--split``), :mod:`.images` (safe
decoding), :mod:`.layouts` (detection, ``--layout`` and the registry of readers), and one reader per published
dataset: :mod:`.oxford_pets`, :mod:`.caltech` (101 and 256), :mod:`.tiny_imagenet`, :mod:`.stanford_dogs`,
:mod:`.dogs_vs_cats`, :mod:`.flowers102` (docs/datasets.md); and :mod:`.digits`, which writes scikit-learn's
digits as a class folder.
"""
from __future__ import annotations

from featx.datasets.base import (
    IMAGE_EXTENSIONS,
    SPLITS,
    ImageDataset,
    Item,
    fingerprint_file,
    fingerprints,
    fingerprints_of,
    is_image_name,
    walk_images,
)
from featx.datasets.images import DEFAULT_MAX_PIXELS, BadImage, open_rgb
from featx.datasets.layouts import LAYOUTS, NAMES, Layout, detect, discover, register
from featx.datasets.splits import parse_split, stratified

__all__ = [
    "IMAGE_EXTENSIONS", "SPLITS", "DEFAULT_MAX_PIXELS", "Item", "ImageDataset", "BadImage", "discover", "detect",
    "LAYOUTS", "NAMES", "Layout", "register",
    "parse_split", "stratified", "open_rgb", "fingerprint_file", "fingerprints", "fingerprints_of",
    "is_image_name", "walk_images",
]
