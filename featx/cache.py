"""The cache: where every stage's output lives, keyed by the hash of everything that produced it.

Writes are atomic (temporary file in the same directory, then :func:`os.replace`), so a reader never sees a
half-written file; a process killed mid-write leaves only a ``.tmp-*`` file that the next run ignores.

A write that finds the disk full (``ENOSPC``, ``EDQUOT``) removes its temporary file and raises
:class:`~featx.errors.DiskFullError` (exit code 75) naming the path and about how much more space it needs; one
that finds the cache read-only raises :class:`~featx.errors.ReadOnlyCacheError` (exit code 73).  :func:`writing`
turns the ``OSError`` of any write site into these.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featx import interrupt

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


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20, stoppable: bool = False) -> str:
    """Hex sha256 of a file's content, read in chunks (constant memory); ``stoppable``: a stop request (SIGTERM,
    Ctrl-C) raises between chunks, for inputs of gigabytes (never for files being saved)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if stoppable:
                interrupt.raise_if_requested()
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- failed writes

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
# how libraries that do not keep the errno (HDF5, SQLite through SQLAlchemy) say it
_DISK_FULL_WORDS = ("no space left on device", "disk quota exceeded", "database or disk is full")
_READ_ONLY_WORDS = ("read-only file system", "attempt to write a readonly database")


def is_disk_full(e: BaseException) -> bool:
    """Whether ``e`` (or the error it was raised from) says the disk is full or the quota reached."""
    seen = 0
    cur: BaseException | None = e
    while cur is not None and seen < 5:
        if isinstance(cur, OSError) and cur.errno in DISK_FULL_ERRNOS:
            return True
        if any(w in str(cur).lower() for w in _DISK_FULL_WORDS):
            return True
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return False


def is_read_only(e: BaseException) -> bool:
    """Whether ``e`` says the file or its file system cannot be written."""
    if isinstance(e, OSError) and e.errno in READ_ONLY_ERRNOS:
        return True
    return any(w in str(e).lower() for w in _READ_ONLY_WORDS)


def _existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free for an unprivileged writer on the file system that holds ``path`` (or would hold it)."""
    return int(shutil.disk_usage(_existing(Path(path))).free)


def human_bytes(n: float) -> str:
    """``310 MB``, ``1.2 GB``, ``12 kB``: a size for a message."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n < 10 * size else f"{n / size:.0f} {unit}"
    return f"{int(n)} bytes"


def disk_full_error(path: str | os.PathLike, more: int | None = None):
    """The :class:`~featx.errors.DiskFullError` for a write of ``path`` that needs ``more`` bytes than are free."""
    from featx.errors import DiskFullError

    need = f" (needs about {human_bytes(max(more, 1))} more)" if more else ""
    return DiskFullError(f"no space left on {Path(path).absolute()}{need}; free space and run the same command: "
                         f"finished work is kept")


def read_only_error(path: str | os.PathLike, action: str | None = None):
    """The :class:`~featx.errors.ReadOnlyCacheError` for a write of ``path`` that cannot be made."""
    from featx.errors import ReadOnlyCacheError

    top = _existing(Path(path))
    while top != top.parent and not os.access(top.parent, os.W_OK):
        top = top.parent
    if top == top.parent:
        top = _existing(Path(path))
    return ReadOnlyCacheError(f"the cache {top} is read-only; {action or 'this command'} needs to write "
                              f"{Path(path).absolute()}: give a writable --cache (reading it needs no write)")


def ensure_space(path: str | os.PathLike, needs: int) -> None:
    """Raise :class:`~featx.errors.DiskFullError` before writing ``needs`` bytes at ``path`` when fewer are free."""
    free = free_bytes(path)
    if needs > free:
        raise disk_full_error(path, needs - free)


@contextmanager
def writing(path: str | os.PathLike, *, needs: int | None = None, action: str | None = None) -> Iterator[None]:
    """Turn a full disk met by the body into :class:`~featx.errors.DiskFullError` and a read-only cache into
    :class:`~featx.errors.ReadOnlyCacheError`, both naming ``path``; other errors pass unchanged."""
    from featx.errors import FeatxError

    try:
        yield
    except FeatxError:
        raise
    except Exception as e:
        if is_disk_full(e):
            more = None
            if needs:
                try:
                    more = max(needs - free_bytes(path), needs // 10, 1)
                except OSError:
                    more = needs
            raise disk_full_error(path, more) from None
        if isinstance(e, OSError) and is_read_only(e):
            raise read_only_error(path, action) from None
        raise


def write_out(f, data: bytes) -> None:
    """The one place where featx writes bytes to a file it keeps (:func:`atomic_write_bytes`, a study's journal):
    all of ``data`` (an unbuffered file may take it in parts), flushed, then synced to disk."""
    view = memoryview(data)
    while view:
        n = f.write(view)
        if not n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]
    f.flush()
    os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    Raises:
        DiskFullError, ReadOnlyCacheError: the write could not be made; nothing of it is left.
    """
    path = Path(path)
    with writing(path, needs=len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write_out(f, data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_json(path: str | os.PathLike, obj: Any, *, seal: bool = False) -> None:
    """Atomically write ``obj`` as indented JSON; ``seal``: with a ``digest`` field (see :func:`sealed`)."""
    if seal:
        obj = sealed(obj)
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode())


# ------------------------------------------------------------------------------------------- sealed JSON
# A sealed JSON object carries DIGEST_FIELD = "sha256:<hex>" of the canonical JSON of everything else in it, so
# an edited or torn file is told apart from a good one (a truncated file no longer parses at all).

DIGEST_FIELD = "digest"


def _digest(body: dict) -> str:
    # the digest is taken over the value as it reads back from JSON, so that tuples, numpy scalars and the like
    # hash the same when written and when read
    plain = json.loads(json.dumps(body, ensure_ascii=False, default=str))
    return "sha256:" + hashlib.sha256(canonical_json(plain).encode()).hexdigest()


def sealed(obj: dict) -> dict:
    """``obj`` with a ``digest`` field over the rest of it."""
    body = {k: v for k, v in obj.items() if k != DIGEST_FIELD}
    return {**body, DIGEST_FIELD: _digest(body)}


def seal_ok(obj: Any) -> bool | None:
    """True: the digest matches; False: it does not (edited or damaged); None: no digest (written before seals)."""
    if not isinstance(obj, dict) or DIGEST_FIELD not in obj:
        return None
    return obj[DIGEST_FIELD] == _digest({k: v for k, v in obj.items() if k != DIGEST_FIELD})


def read_sealed_json(path: str | os.PathLike, *, what: str = "", fix: str = "") -> dict | None:
    """A JSON object checked against its digest; None when the file does not exist.

    Raises:
        IntegrityError: the file exists but does not parse (truncated, torn), is not an object, or its content
            differs from its digest (edited, damaged); the message names the file and ``fix``.
    """
    from featx.errors import IntegrityError

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise IntegrityError(f"{what or path.name} {path} cannot be read ({e.strerror or e}){_fix(fix)}") from None
    try:
        obj = json.loads(raw)
    except ValueError:
        raise IntegrityError(f"{what or path.name} {path} is damaged (not complete JSON: truncated or torn)"
                             f"{_fix(fix)}") from None
    if not isinstance(obj, dict) or seal_ok(obj) is False:
        raise IntegrityError(f"{what or path.name} {path} is damaged or was edited (its content differs from its "
                             f"digest){_fix(fix)}")
    return obj


def _fix(fix: str) -> str:
    return f": {fix}" if fix else ""


COMMAND_FILE = "command.json"


def write_command(directory: str | os.PathLike, argv: list[str]) -> None:
    """Record in ``directory/command.json`` the command that makes (and so repairs) this cache entry."""
    import shlex

    atomic_write_json(Path(directory) / COMMAND_FILE, {"argv": list(argv), "command": shlex.join(argv)})


def repair_hint(directory: str | os.PathLike, *, verb: str = "make it again") -> str:
    """``run `featx ...` to <verb>``, from the entry's ``command.json``; a general hint when it has none."""
    rec = read_json(Path(directory) / COMMAND_FILE)
    if isinstance(rec, dict) and isinstance(rec.get("command"), str):
        return f"run `{rec['command']}` to {verb}"
    return f"run the featx command that made {Path(directory).name} again to {verb}"


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path`` (same filesystem, so ``os.replace`` is atomic)."""
    path = Path(path)
    with writing(path):
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
