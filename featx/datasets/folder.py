"""The generic layouts: class folders, split folders, and a CSV file.

* class folders: ``DATA/<class>/**/<image>``;
* split folders: ``DATA/{train,test[,val]}/<class>/**/<image>``;
* a CSV file with columns ``path,label[,split]``, paths relative to the CSV's folder.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

from featx.datasets.base import IMAGE_EXTENSIONS, SPLITS, ImageDataset, Item
from featx.datasets.base import is_image_name as _is_image_name
from featx.datasets.base import rel as _rel
from featx.datasets.base import walk_images as _walk_images
from featx.datasets.splits import stratified as _stratified
from featx.errors import DataError

logger = logging.getLogger(__name__)


def check_classes(classes: list[str], data: str, *, csv_file: bool = False) -> None:
    if not classes and csv_file:
        raise DataError(f"CSV {data!r} lists no images: expected rows path,label[,split] under its header")
    if not classes:
        raise DataError(f"no images found in {data!r}: expected one subfolder per class holding images "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if len(classes) < 2:
        raise DataError(f"only one class ({classes[0]!r}) in {data!r}: a classifier needs at least two")


def _from_class_folders(root: Path, subdirs: list[Path], fractions: dict[str, float], seed: int,
                        data: str) -> ImageDataset:
    per_class = {d.name: _walk_images(d) for d in subdirs}
    empty = [c for c, files in per_class.items() if not files]
    for c in empty:
        logger.warning("ignoring folder %r: it holds no images", c)
    classes = [c for c in sorted(per_class) if per_class[c]]
    loose = [p.name for p in root.iterdir() if p.is_file() and _is_image_name(p.name)]
    if loose:
        logger.warning("ignoring %d image(s) directly in %s: images must be inside a class folder", len(loose), root)
    check_classes(classes, data)
    rows = sorted((_rel(p, root), i) for i, c in enumerate(classes) for p in per_class[c])
    splits = _stratified([lab for _, lab in rows], fractions, seed)
    items = tuple(Item(path, lab, s) for (path, lab), s in zip(rows, splits))
    return ImageDataset(root, tuple(classes), items, "class-folders", fractions, seed, data, tuple(empty + loose))


def _from_split_folders(root: Path, subdirs: list[Path], fractions: dict[str, float], seed: int,
                        data: str) -> ImageDataset:
    others = [d.name for d in subdirs if d.name not in SPLITS]
    if others:
        logger.warning("ignoring top-level folder(s) %s: DATA has split folders train/ and test/", others)
    found: list[tuple[str, str, str]] = []  # (path, class, split)
    for s in SPLITS:
        sdir = root / s
        if not sdir.is_dir():
            continue
        for cdir in sorted(p for p in sdir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for p in _walk_images(cdir):
                found.append((_rel(p, root), cdir.name, s))
    classes = sorted({c for _, c, _ in found})
    check_classes(classes, data)
    index = {c: i for i, c in enumerate(classes)}
    items = tuple(Item(p, index[c], s) for p, c, s in sorted(found))
    if not any(it.split == "test" for it in items):
        raise DataError(f"{data!r} has a test/ folder but no test images in class folders under it")
    logger.info("using the split folders of %s (--split is not applied)", data)
    return ImageDataset(root, tuple(classes), items, "split-folders", None, seed, data, tuple(others))


def _from_csv(path: Path, fractions: dict[str, float], seed: int) -> ImageDataset:
    root = path.absolute().parent
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = [h.strip().lower() for h in (reader.fieldnames or [])]
            if "path" not in fields or "label" not in fields:
                raise DataError(f"CSV {str(path)!r} needs a header with columns path,label[,split]; it has {fields}")
            # reader.line_num is the file's line number, which counting rows is not: the reader skips blank lines
            rows = [(reader.line_num, {k.strip().lower(): (v or "").strip() for k, v in r.items() if k is not None})
                    for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read CSV {str(path)!r}: {e}") from None
    rows = [(n, r) for n, r in rows if any(r.values())]  # a line of empty fields (",,") is padding, not a row
    has_split = "split" in fields and any(r.get("split") for _, r in rows)
    seen: set[str] = set()
    clean = []
    for n, r in rows:
        if not r.get("path"):  # dropping it silently would lose an image the user listed
            raise DataError(f"CSV {str(path)!r} line {n}: empty path")
        p = Path(r["path"])
        rel = p.as_posix() if not p.is_absolute() else (_rel(p, root) if p.is_relative_to(root) else p.as_posix())
        if rel in seen:
            raise DataError(f"CSV {str(path)!r} line {n}: path {rel!r} is listed twice")
        seen.add(rel)
        if not r["label"]:
            raise DataError(f"CSV {str(path)!r} line {n}: empty label")
        s = r.get("split", "").lower() if has_split else ""
        if has_split and not s:
            raise DataError(f"CSV {str(path)!r} line {n}: empty split; fill the split column on every row "
                            f"(train, val or test) or leave it empty on all of them")
        if has_split and s not in SPLITS:
            raise DataError(f"CSV {str(path)!r} line {n}: split {r.get('split')!r} is not one of train, val, test")
        clean.append((rel, r["label"], s))
    classes = sorted({c for _, c, _ in clean})
    check_classes(classes, str(path), csv_file=True)
    if has_split:
        logger.info("using the split column of %s (--split is not applied)", path)
    index = {c: i for i, c in enumerate(classes)}
    clean.sort()
    labels = [index[c] for _, c, _ in clean]
    splits = [s for _, _, s in clean] if has_split else _stratified(labels, fractions, seed)
    items = tuple(Item(p, lab, s) for (p, _, _), lab, s in zip(clean, labels, splits))
    return ImageDataset(root, tuple(classes), items, "csv", None if has_split else fractions, seed, str(path))
