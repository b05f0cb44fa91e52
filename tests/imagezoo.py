"""A small image folder holding every awkward-but-valid and every broken kind of file featx must handle.

:func:`make_zoo` writes, below a root folder, two class folders (``china/`` and ``flower/``) whose files are
real image content (crops of scikit-learn's two sample photos, and its handwritten digits) saved in every
format and mode the data contract names, next to files that must be skipped (empty, not an image,
truncated, corrupt, a decompression bomb, a dangling link) and files that are not images at all (text, hidden
files, an image directly in the root).  The returned :class:`Zoo` says, for each relative path, what a correct
decoder must produce (the expected RGB pixels, and how close a lossy format may come) or why it must be
skipped, so that tests of :func:`featx.datasets.open_rgb` and of whole extractions can check every file, not
just count them.

Only Pillow and numpy write the files; scikit-learn's bundled images are read from its package folder
(importing ``sklearn.datasets`` costs seconds) with its public loaders as the fallback.
"""
from __future__ import annotations

import functools
import importlib.util
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["BadKind", "Zoo", "ZooImage", "make_zoo", "EMPTY", "NOT_IMAGE", "CORRUPT", "BOMB", "DANGLING",
           "UNREADABLE", "BOMB_PIXELS"]

# Reason categories of the files that must be skipped: each is how featx's ``BadImage`` reason begins.
EMPTY = "empty file"
NOT_IMAGE = "not an image"
CORRUPT = "truncated or corrupt"
BOMB = "decompression bomb"
DANGLING = "dangling symbolic link"
UNREADABLE = "unreadable"

# The bomb is a 10000x10000 bilevel PNG: 100 M pixels, over Pillow's (and featx's) default limit of
# 89,478,485, yet ~12 kB on disk and ~0.3 s to write because a mode "1" image packs 8 pixels a byte.
BOMB_SIZE = (10_000, 10_000)
BOMB_PIXELS = BOMB_SIZE[0] * BOMB_SIZE[1]

CLASSES = ("china", "flower")


@dataclass(frozen=True)
class ZooImage:
    """A valid file: what it is, and the RGB pixels (H x W x 3 uint8) a correct decoder returns for it.

    ``tolerance`` is the largest mean absolute difference (0-255 scale) allowed between the decoded pixels and
    ``expected``: 0 for lossless formats, a few levels for JPEG and lossy conversions.
    """

    kind: str
    expected: np.ndarray = field(repr=False)
    tolerance: float = 0.0

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as Pillow reports it, after EXIF orientation."""
        return int(self.expected.shape[1]), int(self.expected.shape[0])


@dataclass(frozen=True)
class BadKind:
    """A file that must be skipped: what it is and the reason category (one of the constants above)."""

    kind: str
    reason: str


@dataclass
class Zoo:
    """What :func:`make_zoo` wrote.  All paths are relative to ``root``, with forward slashes.

    ``valid`` and ``bad`` together are exactly the files featx must list as rows (both are inside class folders
    and end in an image extension); ``ignored`` are files it must not list at all.
    """

    root: Path
    classes: tuple[str, ...]
    valid: dict[str, ZooImage] = field(default_factory=dict)
    bad: dict[str, BadKind] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list[str]:
        """Every path that discovery must list (valid and bad), sorted."""
        return sorted([*self.valid, *self.bad])

    def label_of(self, rel: str) -> str:
        """The class of a listed path: its first folder."""
        return rel.split("/", 1)[0]

    def of_kind(self, kind: str) -> str:
        """The path of the (first) valid or bad file of a kind, e.g. ``zoo.of_kind("exif-rotated")``."""
        kinds = {**{rel: z.kind for rel, z in self.valid.items()}, **{rel: b.kind for rel, b in self.bad.items()}}
        for rel in sorted(kinds):
            if kinds[rel] == kind:
                return rel
        raise KeyError(kind)


# ---------------------------------------------------------------------------------------------- content

def _sklearn_folder() -> Path | None:
    """Where scikit-learn is installed (None when it cannot say)."""
    spec = importlib.util.find_spec("sklearn")
    places = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(places[0]) if places else None


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's two sample photos (china, flower), 427 x 640 x 3 uint8 each."""
    folder = _sklearn_folder()
    try:
        if folder is None:
            raise OSError("scikit-learn's folder is unknown")
        return tuple(np.asarray(Image.open(folder / "datasets" / "images" / f"{n}.jpg").convert("RGB"))
                     for n in ("china", "flower"))
    except (OSError, TypeError):  # a layout we don't know: the public loader (slow import, same pictures)
        from sklearn.datasets import load_sample_images

        return tuple(load_sample_images().images)


@functools.lru_cache(maxsize=1)
def _digits() -> np.ndarray:
    """scikit-learn's handwritten digits, 1797 x 8 x 8 uint8 in 0..255 (the originals are 0..16)."""
    folder = _sklearn_folder()
    try:
        if folder is None:
            raise OSError("scikit-learn's folder is unknown")
        path = folder / "datasets" / "data" / "digits.csv.gz"
        flat = np.loadtxt(path, delimiter=",")[:, :64]
        images = flat.reshape(-1, 8, 8)
    except (OSError, TypeError, ValueError):
        from sklearn.datasets import load_digits

        images = load_digits().images
    return np.clip(images * 16, 0, 255).astype(np.uint8)


def _crop(photo: np.ndarray, rng: np.random.Generator, h: int, w: int, step: int = 2) -> np.ndarray:
    """A random h x w crop of a photo subsampled by ``step`` (contiguous, so Pillow can wrap it)."""
    small = photo[::step, ::step]
    y = int(rng.integers(0, small.shape[0] - h + 1))
    x = int(rng.integers(0, small.shape[1] - w + 1))
    return np.ascontiguousarray(small[y:y + h, x:x + w])


def _digit(rng: np.random.Generator, scale: int = 4) -> np.ndarray:
    """One digit blown up to (8*scale) x (8*scale) grey pixels (nearest neighbour, so still exact)."""
    d = _digits()[int(rng.integers(0, len(_digits())))]
    return np.kron(d, np.ones((scale, scale), dtype=np.uint8))


def _grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _palette_image(rgb: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Our own palette quantization (n colours picked from the image, nearest colour per pixel), so that the
    expected RGB is known without asking Pillow: returns (indices H x W uint8, palette n x 3 uint8)."""
    flat = rgb.reshape(-1, 3).astype(np.int32)
    palette = flat[np.linspace(0, len(flat) - 1, n).astype(int)]
    palette[0] = (255, 0, 255)  # a colour absent from photos, for the transparent entry
    dist = ((flat[:, None, :] - palette[None, :, :]) ** 2).sum(-1)
    idx = dist.argmin(1).astype(np.uint8)
    idx[: rgb.shape[1]] = 0  # the whole first row uses the transparent entry
    return idx.reshape(rgb.shape[:2]), palette.astype(np.uint8)


def _pil_palette(idx: np.ndarray, palette: np.ndarray) -> Image.Image:
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.reshape(-1).tolist())
    return im


def _png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _corrupt_png(rgb: np.ndarray, rng: np.random.Generator) -> bytes:
    """A PNG whose compressed pixel data is overwritten with noise: complete, right length, but undecodable."""
    data = bytearray(_png_bytes(Image.fromarray(rgb)))
    start = data.index(b"IDAT") + 4 + 2  # past the chunk type and the 2-byte zlib header
    data[start:start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    return bytes(data)


# ---------------------------------------------------------------------------------------------- the zoo

def make_zoo(root: Path, *, seed: int = 0) -> Zoo:
    """Write the zoo below ``root`` (created if needed) and describe it.

    Every valid file is inside a class folder, so ``root`` is a usable class-folder DATA argument: listing it
    gives exactly ``zoo.rows``.  An unreadable file (mode 000) is only made when not running as root, since
    root reads it anyway; the ``bad`` map says whether it was made.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    china, flower = _photos()
    zoo = Zoo(root=root, classes=CLASSES)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)

    def valid(rel: str, kind: str, expected: np.ndarray, tolerance: float = 0.0) -> Path:
        zoo.valid[rel] = ZooImage(kind, expected.astype(np.uint8), tolerance)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def bad(rel: str, kind: str, reason: str, content: bytes | None) -> Path:
        zoo.bad[rel] = BadKind(kind, reason)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is not None:
            path.write_bytes(content)
        return path

    def ignored(rel: str, content: bytes) -> None:
        zoo.ignored.append(rel)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)

    # -- ordinary files, one per class at least, so every class has clean rows
    a = _crop(china, rng, 48, 64)
    Image.fromarray(a).save(valid("china/plain.jpg", "jpeg", a, 4.0), quality=95)
    b = _crop(flower, rng, 48, 64)
    Image.fromarray(b).save(valid("flower/plain.jpg", "jpeg", b, 4.0), quality=95)

    # -- CMYK JPEG (Pillow writes Adobe-style inverted CMYK; a naive reader gets a negative)
    a = _crop(china, rng, 40, 48)
    Image.fromarray(a).convert("CMYK").save(valid("china/cmyk.jpg", "cmyk-jpeg", a, 6.0), quality=95)

    # -- EXIF orientation 6: stored 64 wide x 32 high, shown rotated 90 degrees clockwise (32 x 64).
    stored = _crop(flower, rng, 32, 64)
    stored[:8, :8] = (255, 0, 0)  # red at the stored top-left, which must end up top-right,
    stored[-8:, :8] = (0, 0, 255)  # and blue at the stored bottom-left, which must end up top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    shown = np.rot90(stored, k=-1)  # numpy's own clockwise rotation, not Pillow's, as the reference
    Image.fromarray(stored).save(valid("flower/exif rotated.jpg", "exif-rotated", shown, 5.0), quality=95,
                                 exif=exif.tobytes())

    # -- 16-bit grey PNG, TIFF and PGM: a ramp over the whole 0..65535 range; clipping would make it white
    ramp16 = (np.linspace(0, 65535, 64 * 32).reshape(32, 64)).astype(np.uint16)
    ramp8 = _grey3(np.round(ramp16 / 257.0))
    Image.fromarray(ramp16).save(valid("china/grey16.png", "png-16bit", ramp8, 0.6))
    Image.fromarray(ramp16).save(valid("flower/grey16.tif", "tiff-16bit", ramp8, 0.6))
    Image.fromarray(ramp16).save(valid("flower/grey16.pgm", "pgm-16bit", ramp8, 0.6))

    # -- palette PNG with per-entry transparency (tRNS holding several alpha values, i.e. bytes)
    idx, pal = _palette_image(_crop(china, rng, 24, 32), 8)
    _pil_palette(idx, pal).save(valid("china/palette transparent.png", "png-palette-trns", pal[idx]),
                                transparency=bytes([0, 128] + [255] * 6))
    # ... and a GIF whose palette has a transparent index (an int, the other form Pillow uses)
    idx, pal = _palette_image(_crop(flower, rng, 24, 32), 8)
    _pil_palette(idx, pal).save(valid("flower/transparent.gif", "gif-transparent", pal[idx]), transparency=0)

    # -- RGBA: the colour channels are kept, alpha dropped (alpha is a gradient, fully opaque at the bottom)
    a = _crop(flower, rng, 32, 32)
    alpha = np.linspace(0, 255, 32).astype(np.uint8)[:, None].repeat(32, 1)
    Image.fromarray(np.dstack([a, alpha])).save(valid("flower/rgba.png", "png-rgba", a))
    # ... and grey + alpha
    g = _digit(rng)
    Image.fromarray(np.dstack([g, 255 - g])).save(valid("china/grey alpha.png", "png-la", _grey3(g)))

    # -- 1 x 1, very wide, very tall
    px = np.array([[[12, 200, 34]]], dtype=np.uint8)
    Image.fromarray(px).save(valid("china/one pixel.png", "png-1x1", px))
    wide = np.ascontiguousarray(np.tile(_crop(china, rng, 20, 200), (1, 10, 1)))  # 2000 x 20
    Image.fromarray(wide).save(valid("china/wide.png", "png-2000x20", wide))
    tall = np.ascontiguousarray(np.tile(_crop(flower, rng, 100, 4), (10, 1, 1)))  # 4 x 1000
    Image.fromarray(tall).save(valid("flower/tall.jpg", "jpeg-4x1000", tall, 8.0), quality=95)

    # -- animated GIF: three frames of different pictures; only the first is the image
    frames_rgb = [_crop(china, rng, 24, 24, step=4) for _ in range(3)]
    idx0, pal = _palette_image(np.concatenate(frames_rgb, axis=1), 16)
    frames = [_pil_palette(np.ascontiguousarray(idx0[:, 24 * i:24 * (i + 1)]), pal) for i in range(3)]
    frames[0].save(valid("china/animated.gif", "gif-animated", pal[idx0[:, :24]]), save_all=True,
                   append_images=frames[1:], duration=100, loop=0, disposal=1)

    # -- WebP (lossless, so exact) and an RGB TIFF (LZW), in nested folders
    a = _crop(flower, rng, 40, 40)
    Image.fromarray(a).save(valid("flower/nested/webp/été 東京.webp", "webp", a), lossless=True)
    a = _crop(china, rng, 30, 50)
    Image.fromarray(a).save(valid("china/nested/deeper/photo.tif", "tiff", a), compression="tiff_lzw")
    a = _crop(china, rng, 16, 20)
    Image.fromarray(a).save(valid("china/nested/deeper/lossy.webp", "webp-lossy", a, 12.0), quality=90)

    # -- grey PGM, colour PPM, grey BMP (8-bit palette BMP), bilevel PNG
    g = _digit(rng)
    Image.fromarray(g).save(valid("china/digit.pgm", "pgm", _grey3(g)))
    a = _crop(flower, rng, 20, 28)
    Image.fromarray(a).save(valid("flower/colour.ppm", "ppm", a))
    g = _digit(rng)
    Image.fromarray(g).save(valid("flower/digit.bmp", "bmp-grey", _grey3(g)))
    bw = (_digit(rng) > 100)
    Image.fromarray(bw).save(valid("china/bilevel.png", "png-1bit", _grey3(bw.astype(np.uint8) * 255)))

    # -- names: spaces, non-ASCII, upper- and mixed-case extensions
    a = _crop(china, rng, 24, 24)
    Image.fromarray(a).save(valid("china/IMG 0001 ÜBER.JPG", "jpeg-upper", a, 5.0), "JPEG", quality=95)
    a = _crop(flower, rng, 24, 24)
    Image.fromarray(a).save(valid("flower/Ñandú.PNG", "png-upper", a), "PNG")
    a = _crop(flower, rng, 24, 24)
    Image.fromarray(a).save(valid("flower/mixed.JpEg", "jpeg-mixed-case", a, 5.0), "JPEG", quality=95)
    a = _crop(china, rng, 24, 24)
    Image.fromarray(a).save(valid("china/scan.TIFF", "tiff-upper", a), "TIFF")

    # -- a symbolic link to a valid image is an image too
    target = "plain.jpg"
    link = valid("china/link to plain.jpg", "symlink", zoo.valid["china/plain.jpg"].expected, 4.0)
    os.symlink(target, link)

    # -- files that must be skipped, each with the reason category featx must give
    bad("china/empty.jpg", "empty", EMPTY, b"")
    bad("flower/empty.png", "empty", EMPTY, b"")
    bad("china/text.jpg", "text-as-jpeg", NOT_IMAGE, b"this is a shopping list, not a JPEG\neggs\nmilk\n")
    bad("flower/noise.png", "random-bytes", NOT_IMAGE, rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    # an HTML error page saved under an image name, as scrapers produce
    bad("flower/download.webp", "html-as-webp", NOT_IMAGE, b"<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    full = _jpeg_bytes(Image.fromarray(_crop(china, rng, 64, 64)), quality=95)
    bad("china/truncated.jpg", "truncated-jpeg", CORRUPT, full[: len(full) // 2])
    full = _png_bytes(Image.fromarray(_crop(flower, rng, 64, 64)))
    bad("flower/truncated.png", "truncated-png", CORRUPT, full[: len(full) * 2 // 3])
    bad("flower/corrupt.png", "corrupt-png", CORRUPT, _corrupt_png(_crop(flower, rng, 32, 32), rng))
    bad("china/bomb.png", "decompression-bomb", BOMB, _png_bytes(Image.new("1", BOMB_SIZE)))
    os.symlink("no such file.jpg", bad("flower/dangling.jpg", "dangling-symlink", DANGLING, None))
    if os.geteuid() != 0:  # root can read a mode 000 file, so the case only exists for other users
        p = bad("china/unreadable.png", "unreadable", UNREADABLE, _png_bytes(Image.fromarray(_digit(rng))))
        p.chmod(0)

    # -- files that are not rows at all
    ignored("china/readme.txt", b"notes about the china pictures\n")
    ignored("china/photo.jpg.bak", _jpeg_bytes(Image.fromarray(_crop(china, rng, 16, 16))))
    ignored("flower/Thumbs.db", b"\0" * 64)
    ignored("flower/.hidden.jpg", _jpeg_bytes(Image.fromarray(_crop(flower, rng, 16, 16))))
    ignored("flower/.thumbnails/small.png", _png_bytes(Image.fromarray(_crop(flower, rng, 8, 8))))
    ignored("loose.png", _png_bytes(Image.fromarray(_crop(china, rng, 8, 8))))  # not inside a class folder
    return zoo
