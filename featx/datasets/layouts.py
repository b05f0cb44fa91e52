"""Which layout a DATA argument is, and the reader for it: detection, ``--layout NAME``, the registry.

Published datasets are read as their publishers ship them, one reader module each (:mod:`.oxford_pets`,
:mod:`.caltech`, :mod:`.tiny_imagenet`, :mod:`.stanford_dogs`, :mod:`.dogs_vs_cats`, :mod:`.flowers102`); the
generic layouts (:mod:`.folder`) are class folders, split folders and a CSV file.  Detection tries the published
layouts first, each in DATA and in the folder name its archive unpacks to inside DATA (``oxford-iiit-pet/``,
``tiny-imagenet-200/``, ...), then split folders, then class folders, and logs which it took.  Adding a dataset
is adding a reader module and one :func:`register` line.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from featx.datasets import caltech, dogs_vs_cats, flowers102, oxford_pets, stanford_dogs, tiny_imagenet
from featx.datasets.base import SPLITS, ImageDataset
from featx.datasets.folder import _from_class_folders, _from_csv, _from_split_folders
from featx.datasets.splits import parse_split
from featx.errors import DataError, UsageError

logger = logging.getLogger(__name__)

Reader = Callable[..., ImageDataset]  # read(root, *, fractions, seed, data) -> ImageDataset


@dataclass(frozen=True)
class Layout:
    """A layout featx can read: its ``--layout`` name, a title for messages, how to recognise it in a folder,
    the folder names its archive unpacks to (looked for inside DATA), and its reader."""

    name: str
    title: str
    detect: Callable[[Path], bool]
    read: Reader
    folders: tuple[str, ...] = ()
    official_split: bool = True


LAYOUTS: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    """Add a layout; detection tries them in registration order (published datasets before generic folders)."""
    LAYOUTS[layout.name] = layout
    return layout


register(Layout(oxford_pets.NAME, oxford_pets.TITLE, oxford_pets.detect, oxford_pets.read, oxford_pets.FOLDERS))
register(Layout(tiny_imagenet.NAME, tiny_imagenet.TITLE, tiny_imagenet.detect, tiny_imagenet.read,
                tiny_imagenet.FOLDERS))
register(Layout(stanford_dogs.NAME, stanford_dogs.TITLE, stanford_dogs.detect, stanford_dogs.read,
                stanford_dogs.FOLDERS))
register(Layout(flowers102.NAME, flowers102.TITLE, flowers102.detect, flowers102.read, flowers102.FOLDERS))
register(Layout(caltech.CALTECH101, "Caltech-101", caltech.detect_101, caltech.read_101, caltech.FOLDERS_101,
                official_split=False))
register(Layout(caltech.CALTECH256, "Caltech-256", caltech.detect_256, caltech.read_256, caltech.FOLDERS_256,
                official_split=False))
register(Layout(dogs_vs_cats.NAME, dogs_vs_cats.TITLE, dogs_vs_cats.detect, dogs_vs_cats.read, dogs_vs_cats.FOLDERS,
                official_split=False))


def _split_folders(root: Path, *, fractions, seed, data):
    return _from_split_folders(root, _subdirs(root), fractions, seed, data)


def _class_folders(root: Path, *, fractions, seed, data):
    return _from_class_folders(root, _subdirs(root), fractions, seed, data)


def _is_split_folders(folder: Path) -> bool:
    return {"train", "test"} <= {p.name for p in _subdirs(folder)}


register(Layout("split-folders", "split folders (train/, test/[, val/] of class folders)", _is_split_folders,
                _split_folders))
register(Layout("class-folders", "class folders (one folder per class)", lambda folder: True, _class_folders,
                official_split=False))
# the CSV layout is a file, not a folder: it is chosen by DATA being a .csv, or forced with --layout csv
CSV = "csv"
NAMES = tuple(LAYOUTS) + (CSV,)


def _subdirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _locate(layout: Layout, folder: Path) -> Path | None:
    """The dataset's own folder if ``layout`` recognises DATA or the folder its archive unpacks to inside it."""
    for cand in (folder, *(folder / f for f in layout.folders)):
        if cand.is_dir() and layout.detect(cand):
            return cand
    return None


def detect(data: str | os.PathLike) -> tuple[str, Path]:
    """The layout of ``data`` and the folder (or file) it is read from, without reading it.

    Raises:
        DataError: ``data`` does not exist, or is a file other than a CSV.
    """
    src = Path(data).expanduser()
    if not src.exists():
        raise DataError(f"DATA {str(data)!r} does not exist: give an image folder (one subfolder per class), a "
                        f"published dataset's folder (see docs/datasets.md) or a CSV file")
    if src.is_file():
        if src.suffix.lower() != ".csv":
            raise DataError(f"DATA {str(data)!r} is a file but not a .csv: give an image folder or a CSV file "
                            f"path,label[,split]")
        return CSV, src
    folder = src.absolute()
    for layout in LAYOUTS.values():
        found = _locate(layout, folder)
        if found is not None:
            return layout.name, found
    raise AssertionError("class-folders recognises every folder")  # pragma: no cover


def discover(data: str | os.PathLike, *, layout: str | None = None, split: str | dict[str, float] | None = None,
             seed: int = 0) -> ImageDataset:
    """Find the images of ``data`` and resolve their classes and splits.

    Args:
        data: a published dataset's folder as its publisher ships it (Oxford-IIIT Pet, Caltech-101/256, Tiny
            ImageNet, Stanford Dogs, Kaggle dogs-vs-cats, Flowers-102: docs/datasets.md), an image folder (class
            folders, or split folders ``train/``, ``test/``[, ``val/``]) or a CSV file ``path,label[,split]``.
        layout: force a layout by name (one of :data:`NAMES`) instead of detecting it.
        split: the stratified split to make when the data has no split of its own (``"test=0.15,val=0.1"``);
            ignored, with a log line, when it has.
        seed: seed of that split.

    Returns:
        An :class:`ImageDataset` with items sorted by path; ``layout`` names the layout read, ``unused`` and
        ``report`` say what its reader left out and how.

    Raises:
        DataError: missing or empty data, a single class, a malformed CSV, a published layout recognised but
            incomplete (a list file missing or unreadable: named).
        UsageError: a malformed ``split``, an unknown ``layout``.

    Example:
        >>> ds = discover("oxford-iiit-pet/")  # doctest: +SKIP
        >>> ds.layout, ds.counts()  # doctest: +SKIP
        ('oxford-pets', {'train': 3680, 'test': 3669})
    """
    fractions = split if isinstance(split, dict) else parse_split(split)
    if layout is not None and layout not in NAMES:
        raise UsageError(f"unknown --layout {layout!r}: valid layouts are {', '.join(NAMES)}")
    if layout is None:
        name, where = detect(data)
        if name not in ("class-folders", CSV):
            logger.info("DATA %s: detected layout %s (%s); --layout NAME forces another", data, name,
                        LAYOUTS[name].title)
        else:
            logger.debug("DATA %s: layout %s", data, name)
    else:
        name = layout
        src = Path(data).expanduser()
        if not src.exists():
            detect(data)  # the same error as without --layout
        if name == CSV:
            if not src.is_file():
                raise DataError(f"--layout csv: DATA {str(data)!r} is not a file; give the CSV file itself")
            where = src
        elif src.is_file():
            raise DataError(f"--layout {name}: DATA {str(data)!r} is a file; this layout reads a folder")
        else:
            where = _locate(LAYOUTS[name], src.absolute()) or src.absolute()
        logger.info("DATA %s: layout %s (forced)", data, name)
    if name == CSV:
        return _from_csv(where, fractions, seed)
    if name == "class-folders" and layout is None:
        names = {p.name for p in _subdirs(where)}
        if len(names) >= 2 and names <= set(SPLITS):
            # train/ + val/ (ImageNet's layout) would otherwise become a two-class problem "train vs val"
            raise DataError(f"{str(data)!r} holds only split folders ({', '.join(sorted(names))}) but split folders "
                            f"need both train/ and test/ (val/ optional): add test/, or list the images in a CSV "
                            f"path,label,split")
    ds = LAYOUTS[name].read(where, fractions=fractions, seed=seed, data=str(data))
    if ds.unused:
        n = sum(u.get("files", 1) for u in ds.unused)
        logger.info("%s: %d file(s) on disk not used (%s), listed in the feature set's manifest",
                    LAYOUTS[name].title, n, "; ".join(f"{u['path']}: {u['reason']}" for u in ds.unused[:3])
                    + ("; ..." if len(ds.unused) > 3 else ""))
    if LAYOUTS[name].official_split and split is not None and name != "split-folders":
        logger.info("using the official split of %s (--split is not applied)", LAYOUTS[name].title)
    return ds
