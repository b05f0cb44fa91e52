"""Tiny ImageNet (tiny-imagenet-200.zip, http://cs231n.stanford.edu/tiny-imagenet-200.zip), as published.

The folder holds ``wnids.txt`` (the 200 WordNet ids, one a line: the classes, in that order), ``words.txt``
(``wnid<TAB>words`` for all of WordNet), ``train/<wnid>/images/<wnid>_<n>.JPEG`` (500 a class, beside
``<wnid>_boxes.txt``), ``val/images/val_<n>.JPEG`` labelled by ``val/val_annotations.txt``
(``file<TAB>wnid<TAB>box``), and ``test/images/`` whose labels were never published.

featx keeps the wnids as class names (their words from words.txt as display names, in the manifest), reads
train as train and the labelled val images as held-out ``test`` rows (they are the set every Tiny ImageNet
result is reported on; featx's ``test`` is what heads are measured on), and leaves the unlabelled test folder
out, reported unused.  A train folder whose wnid is not in wnids.txt, and val images the annotations do not
name, are reported unused; a wnid without a train folder, or annotations naming an unknown wnid, are errors.
"""
from __future__ import annotations

import logging
from pathlib import Path

from featx.datasets import base
from featx.datasets.folder import check_classes
from featx.errors import DataError

logger = logging.getLogger(__name__)

NAME = "tiny-imagenet"
TITLE = "Tiny ImageNet"
FOLDERS = ("tiny-imagenet-200",)


def detect(folder: Path) -> bool:
    """``wnids.txt`` beside ``train/`` (the publisher's own files)."""
    return (folder / "wnids.txt").is_file() and (folder / "train").is_dir()


def _lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{TITLE}: {str(path)!r} is missing ({what}): the folder is incomplete; unpack "
                        f"tiny-imagenet-200.zip again")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{TITLE}: cannot read {str(path)!r} ({what}): {e}") from None


def read(root: Path, *, fractions: dict[str, float], seed: int, data: str) -> base.ImageDataset:
    """Read Tiny ImageNet's train and labelled val images (see the module docstring).

    Raises:
        DataError: wnids.txt or val/val_annotations.txt missing or unreadable, a wnid without train images,
            annotations naming a wnid not in wnids.txt.
    """
    wnids = [w.strip() for w in _lines(root / "wnids.txt", "the class list") if w.strip()]
    if len(set(wnids)) != len(wnids):
        raise DataError(f"{TITLE}: {str(root / 'wnids.txt')!r} lists a wnid twice")
    index = {w: i for i, w in enumerate(wnids)}
    words: dict[str, str] = {}
    if (root / "words.txt").exists():
        for line in _lines(root / "words.txt", "the words of each wnid"):
            w, _, text = line.partition("\t")
            if w.strip() in index:
                words[w.strip()] = text.strip()
    else:
        logger.warning("%s: words.txt is missing; the classes keep their wnids only", TITLE)
    rows: list[tuple[str, int, str]] = []
    unused: list[dict] = []
    missing: list[dict] = []
    train = root / "train"
    absent = [w for w in wnids if not (train / w).is_dir()]
    if absent:
        raise DataError(f"{TITLE}: {len(absent)} wnid(s) of wnids.txt have no folder in train/ (first: "
                        f"train/{absent[0]}): the folder is incomplete; unpack tiny-imagenet-200.zip again")
    for d in base.visible_dirs(train):
        if d.name not in index:
            unused.append(base.unused_folder(root, d, "a train folder whose wnid is not in wnids.txt"))
            continue
        imgs = d / "images" if (d / "images").is_dir() else d
        rows += [(base.rel(p, root), index[d.name], "train") for p in base.walk_images(imgs)]
    val = root / "val"
    n_val = 0
    if val.is_dir():
        ann = val / "val_annotations.txt"
        named: set[str] = set()
        for n, line in enumerate(_lines(ann, "the labels of the val images"), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                raise DataError(f"{TITLE}: {str(ann)!r} line {n}: expected 'file<TAB>wnid<TAB>box', got {line[:80]!r}")
            name, wnid = parts[0].strip(), parts[1].strip()
            if wnid not in index:
                raise DataError(f"{TITLE}: {str(ann)!r} line {n}: wnid {wnid!r} is not in wnids.txt")
            named.add(name)
            path = f"val/images/{name}"
            if not (root / path).exists():
                missing.append({"path": path, "list": "val/val_annotations.txt", "line": n})
                continue
            rows.append((path, index[wnid], "test"))
            n_val += 1
        if (val / "images").is_dir():
            unused += [base.unused_file(root, p, "not named in val/val_annotations.txt")
                       for p in base.visible_files(val / "images")
                       if p.name not in named and base.is_image_name(p.name)]
    else:
        logger.warning("%s: no val/ folder: there are no held-out rows (use --layout split-folders or a CSV to "
                       "choose your own)", TITLE)
    if (root / "test").is_dir():
        why = "the test images are unlabelled (labels never published)"
        unused.append(base.unused_folder(root, root / "test", why))
    check_classes(wnids, data)
    if missing:
        logger.warning("%s: %d annotated val image(s) are not on disk (reported in the manifest), e.g. %s",
                       TITLE, len(missing), missing[0]["path"])
    report = {"dataset": TITLE, "official_split": {"train/": "train", "val/ (labelled)": "test"},
              "words": {w: words.get(w, "") for w in wnids}, "missing": missing, "held_out": n_val}
    return base.ImageDataset(root, tuple(wnids), base.sorted_items(rows), NAME, None, seed, data,
                             class_names=tuple(words.get(w, w) for w in wnids), unused=tuple(unused), report=report)
