"""The dataset model every reader produces: :class:`Item`, :class:`ImageDataset`, and content fingerprints.

Every image becomes an :class:`Item` whose ``path`` is relative to the data root with forward slashes: that is
the row identity that travels into every feature set, head and prediction.
"""
from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    """One image: its path relative to the data root (forward slashes), class index and split."""

    path: str
    label: int
    split: str


@dataclass(frozen=True)
class ImageDataset:
    """The images of a DATA argument, in a fixed order (sorted by path), with classes and splits resolved.

    ``classes`` are the names the publisher uses (folder names, WordNet ids, ...), ``class_names`` their
    readable form where the publisher gives one (Tiny ImageNet's words.txt; empty: same as ``classes``).
    ``unused`` says what the reader saw on disk and did not use, one dict per file or folder:
    ``{"path", "reason"[, "files"]}`` (``files``: how many image files a folder entry stands for).
    ``report`` is the reader's account of what it did (official split, lists read, policies), for the manifest.
    """

    root: Path
    classes: tuple[str, ...]
    items: tuple[Item, ...]
    layout: str  # one of featx.datasets.layouts.LAYOUTS
    split: dict[str, float] | None = None  # the stratified split made by featx, None when the data had splits
    seed: int = 0
    source: str = ""  # DATA as given (the CSV file, or the folder)
    ignored: tuple[str, ...] = field(default=())  # top-level entries that are not classes
    class_names: tuple[str, ...] = field(default=())
    unused: tuple[dict, ...] = field(default=())
    report: dict = field(default_factory=dict)

    def abspath(self, item: Item) -> Path:
        return self.root / item.path

    def counts(self) -> dict[str, int]:
        """Number of items per split."""
        out: dict[str, int] = {}
        for it in self.items:
            out[it.split] = out.get(it.split, 0) + 1
        return {s: out[s] for s in SPLITS if s in out}

    def describe(self) -> dict:
        """What the manifest records about how the data was read: layout, class names, split, what was left out."""
        return {"layout": self.layout, "classes": list(self.classes),
                "class_names": list(self.class_names or self.classes), "counts": self.counts(),
                "split": "made by featx (--split)" if self.split is not None else "the data's own",
                "unused": [dict(u) for u in self.unused]
                + [{"path": p, "reason": "outside the class folders, or a folder without images"}
                   for p in self.ignored],
                "report": dict(self.report)}


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the image extensions featx reads."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def walk_images(top: Path) -> list[Path]:
    """Image files below ``top`` (recursively, hidden entries skipped, links to files kept even if dangling)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and is_image_name(name):
                found.append(Path(dirpath) / name)
    return found


def rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with forward slashes: an item's identity."""
    return path.relative_to(root).as_posix()


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


# ------------------------------------------------------------------------------------ helpers of the readers

def unused_folder(root: Path, folder: Path, reason: str) -> dict:
    """An ``unused`` entry for a whole folder: its path, why, and how many image files it holds."""
    return {"path": rel(folder, root), "reason": reason, "files": len(walk_images(folder))}


def unused_file(root: Path, path: Path, reason: str) -> dict:
    """An ``unused`` entry for one file."""
    return {"path": rel(path, root), "reason": reason}


def take_listed(root: Path, path: str, listed: set[str], missing: list[dict], **where) -> bool:
    """Whether a file an official list names becomes a row: not when listed before, nor when it is not on disk
    (then it is recorded in ``missing`` with ``where`` it was listed)."""
    if path in listed:
        return False
    listed.add(path)
    if not (root / path).exists():
        missing.append({"path": path, **where})
        return False
    return True


def visible_files(folder: Path) -> list[Path]:
    """The files directly in ``folder`` (hidden ones skipped), sorted."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())


def visible_dirs(folder: Path) -> list[Path]:
    """The folders directly in ``folder`` (hidden ones skipped), sorted."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())


def sorted_items(rows: list[tuple[str, int, str]]) -> tuple[Item, ...]:
    """Items from ``(path, label, split)`` rows, in path order (the order every feature set keeps)."""
    return tuple(Item(p, lab, s) for p, lab, s in sorted(rows))


def read_mat(path: Path, keys: tuple[str, ...], *, layout: str) -> dict:
    """The variables ``keys`` of a MATLAB file, read with scipy.io.loadmat.

    Raises:
        DataError: the file is missing, unreadable, or lacks one of ``keys`` (naming the file and the key).
    """
    from featx.errors import DataError

    try:
        import scipy.io
    except ImportError:  # scipy comes with scikit-learn, so this is a broken installation
        raise DataError(f"reading {path.name} ({layout}) needs scipy: pip install scipy") from None
    if not path.is_file():
        raise DataError(f"{layout}: {str(path)!r} is missing")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError... on a damaged file
        raise DataError(f"{layout}: cannot read {str(path)!r} as a MATLAB file ({type(e).__name__}: {e})") from None
    if "" in mat:  # a variable without a name: a damaged file that scipy before 1.16 reads instead of refusing
        raise DataError(f"{layout}: cannot read {str(path)!r} as a MATLAB file (a variable without a name)")
    missing = [k for k in keys if k not in mat]
    if missing:
        have = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{layout}: {str(path)!r} has no variable {missing[0]!r} (it has {have})")
    return {k: mat[k] for k in keys}


def mat_strings(arr) -> list[str]:
    """The strings of a MATLAB cell array (any shape) or char matrix, in MATLAB's order (column-major)."""
    import numpy as np

    a = np.asarray(arr)
    if a.dtype.kind in "US":  # a char matrix: one string per row
        return [str(s).strip() for s in a.ravel()]
    out = []
    for v in a.ravel(order="F"):
        v = np.asarray(v)
        out.append(str(v.ravel()[0]) if v.size else "")
    return out


def mat_ints(arr) -> list[int]:
    """The numbers of a MATLAB vector (any orientation) as Python ints."""
    import numpy as np

    a = np.asarray(arr).ravel(order="F")
    if a.dtype.kind not in "iuf" or (a.dtype.kind == "f" and not np.all(np.isfinite(a))):
        raise ValueError(f"expected numbers, found dtype {a.dtype}")
    return [int(x) for x in a]
