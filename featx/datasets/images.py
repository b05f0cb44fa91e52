"""Decoding images safely: any Pillow mode to 8-bit RGB, EXIF orientation, and every bad file a reason.

A file that cannot be used raises :class:`BadImage` with a short reason (empty, not an image, truncated,
decompression bomb, dangling link, ...), which the stages record as skipped instead of stopping.
"""
from __future__ import annotations

import contextlib
import os
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Pillow's own default: an image above this many pixels is treated as a decompression bomb and skipped.
DEFAULT_MAX_PIXELS = 89_478_485


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
            with Image.open(p) as opened:
                if max_pixels is not None and opened.width * opened.height > max_pixels:
                    raise BadImage(f"decompression bomb: {opened.width}x{opened.height} pixels is over the limit "
                                   f"of {max_pixels}")
                opened.load()
                return _to_8bit_rgb(ImageOps.exif_transpose(opened) or opened)
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
