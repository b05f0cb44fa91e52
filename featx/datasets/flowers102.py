"""Oxford Flowers-102 (https://www.robots.ox.ac.uk/~vgg/data/flowers/102/: 102flowers.tgz, imagelabels.mat,
setid.mat), as torchvision.datasets.Flowers102 reads it.

The folder holds ``jpg/image_NNNNN.jpg`` (8,189 images), ``imagelabels.mat`` (``labels``: the class, 1..102, of
image i at position i) and ``setid.mat`` (``trnid``, ``valid``, ``tstid``: the image numbers of the official
split, 10 train and 10 val images a class, the remaining 6,149 test).  featx reads the split as published
(trnid -> train, valid -> val, tstid -> test).  The archive names the classes by number only, so the class
names are the publisher's labels ``"1"`` .. ``"102"``, in that order.  Images in no split are reported unused;
images a split names but the folder lacks are reported, not fatal; a .mat file that cannot be read, or that
labels fewer images than the split names, is an error naming the file.
"""
from __future__ import annotations

import logging
from pathlib import Path

from featx.datasets.base import (
    ImageDataset,
    is_image_name,
    mat_ints,
    read_mat,
    sorted_items,
    take_listed,
    unused_file,
    visible_files,
)
from featx.datasets.folder import check_classes
from featx.errors import DataError

logger = logging.getLogger(__name__)

NAME = "flowers102"
TITLE = "Oxford Flowers-102"
FOLDERS = ("flowers-102", "flowers102", "102flowers")
SPLIT_KEYS = (("trnid", "train"), ("valid", "val"), ("tstid", "test"))


def detect(folder: Path) -> bool:
    """``jpg/`` beside ``setid.mat`` or ``imagelabels.mat``, or ``jpg/image_00001.jpg``."""
    return (folder / "jpg").is_dir() and ((folder / "setid.mat").exists() or (folder / "imagelabels.mat").exists()
                                         or (folder / "jpg" / "image_00001.jpg").exists())


def read(root: Path, *, fractions: dict[str, float], seed: int, data: str) -> ImageDataset:
    """Read Flowers-102's official train/val/test split (see the module docstring).

    Raises:
        DataError: imagelabels.mat or setid.mat missing or unreadable, or a split naming an unlabelled image.
    """
    for name in ("imagelabels.mat", "setid.mat"):
        if not (root / name).is_file():
            raise DataError(f"{str(data)!r} looks like {TITLE} (jpg/) but {name} is missing: download it from "
                            f"https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ into the folder")
    try:
        labels = mat_ints(read_mat(root / "imagelabels.mat", ("labels",), layout=TITLE)["labels"])
        sets = read_mat(root / "setid.mat", tuple(k for k, _ in SPLIT_KEYS), layout=TITLE)
        ids = {k: mat_ints(sets[k]) for k, _ in SPLIT_KEYS}
    except (ValueError, TypeError) as e:
        raise DataError(f"{TITLE}: imagelabels.mat or setid.mat does not hold numbers: {e}") from None
    rows: list[tuple[str, int, str]] = []
    missing: list[dict] = []
    listed: set[str] = set()
    for key, split in SPLIT_KEYS:
        for i in ids[key]:
            if not 1 <= i <= len(labels):
                raise DataError(f"{TITLE}: setid.mat {key} names image {i}, but imagelabels.mat labels images "
                                f"1..{len(labels)}")
            path = f"jpg/image_{i:05d}.jpg"
            if take_listed(root, path, listed, missing, list=f"setid.mat {key}"):
                rows.append((path, labels[i - 1], split))
    numbers = sorted({lab for _, lab, _ in rows})
    classes = [str(n) for n in numbers]
    check_classes(classes, data)
    index = {n: k for k, n in enumerate(numbers)}
    unused = [unused_file(root, p, "in no split of setid.mat" if is_image_name(p.name) else "not an image file")
              for p in visible_files(root / "jpg") if f"jpg/{p.name}" not in listed]
    if missing:
        logger.warning("%s: %d image(s) named by setid.mat are not on disk (reported in the manifest), e.g. %s",
                       TITLE, len(missing), missing[0]["path"])
    return ImageDataset(root, tuple(classes), sorted_items([(p, index[lab], s) for p, lab, s in rows]), NAME,
                        None, seed, data, unused=tuple(unused),
                        report={"dataset": TITLE, "official_split": dict(SPLIT_KEYS), "missing": missing,
                                "class_names": "the publisher's labels 1..102 (the archive has no names)"})
