"""Compatibility name for :mod:`featx.datasets`, where finding, splitting and decoding images now live.

Kept so that ``from featx.data import discover, open_rgb, ...`` (and the private helpers other stages used
before the package existed) keep working unchanged.
"""
from __future__ import annotations

from featx.datasets import (  # noqa: F401  (re-exports)
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    SPLITS,
    BadImage,
    ImageDataset,
    Item,
    discover,
    fingerprint_file,
    fingerprints,
    fingerprints_of,
    open_rgb,
    parse_split,
)
from featx.datasets.base import is_image_name as _is_image_name  # noqa: F401
from featx.datasets.base import walk_images as _walk_images  # noqa: F401
from featx.datasets.images import _to_8bit_rgb  # noqa: F401
from featx.datasets.splits import stratified as _stratified  # noqa: F401
