"""Stanford Dogs (http://vision.stanford.edu/aditya86/ImageNetDogs/: images.tar, annotation.tar, lists.tar).

Unpacked, the folder holds ``Images/<wnid>-<breed>/<wnid>_<n>.jpg`` (120 breeds), ``Annotation/`` (bounding
boxes, not needed) and, from lists.tar, the MATLAB files ``file_list.mat`` (every image), ``train_list.mat``
and ``test_list.mat`` (the official split: 100 training images a breed, the rest test), each with a cell array
``file_list`` of paths relative to ``Images/`` and ``labels`` (1..120).  featx reads the two split lists
(train -> train, test -> test); the classes are the breed folders (``n02085620-Chihuahua``) in label order, with
the breed (``Chihuahua``) as display name.  Images on disk in neither list are reported unused, listed images
missing on disk are reported (not fatal); a list that cannot be read, or whose labels disagree with the folders,
is an error naming the file.  The lists may be in the folder itself or in ``lists/``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from featx.datasets import base
from featx.datasets.folder import check_classes
from featx.errors import DataError

logger = logging.getLogger(__name__)

NAME = "stanford-dogs"
TITLE = "Stanford Dogs"
FOLDERS = ("stanford-dogs", "StanfordDogs", "stanford_dogs")
LISTS = (("train_list.mat", "train"), ("test_list.mat", "test"))


def detect(folder: Path) -> bool:
    """``Images/`` holding ``n<8 digits>-<breed>`` folders, or the lists beside it."""
    images = folder / "Images"
    if not images.is_dir():
        return False
    if any((folder / d / n).is_file() for d in ("", "lists") for n in ("train_list.mat", "test_list.mat")):
        return True
    return any(p.is_dir() and p.name[:1] == "n" and p.name[1:9].isdigit() and p.name[9:10] == "-"
               for p in images.iterdir())


def _list_dir(root: Path) -> Path:
    return root / "lists" if (root / "lists" / "train_list.mat").is_file() else root


def read(root: Path, *, fractions: dict[str, float], seed: int, data: str) -> base.ImageDataset:
    """Read Stanford Dogs' official train/test lists (see the module docstring).

    Raises:
        DataError: a list missing (the layout is incomplete) or unreadable, labels disagreeing with folders.
    """
    lists = _list_dir(root)
    for name, _ in LISTS:
        if not (lists / name).is_file():
            raise DataError(f"{str(data)!r} looks like {TITLE} (Images/<wnid>-<breed>/) but {name} is missing: "
                            f"unpack lists.tar from http://vision.stanford.edu/aditya86/ImageNetDogs/ into it, "
                            f"or give {str(Path(data) / 'Images')!r} with --layout class-folders")
    rows: list[tuple[str, str, str]] = []  # (path, class folder, split)
    folder_of: dict[int, str] = {}
    missing: list[dict] = []
    listed: set[str] = set()
    for name, split in LISTS:
        mat = base.read_mat(lists / name, ("file_list", "labels"), layout=TITLE)
        try:
            files, labels = base.mat_strings(mat["file_list"]), base.mat_ints(mat["labels"])
        except (ValueError, TypeError, IndexError) as e:
            raise DataError(f"{TITLE}: cannot read the file_list/labels of {str(lists / name)!r}: {e}") from None
        if len(files) != len(labels):
            raise DataError(f"{TITLE}: {str(lists / name)!r} has {len(files)} files but {len(labels)} labels")
        for k, (f, lab) in enumerate(zip(files, labels), 1):
            f = f.replace("\\", "/").lstrip("/")
            folder = f.split("/")[0]
            if folder_of.setdefault(lab, folder) != folder:
                raise DataError(f"{TITLE}: {str(lists / name)!r} entry {k}: label {lab} is given to both "
                                f"{folder_of[lab]!r} and {folder!r}")
            path = f"Images/{f}"
            if base.take_listed(root, path, listed, missing, list=name, entry=k):
                rows.append((path, folder, split))
    labs = sorted(folder_of)
    classes = [folder_of[lab] for lab in labs]
    if len(set(classes)) != len(classes):
        raise DataError(f"{TITLE}: the lists give one breed folder two labels ({classes})")
    check_classes(classes, data)
    index = {c: i for i, c in enumerate(classes)}
    unused = [base.unused_file(root, p, "in neither train_list.mat nor test_list.mat")
              for p in base.walk_images(root / "Images") if base.rel(p, root) not in listed]
    if missing:
        logger.warning("%s: %d listed image(s) are not on disk (reported in the manifest), e.g. %s",
                       TITLE, len(missing), missing[0]["path"])
    items = base.sorted_items([(p, index[c], s) for p, c, s in rows])
    names = tuple(c.split("-", 1)[-1].replace("_", " ") for c in classes)
    report = {"dataset": TITLE, "official_split": {"train_list.mat": "train", "test_list.mat": "test"},
              "lists": base.rel(lists, root) or ".", "missing": missing,
              "not_used": "Annotation/ (bounding boxes) and file_list.mat (the union of the lists)"}
    return base.ImageDataset(root, tuple(classes), items, NAME, None, seed, data, class_names=names,
                             unused=tuple(unused), report=report)
