"""Kaggle's Dogs vs. Cats (https://www.kaggle.com/c/dogs-vs-cats, and the later "Redux" edition).

The competition's train.zip unpacks to ``train/cat.<n>.jpg`` and ``train/dog.<n>.jpg`` (12,500 each): the label
is the file name's first part.  test1.zip (``test/`` in the Redux edition) holds ``<n>.jpg`` without labels:
featx leaves it out, reported unused, as it does files in ``train/`` not named ``<label>.<n>.<ext>``.  There is
no official split of the labelled images, so featx makes its stratified ``--split``.  DATA may be the folder
holding ``train/`` or ``train/`` itself.
"""
from __future__ import annotations

import re
from pathlib import Path

from featx.datasets import base
from featx.datasets.folder import check_classes
from featx.datasets.splits import stratified

NAME = "dogs-vs-cats"
TITLE = "Kaggle Dogs vs. Cats"
FOLDERS = ("dogs-vs-cats", "dogs-vs-cats-redux-kernels-edition")
_LABELLED = re.compile(r"^(cat|dog)\.\d+\.[A-Za-z]+$", re.IGNORECASE)
UNLABELLED = ("test1", "test")


def _images_dir(folder: Path) -> Path | None:
    """Where the ``cat.N.jpg`` files are: ``train/`` inside DATA, or DATA itself."""
    for d in (folder / "train", folder):
        if d.is_dir() and any(_LABELLED.match(p.name) for p in d.iterdir()):
            return d
    return None


def detect(folder: Path) -> bool:
    """``cat.<n>.jpg``/``dog.<n>.jpg`` files, in ``train/`` or in DATA, and no class subfolders beside them."""
    d = _images_dir(folder)
    return d is not None and not any(p.name.lower() in ("cat", "dog") for p in base.visible_dirs(d))


def read(root: Path, *, fractions: dict[str, float], seed: int, data: str) -> base.ImageDataset:
    """The labelled images, labels from their names, with featx's stratified split (see the module docstring)."""
    images = _images_dir(root) or root / "train"
    rows: list[tuple[str, str]] = []
    unused: list[dict] = []
    for p in base.visible_files(images) if images.is_dir() else []:
        m = _LABELLED.match(p.name)
        if m and base.is_image_name(p.name):
            rows.append((base.rel(p, root), m.group(1).lower()))
        else:
            unused.append(base.unused_file(root, p, "not named <cat|dog>.<n>.<ext>: no label"))
    for d in base.visible_dirs(root) if images != root else []:
        if d.name in UNLABELLED:
            unused.append(base.unused_folder(root, d, "the competition's test images are unlabelled"))
    classes = sorted({c for _, c in rows})
    check_classes(classes, data)
    index = {c: i for i, c in enumerate(classes)}
    rows.sort()
    splits = stratified([index[c] for _, c in rows], fractions, seed)
    items = base.sorted_items([(p, index[c], s) for (p, c), s in zip(rows, splits)])
    return base.ImageDataset(root, tuple(classes), items, NAME, fractions, seed, data, unused=tuple(unused),
                             report={"dataset": TITLE, "official_split": None,
                                     "split": "no official split: featx's stratified --split",
                                     "labels": "from the file names <cat|dog>.<n>.jpg"})
