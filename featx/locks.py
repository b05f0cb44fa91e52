"""One process at a time builds a cache entry: :func:`hold` takes an exclusive lock on a lock file with
:func:`fcntl.flock`.

The kernel releases such a lock when its process ends in any way, ``kill -9`` included, so a lock is never left
stale: the lock file itself may stay behind, and holds nothing.  A second process that wants the same entry logs
once ``waiting for another featx (pid N) building <what>`` on stderr, waits, and then, holding the lock, checks
again whether the work is already done (the caller's finished marker: a sealed manifest, a head's metadata, ...)
so that it is never done twice.

Only writers lock: reading a finished entry never takes a lock, so a read-only cache can be read.  Lock files are
``.lock`` in the entry's own directory (``featx gc`` leaves an entry alone while one is held) or, for work that
has no directory of its own, ``<cache>/locks/<name>.lock``.  A lock is re-entrant within one process.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from featx import interrupt

__all__ = ["LOCK_NAME", "hold", "holder", "is_held", "lock_file"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
POLL_S = 0.2  # how often a waiting process tries again (and looks for a stop request)

_held: dict[str, list[int]] = {}  # lock file -> [fd, depth] for the locks this process holds
_guard = threading.Lock()


def lock_file(path: str | os.PathLike) -> Path:
    """The lock file of ``path``: ``path`` itself when it ends in ``.lock``, else ``path/.lock``."""
    p = Path(path)
    return p if p.name.endswith(".lock") else p / LOCK_NAME


def holder(path: str | os.PathLike) -> int | None:
    """The pid recorded in the lock file of ``path`` by the process that last took it, or None."""
    try:
        text = lock_file(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def is_held(path: str | os.PathLike) -> bool:
    """Whether another process holds the lock of ``path`` now (a lock file that cannot be opened counts as held:
    whoever asks should leave the entry alone).  Writes nothing."""
    lf = lock_file(path)
    if str(lf.absolute()) in _held:
        return True
    try:
        fd = os.open(lf, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


@contextmanager
def hold(path: str | os.PathLike, *, what: str) -> Iterator[bool]:
    """Hold the lock of ``path`` (a directory, or a ``*.lock`` file) for the body; yields whether it had to wait
    for another process (whose work the caller should now find done).

    Raises:
        ReadOnlyCacheError, DiskFullError: the lock file cannot be made.
        Interrupted: a stop was requested while waiting.
    """
    from featx.cache import writing

    lf = lock_file(path)
    key = str(lf.absolute())
    with _guard:
        mine = _held.get(key)
        if mine is not None:
            mine[1] += 1
    if mine is not None:
        try:
            yield False
        finally:
            with _guard:
                mine[1] -= 1
        return
    with writing(lf, action=f"build {what}"):
        lf.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lf, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        waited = _acquire(fd, lf, what)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # the pid is only for the message of a process that waits
            pass
        with _guard:
            _held[key] = [fd, 1]
        try:
            yield waited
        finally:
            with _guard:
                del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, lf: Path, what: str) -> bool:
    """Take the lock on ``fd``, waiting (and saying so once) while another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        pass
    pid = holder(lf)
    logger.warning("waiting for another featx (pid %s) building %s", pid if pid is not None else "unknown", what)
    while True:
        interrupt.raise_if_requested()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(POLL_S)
