"""Finding images and their labels, splitting them, fingerprinting them, and decoding them safely.

Three layouts are understood (see :func:`discover`):

* class folders: ``DATA/<class>/**/<image>``;
* split folders: ``DATA/{train,test[,val]}/<class>/**/<image>``;
* a CSV file with columns ``path,label[,split]``, paths relative to the CSV's folder.

Every image becomes an :class:`Item` whose ``path`` is relative to the data root with forward slashes: that is
the row identity that travels into every feature set, head and prediction.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
import stat
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from featx.errors import DataError, UsageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
SPLITS = ("train", "val", "test")
# Pillow's own default: an image above this many pixels is treated as a decompression bomb and skipped.
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass(frozen=True)
class Item:
    """One image: its path relative to the data root (forward slashes), class index and split."""

    path: str
    label: int
    split: str


@dataclass(frozen=True)
class ImageDataset:
    """The images of a DATA argument, in a fixed order (sorted by path), with classes and splits resolved."""

    root: Path
    classes: tuple[str, ...]
    items: tuple[Item, ...]
    layout: str  # "class-folders" | "split-folders" | "csv"
    split: dict[str, float] | None = None  # the stratified split made by featx, None when the data had splits
    seed: int = 0
    source: str = ""  # DATA as given (the CSV file, or the folder)
    ignored: tuple[str, ...] = field(default=())  # top-level entries that are not classes

    def abspath(self, item: Item) -> Path:
        return self.root / item.path

    def counts(self) -> dict[str, int]:
        """Number of items per split."""
        out: dict[str, int] = {}
        for it in self.items:
            out[it.split] = out.get(it.split, 0) + 1
        return {s: out[s] for s in SPLITS if s in out}


def parse_split(spec: str | None) -> dict[str, float]:
    """Parse ``--split`` (``"test=0.15"`` or ``"test=0.15,val=0.1"``) into fractions.

    Raises:
        UsageError: on unknown or repeated names, fractions outside (0, 1), or fractions summing to 1 or more.
    """
    if spec is None or not str(spec).strip():
        return {"test": 0.15}
    out: dict[str, float] = {}
    for part in str(spec).split(","):
        name, sep, value = part.strip().partition("=")
        name = name.strip()
        if not sep or name not in ("test", "val"):
            raise UsageError(f"bad --split {spec!r}: expected test=FRACTION[,val=FRACTION], e.g. test=0.15,val=0.1")
        try:
            frac = float(value)
        except ValueError:
            raise UsageError(f"bad --split {spec!r}: {value!r} is not a number") from None
        if not 0.0 < frac < 1.0:
            raise UsageError(f"bad --split {spec!r}: each fraction must be between 0 and 1 (exclusive)")
        if name in out:  # "test=0.1,test=0.3" is a typo, not a request for 0.3
            raise UsageError(f"bad --split {spec!r}: {name} is given twice")
        out[name] = frac
    if sum(out.values()) >= 1.0:
        raise UsageError(f"bad --split {spec!r}: the fractions leave no training rows")
    return out


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(top: Path) -> list[Path]:
    """Image files below ``top`` (recursively, hidden entries skipped, links to files kept even if dangling)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and _is_image_name(name):
                found.append(Path(dirpath) / name)
    return found


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _stratified(labels: list[int], fractions: dict[str, float], seed: int) -> list[str]:
    """Assign each row a split, per class, reproducibly: the same labels and seed give the same split.

    Each class gives ``round(fraction * n)`` rows to each requested split, but at least one as long as it keeps
    one training row: otherwise small classes (5 images at ``test=0.1``) would give the split none at all, and
    a requested split could come out empty.
    """
    out = ["train"] * len(labels)
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    # SeedSequence takes only non-negative integers; map a negative --seed onto one (its 64-bit two's
    # complement) rather than crash, leaving every non-negative seed's split as it was.
    seed = seed % (1 << 64) if seed < 0 else seed
    for lab, idx in sorted(by_class.items()):
        rng = np.random.default_rng([seed, lab])
        order = [idx[j] for j in rng.permutation(len(idx))]
        n = len(order)
        start = 0
        for name in ("test", "val"):
            if fractions.get(name, 0.0) <= 0.0:
                continue
            k = max(1, int(round(fractions[name] * n)))
            k = min(k, n - start - 1)  # every class keeps at least one training row
            for j in order[start:start + max(k, 0)]:
                out[j] = name
            start += max(k, 0)
    return out


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


def _check_classes(classes: list[str], data: str, *, csv_file: bool = False) -> None:
    if not classes and csv_file:
        raise DataError(f"CSV {data!r} lists no images: expected rows path,label[,split] under its header")
    if not classes:
        raise DataError(f"no images found in {data!r}: expected one subfolder per class holding images "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if len(classes) < 2:
        raise DataError(f"only one class ({classes[0]!r}) in {data!r}: a classifier needs at least two")


def _from_class_folders(root: Path, subdirs: list[Path], fractions: dict[str, float], seed: int, data: str) -> ImageDataset:
    per_class = {d.name: _walk_images(d) for d in subdirs}
    empty = [c for c, files in per_class.items() if not files]
    for c in empty:
        logger.warning("ignoring folder %r: it holds no images", c)
    classes = [c for c in sorted(per_class) if per_class[c]]
    loose = [p.name for p in root.iterdir() if p.is_file() and _is_image_name(p.name)]
    if loose:
        logger.warning("ignoring %d image(s) directly in %s: images must be inside a class folder", len(loose), root)
    _check_classes(classes, data)
    rows = sorted((_rel(p, root), i) for i, c in enumerate(classes) for p in per_class[c])
    splits = _stratified([lab for _, lab in rows], fractions, seed)
    items = tuple(Item(path, lab, s) for (path, lab), s in zip(rows, splits))
    return ImageDataset(root, tuple(classes), items, "class-folders", fractions, seed, data, tuple(empty + loose))


def _from_split_folders(root: Path, subdirs: list[Path], fractions: dict[str, float], seed: int, data: str) -> ImageDataset:
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
    _check_classes(classes, data)
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
    _check_classes(classes, str(path), csv_file=True)
    if has_split:
        logger.info("using the split column of %s (--split is not applied)", path)
    index = {c: i for i, c in enumerate(classes)}
    clean.sort()
    labels = [index[c] for _, c, _ in clean]
    splits = [s for _, _, s in clean] if has_split else _stratified(labels, fractions, seed)
    items = tuple(Item(p, lab, s) for (p, _, _), lab, s in zip(clean, labels, splits))
    return ImageDataset(root, tuple(classes), items, "csv", None if has_split else fractions, seed, str(path))


# ----------------------------------------------------------------------------------------------- fingerprints

def fingerprint_file(path: Path) -> tuple[int | None, str]:
    """(size, sha256) of a file; (None, "error:<reason>") when it cannot be read, so the key still changes
    when it is fixed."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            # a FIFO or a link to /dev/zero named like an image: reading it would never end
            return None, "error:NotRegularFile"
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                size += len(block)
                h.update(block)
        return size, h.hexdigest()
    except OSError as e:
        return None, f"error:{type(e).__name__}"


def fingerprints_of(root: Path, paths: list[str], *, threads: int = 4) -> list[tuple[str, int | None, str]]:
    """``(path, size, sha256)`` for paths relative to ``root``, hashed on a few threads."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        sums = list(pool.map(fingerprint_file, [root / p for p in paths], chunksize=32))
    return [(p, size, digest) for p, (size, digest) in zip(paths, sums)]


def fingerprints(ds: ImageDataset, *, threads: int = 4) -> list[tuple[str, int | None, str]]:
    """``(path, size, sha256)`` for every item, hashed on a few threads (hashlib releases the GIL)."""
    return fingerprints_of(ds.root, [it.path for it in ds.items], threads=threads)


# ---------------------------------------------------------------------------------------------------- decoding

class BadImage(Exception):
    """An input file that cannot be used as an image; ``str()`` is the reason recorded in ``skipped``."""


def _to_8bit_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB, scaling high-bit-depth images instead of clipping them to white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im).astype(np.float64)
        # Mode "I" is how Pillow opens 16-bit PGM/PPM (and, in older releases, 16-bit PNG): values on the 0..65535
        # scale, like "I;16".  Judging the scale by the brightest pixel instead made a dark 16-bit image (all
        # values <= 255) come out 257 times too bright.  Only true 32-bit data is scaled by its own maximum.
        hi = float(arr.max(initial=0))
        top = 65535.0 if im.mode.startswith("I;16") or hi <= 65535.0 else hi
        im = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow's documented route for palette images with transparency
    return im if im.mode == "RGB" else im.convert("RGB")


_PILLOW_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pixel_limit(max_pixels: int | None):
    """Make ``max_pixels`` the limit that counts, also when it is above Pillow's own (or None: no limit).

    Pillow checks its global ``Image.MAX_IMAGE_PIXELS`` inside ``Image.open``, before we see the size, so
    without this a caller's higher limit could never admit an image above Pillow's default.  The global is
    lifted only in that case, under a lock (so that concurrent calls restore it in order), and restored after;
    a limit at or below Pillow's needs nothing, since :func:`open_rgb` checks it itself.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is None or (max_pixels is not None and max_pixels <= current):
        yield
        return
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_file(p: Path) -> None:
    """Reject what is not a non-empty regular file, with the reason, before any decoder sees it."""
    try:
        st = p.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise BadImage("dangling symbolic link" if p.is_symlink() else "missing file") from None
    except PermissionError:
        raise
    except OSError:  # ELOOP: a link that leads back to itself leads nowhere either
        if p.is_symlink():
            raise BadImage("dangling symbolic link") from None
        raise
    if stat.S_ISDIR(st.st_mode):
        raise BadImage("is a directory")
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the decoder; a link to /dev/zero would never end
        raise BadImage("not a regular file (a pipe, socket or device)")
    if st.st_size == 0:
        raise BadImage("empty file")


def _quiet_bomb_warnings() -> None:
    """Silence Pillow's DecompressionBombWarning: :func:`open_rgb` judges every image's size against its own
    limit and reports the file as skipped, so the warning would only repeat that on stderr.  A process-wide
    filter, added once (and again if someone resets the filters), because ``warnings.catch_warnings`` is not
    thread-safe and images are decoded on several threads at once."""
    if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning for f in warnings.filters):
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def open_rgb(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file to an RGB Pillow image, EXIF orientation applied (first frame of an animation).

    Args:
        path: the file.
        max_pixels: width x height above which the file is skipped as a decompression bomb, before its pixels
            are decoded; None for no limit.  This is the limit that applies, above or below Pillow's own.

    Raises:
        BadImage: with a short reason (empty, not an image, truncated, decompression bomb, dangling link, ...).
    """
    p = Path(path)
    try:
        # Everything that touches the file is inside the try: even lstat() raises PermissionError in a folder
        # we may not search, and that must cost one file, not the caller.
        _check_file(p)
        _quiet_bomb_warnings()
        with _pixel_limit(max_pixels):
            with Image.open(p) as im:
                if max_pixels is not None and im.width * im.height > max_pixels:
                    raise BadImage(f"decompression bomb: {im.width}x{im.height} pixels is over the limit of {max_pixels}")
                im.load()
                im = ImageOps.exif_transpose(im) or im
                return _to_8bit_rgb(im)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (Pillow cannot identify it)") from None
    except PermissionError as e:
        raise BadImage(f"unreadable: {e.strerror}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow signals corrupt data with all of these
        msg = str(e) or type(e).__name__
        raise BadImage(f"truncated or corrupt: {msg}") from None
    except MemoryError:
        raise BadImage("too large to decode in memory") from None


# A truncated file must be reported, not silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
