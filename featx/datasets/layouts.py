"""Which layout a DATA argument is, and the reader for it.

Generic layouts (:mod:`featx.datasets.folder`): class folders, split folders, a CSV file.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from featx.datasets.base import SPLITS, ImageDataset
from featx.datasets.folder import _from_class_folders, _from_csv, _from_split_folders
from featx.datasets.splits import parse_split
from featx.errors import DataError

logger = logging.getLogger(__name__)


def discover(data: str | os.PathLike, *, split: str | dict[str, float] | None = None, seed: int = 0) -> ImageDataset:
    """Find the images of ``data`` and resolve their classes and splits.

    Args:
        data: an image folder (class folders, or split folders ``train/``, ``test/``[, ``val/``]) or a CSV file
            with columns ``path,label[,split]``.
        split: the stratified split to make when the data has no splits of its own (``"test=0.15,val=0.1"``);
            ignored, with a log line, when it has.
        seed: seed of that split.

    Returns:
        An :class:`ImageDataset` with items sorted by path.

    Raises:
        DataError: missing or empty data, a single class, a malformed CSV.
        UsageError: a malformed ``split``.

    Example:
        >>> ds = discover("pets/", split="test=0.2", seed=1)  # doctest: +SKIP
    """
    fractions = split if isinstance(split, dict) else parse_split(split)
    src = Path(data).expanduser()
    if not src.exists():
        raise DataError(f"DATA {str(data)!r} does not exist: give an image folder (one subfolder per class) or a CSV file")
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise DataError(f"DATA {str(data)!r} is a file but not a .csv: give an image folder or a CSV file path,label[,split]")
        return _from_csv(src, fractions, seed)
    root = src.absolute()
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = {p.name for p in subdirs}
    if {"train", "test"} <= names:
        return _from_split_folders(root, subdirs, fractions, seed, str(data))
    if len(names) >= 2 and names <= set(SPLITS):
        # train/ + val/ (ImageNet's layout) would otherwise become a two-class problem "train vs val"
        raise DataError(f"{str(data)!r} holds only split folders ({', '.join(sorted(names))}) but split folders "
                        f"need both train/ and test/ (val/ optional): add test/, or list the images in a CSV "
                        f"path,label,split")
    return _from_class_folders(root, subdirs, fractions, seed, str(data))
