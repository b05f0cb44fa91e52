"""Caltech-101 and Caltech-256, as published by Caltech (data.caltech.edu; torchvision.datasets.Caltech101/256).

Caltech-101 unpacks to ``101_ObjectCategories/<class>/image_NNNN.jpg``: 101 object classes and
``BACKGROUND_Google``, random Google images that are not an object class.  Caltech-256 unpacks to
``256_ObjectCategories/NNN.<name>/NNN_MMMM.jpg``: 256 object classes and ``257.clutter``.  Neither has an
official split (the publishers suggest drawing a fixed number of training images per class, repeatedly), so
featx makes its stratified ``--split``.

Clutter policy: ``BACKGROUND_Google`` is left out, as torchvision.datasets.Caltech101 does ("not a real class"),
and so is ``257.clutter``, which Griffin et al. introduce for background rejection, not as an object category:
the benchmarks are the 101 and the 256 object categories.  Both are reported unused with their image counts.
``Faces`` and ``Faces_easy`` are both kept (torchvision keeps both; they are the same photos cropped
differently, which inflates accuracy a little; a user can leave one out by passing a CSV).  Only images
directly in a class folder are read, as torchvision does; anything else there is reported unused.
"""
from __future__ import annotations

import re
from pathlib import Path

from featx.datasets.base import (
    ImageDataset,
    is_image_name,
    rel,
    sorted_items,
    unused_file,
    unused_folder,
    visible_dirs,
    visible_files,
)
from featx.datasets.folder import check_classes
from featx.datasets.splits import stratified
from featx.errors import DataError

CALTECH101 = "caltech101"
CALTECH256 = "caltech256"
FOLDERS_101 = ("caltech101", "caltech-101")
FOLDERS_256 = ("caltech256", "caltech-256")
_CATEGORIES = {CALTECH101: "101_ObjectCategories", CALTECH256: "256_ObjectCategories"}
_CLUTTER = {CALTECH101: "BACKGROUND_Google", CALTECH256: "257.clutter"}
_TITLE = {CALTECH101: "Caltech-101", CALTECH256: "Caltech-256"}
_NUMBERED = re.compile(r"^\d{3}\.")


def _categories(folder: Path, which: str) -> Path | None:
    """The ``NNN_ObjectCategories`` folder: DATA itself, or the one inside DATA."""
    cats = _CATEGORIES[which]
    if (folder / cats).is_dir():
        return folder / cats
    if folder.name == cats or (folder / _CLUTTER[which]).is_dir():
        return folder
    return None


def detect_101(folder: Path) -> bool:
    return _categories(folder, CALTECH101) is not None


def detect_256(folder: Path) -> bool:
    return _categories(folder, CALTECH256) is not None


def _read(root: Path, which: str, *, fractions: dict[str, float], seed: int, data: str) -> ImageDataset:
    title = _TITLE[which]
    cats = _categories(root, which)
    if cats is None:
        raise DataError(f"{str(data)!r} is not {title}: expected {_CATEGORIES[which]}/ (one folder per class) in it; "
                        f"unpack the publisher's archive there")
    unused: list[dict] = []
    per_class: dict[str, list[str]] = {}
    for d in visible_dirs(cats):
        if d.name == _CLUTTER[which]:
            unused.append(unused_folder(root, d, "clutter/background images, not an object class"))
            continue
        files = []
        for p in visible_files(d):
            if is_image_name(p.name):
                files.append(rel(p, root))
            else:
                unused.append(unused_file(root, p, "not an image file"))
        for sub in visible_dirs(d):
            unused.append(unused_folder(root, sub, "a folder inside a class folder (the publisher's images are "
                                                   "directly in it)"))
        if files:
            per_class[d.name] = files
        else:
            unused.append(unused_folder(root, d, "a folder without images"))
    if which == CALTECH256:
        odd = [c for c in per_class if not _NUMBERED.match(c)]
        if odd:
            raise DataError(f"{title}: class folder {odd[0]!r} in {str(cats)!r} is not named NNN.<name> as the "
                            f"publisher names them: is this {title}? Force --layout class-folders otherwise")
    classes = sorted(per_class)
    check_classes(classes, data)
    rows = sorted((p, i) for i, c in enumerate(classes) for p in per_class[c])
    splits = stratified([lab for _, lab in rows], fractions, seed)
    items = sorted_items([(p, lab, s) for (p, lab), s in zip(rows, splits)])
    names = tuple(c.split(".", 1)[1] if which == CALTECH256 else c for c in classes)
    return ImageDataset(root, tuple(classes), items, which, fractions, seed, data, class_names=names,
                        unused=tuple(unused),
                        report={"dataset": title, "official_split": None,
                                "split": "no official split: featx's stratified --split",
                                "clutter": f"{_CLUTTER[which]} left out (not an object class)"})


def read_101(root: Path, *, fractions: dict[str, float], seed: int, data: str) -> ImageDataset:
    """Caltech-101's 101 object classes with featx's stratified split (see the module docstring)."""
    return _read(root, CALTECH101, fractions=fractions, seed=seed, data=data)


def read_256(root: Path, *, fractions: dict[str, float], seed: int, data: str) -> ImageDataset:
    """Caltech-256's 256 object classes with featx's stratified split (see the module docstring)."""
    return _read(root, CALTECH256, fractions=fractions, seed=seed, data=data)
