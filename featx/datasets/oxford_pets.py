"""Oxford-IIIT Pet, as published at https://www.robots.ox.ac.uk/~vgg/data/pets/ (images.tar.gz, annotations.tar.gz).

Unpacked, the folder holds ``images/<Breed>_<n>.jpg`` and ``annotations/`` with ``list.txt`` (all labelled
images, under six ``#`` header lines), ``trainval.txt`` and ``test.txt`` (the official split, same columns:
``Image CLASS-ID SPECIES BREED-ID``), plus trimaps and xmls featx does not need.  Rows are the images the two
split lists name (``trainval`` -> train, ``test`` -> test); classes are the 37 breeds in CLASS-ID order, named as
the publisher names them (the image-name prefix: ``Abyssinian``, ``american_bulldog``; cats capitalised), with
torchvision's readable form (``American Bulldog``) as display names.  Images in ``images/`` that no list names
(the publisher ships some) and non-image files there are reported unused; a listed image missing on disk is
reported, not fatal.  This follows torchvision.datasets.OxfordIIITPet, which reads the same two lists.
"""
from __future__ import annotations

import logging
from pathlib import Path

from featx.datasets.base import ImageDataset, is_image_name, sorted_items, unused_file, visible_files
from featx.datasets.folder import check_classes
from featx.errors import DataError

logger = logging.getLogger(__name__)

NAME = "oxford-pets"
TITLE = "Oxford-IIIT Pet"
FOLDERS = ("oxford-iiit-pet",)  # torchvision's folder name under its root
LISTS = (("trainval.txt", "train"), ("test.txt", "test"))


def detect(folder: Path) -> bool:
    """``images/`` beside ``annotations/`` holding one of the publisher's lists (or its trimaps/xmls)."""
    ann = folder / "annotations"
    return (folder / "images").is_dir() and ann.is_dir() and any(
        (ann / n).exists() for n in ("list.txt", "trainval.txt", "test.txt", "trimaps", "xmls"))


def _read_list(path: Path) -> list[tuple[str, int, int]]:
    """``(image id, CLASS-ID, line number)`` of a list file; ``#`` lines are the header (list.txt has six)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{TITLE}: cannot read {str(path)!r}: {e}") from None
    out = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise DataError(f"{TITLE}: {str(path)!r} line {n}: expected 'Image CLASS-ID SPECIES BREED-ID', "
                            f"got {line[:80]!r}")
        out.append((parts[0], int(parts[1]), n))
    return out


def display_name(breed: str) -> str:
    """torchvision's readable class name: ``american_pit_bull_terrier`` -> ``American Pit Bull Terrier``."""
    return " ".join(part.title() for part in breed.split("_"))


def read(root: Path, *, fractions: dict[str, float], seed: int, data: str) -> ImageDataset:
    """Read the official trainval/test split of an Oxford-IIIT Pet folder (see the module docstring).

    Raises:
        DataError: a split list is missing or malformed, or gives one breed two CLASS-IDs.
    """
    ann, images = root / "annotations", root / "images"
    for name, _ in LISTS:
        if not (ann / name).is_file():
            raise DataError(f"{str(data)!r} looks like {TITLE} (images/ and annotations/) but annotations/{name} "
                            f"is missing: unpack annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/ "
                            f"into it, or force another layout with --layout class-folders")
    if not images.is_dir():
        raise DataError(f"{TITLE}: {str(images)!r} is missing: unpack images.tar.gz into {str(root)!r}")
    rows: list[tuple[str, int, str]] = []
    breed_of: dict[int, str] = {}
    missing: list[dict] = []
    listed: set[str] = set()
    for name, split in LISTS:
        for image_id, cid, n in _read_list(ann / name):
            breed = image_id.rsplit("_", 1)[0]
            if breed_of.setdefault(cid, breed) != breed:
                raise DataError(f"{TITLE}: annotations/{name} line {n}: CLASS-ID {cid} is given to both "
                                f"{breed_of[cid]!r} and {breed!r}")
            path = f"images/{image_id}.jpg"
            if path in listed:
                continue  # the publisher's lists do not overlap; a repeat would add a duplicate row
            listed.add(path)
            if not (root / path).exists():
                missing.append({"path": path, "list": f"annotations/{name}", "line": n})
                continue
            rows.append((path, cid, split))
    ids = sorted(breed_of)
    classes = [breed_of[c] for c in ids]
    check_classes(classes, data)
    index = {cid: i for i, cid in enumerate(ids)}
    items = sorted_items([(p, index[cid], s) for p, cid, s in rows])
    unused = [unused_file(root, p, "in no split list (trainval.txt, test.txt)" if is_image_name(p.name)
                          else "not an image file") for p in visible_files(images) if f"images/{p.name}" not in listed]
    if missing:
        logger.warning("%s: %d listed image(s) are not on disk (reported in the manifest), e.g. %s",
                       TITLE, len(missing), missing[0]["path"])
    return ImageDataset(root, tuple(classes), items, NAME, None, seed, data,
                        class_names=tuple(display_name(c) for c in classes), unused=tuple(unused),
                        report={"dataset": TITLE, "official_split": {"trainval.txt": "train", "test.txt": "test"},
                                "class_ids": ids, "missing": missing,
                                "not_used": "annotations/ trimaps, xmls and list.txt (a union of the two lists)"})
