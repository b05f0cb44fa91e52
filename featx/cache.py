"""The cache: where every stage's output lives, keyed by the hash of everything that produced it.

Writes are atomic (temporary file in the same directory, then :func:`os.replace`), so a reader never sees a
half-written file; a process killed mid-write leaves only a ``.tmp-*`` file that the next run ignores.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_VAR = "FEATX_CACHE"
KEY_LENGTH = 20  # hex digits of sha256: 80 bits, far beyond any cache's number of entries


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache`` if given, else ``$FEATX_CACHE``, else ``./cache``."""
    if cache is None:
        cache = os.environ.get(ENV_VAR) or "cache"
    return Path(cache).expanduser().absolute()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same value always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_key(obj: Any) -> str:
    """Cache key of a JSON-able value (sha256 of its canonical JSON, shortened)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:KEY_LENGTH]


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode())


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path`` (same filesystem, so ``os.replace`` is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def read_json(path: str | os.PathLike) -> Any | None:
    """A JSON file's value, or ``None`` when it is missing or unreadable (a cache miss, never a crash)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@dataclass
class StagePlan:
    """What a stage called with ``plan=True`` would produce, computed without running it: the directory of its
    output, whether that output is already complete in the cache, and what the stage learnt on the way (e.g. the
    data's layout and split counts).  ``featx run --dry-run`` is built on these."""

    path: Path
    cached: bool
    info: dict[str, Any] = field(default_factory=dict)
