"""Interrupts: Ctrl-C (SIGINT) and preemption (SIGTERM) end every command cleanly.

One policy, in one place.  The CLI runs every command inside :func:`handling`:

* the **first** SIGINT or SIGTERM only *requests* a stop: nothing is raised where the signal lands (which could be
  the middle of Optuna's bookkeeping, an HDF5 write or an optimizer step);
* every stage calls :func:`check` between its units of work (a batch, a fold, a trial, an epoch, a training step);
  the first ``check`` after the request raises :class:`Interrupted`, so the stage abandons or checkpoints the unit
  it is in and unwinds through its ``finally`` clauses, leaving nothing half-written or RUNNING; the CLI prints
  ``featx: interrupted (SIGTERM); finished work is kept and the same command resumes it`` and exits
  128 + the signal's number (130 for SIGINT, 143 for SIGTERM);
* a **second** signal stops at once (``KeyboardInterrupt`` where it lands); writes are atomic, so even then
  nothing in the cache is damaged.

Worker processes (``featx search --jobs N``) run inside ``handling(parent=flag)``: they ignore SIGINT (a terminal's
Ctrl-C reaches the whole process group; the parent decides), take a SIGTERM of their own as above, and also stop
when the parent's shared ``flag`` says so (see :func:`share_with_workers`).

Named stop points make tests independent of timing: with ``FEATX_STOP_AT="POINT[:N[:SIGNAL[:TIMES]]]"`` (several
comma-separated), the N-th (default 1st) ``check(POINT)`` of the process sends SIGNAL (SIGINT or SIGTERM, default
SIGINT; SIGKILL stands for ``kill -9``) TIMES times (default 1; 2 exercises the immediate stop) to the process
itself with :func:`os.kill`, so the real handler runs, exactly then.  ``POINT`` names are ``<stage>.<unit>``,
listed in docs/interrupts.md.

Example (a library loop)::

    from featx import interrupt

    for batch in batches:
        interrupt.check("mystage.batch")   # raises Interrupted once a stop was requested
        work(batch)
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator

from featx.errors import FeatxError

ENV_STOP_AT = "FEATX_STOP_AT"
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
_HOOK_SIGNALS = {**SIGNALS, "SIGKILL": signal.SIGKILL}  # the hook may also stand for kill -9, at a chosen point
MESSAGE = "interrupted ({signame}); finished work is kept and the same command resumes it"


class Interrupted(FeatxError):
    """A stop was requested by SIGINT or SIGTERM; raised by :func:`check` between units of work.

    Attributes:
        signame: ``"SIGINT"`` or ``"SIGTERM"``.
        exit_code: what the CLI exits with, 128 + the signal's number (130, 143).
        point: the stop point that noticed the request (e.g. ``"search.fold"``), or None.
    """

    def __init__(self, signame: str = "SIGINT", point: str | None = None):
        if signame not in SIGNALS:
            signame = "SIGINT"
        self.signame = signame
        self.point = point
        self.exit_code = 128 + int(SIGNALS[signame])
        super().__init__(MESSAGE.format(signame=signame))


class _State:
    """The process's stop request; only the main thread's signal handler and :func:`check` change it."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Back to a process that has received nothing (entering and leaving :func:`handling`)."""
        self.active = False  # inside handling()
        self.worker = False  # a worker process: SIGINT ignored, the parent's flag obeyed
        self.requested: str | None = None  # the first signal's name
        self.forced: str | None = None  # the second signal's name (the immediate stop)
        self.received = 0  # signals handled: lets the test hook wait for its own signal
        self.counts: dict[str, int] = {}  # check() calls per point, for FEATX_STOP_AT
        self.parent_flag = None  # in a worker: the parent's shared int (0, +signum: stop, -signum: at once)
        self.child_flags: list = []  # in a parent: the flags its workers read


_state = _State()


def _name(signum: int) -> str:
    return signal.Signals(abs(int(signum))).name


def stop_requested() -> str | None:
    """The name of the signal that asked this process (or its parent) to stop, or None."""
    if _state.requested is not None:
        return _state.requested
    flag = _state.parent_flag
    if flag is not None and flag.value:
        return _name(flag.value)
    return None


def forced() -> str | None:
    """The name of the second signal when one came (the stop is then immediate), else None."""
    if _state.forced is not None:
        return _state.forced
    flag = _state.parent_flag
    if flag is not None and flag.value < 0:
        return _name(flag.value)
    return None


def check(point: str) -> None:
    """Raise :class:`Interrupted` if a stop was requested; call it between units of work.

    Also the deterministic test hook: see ``FEATX_STOP_AT`` in the module's docstring.

    Raises:
        Interrupted: a stop was requested (by a signal, a parent process, or the hook).
    """
    mark(point)
    raise_if_requested(point)


def mark(point: str) -> None:
    """Count a stop point for the test hook without raising: for places that must go on after a request (a
    parent waiting for its workers, which carry the stop out themselves)."""
    n = _state.counts[point] = _state.counts.get(point, 0) + 1
    spec = os.environ.get(ENV_STOP_AT)
    if spec:
        for p, k, signum, times in _parse_hook(spec):
            if p == point and k == n:
                _deliver(signum, times)


def raise_if_requested(point: str | None = None) -> None:
    """Raise :class:`Interrupted` if a stop was requested, without counting a stop point."""
    name = stop_requested()
    if name is not None:
        raise Interrupted(name, point)


def _parse_hook(spec: str) -> list[tuple[str, int, int, int]]:
    out = []
    for part in spec.split(","):
        fields = [f.strip() for f in part.strip().split(":")]
        if not fields[0]:
            continue
        try:
            n = int(fields[1]) if len(fields) > 1 and fields[1] else 1
            signum = _HOOK_SIGNALS[fields[2].upper()] if len(fields) > 2 and fields[2] else signal.SIGINT
            times = int(fields[3]) if len(fields) > 3 and fields[3] else 1
        except (KeyError, ValueError):
            raise FeatxError(f"{ENV_STOP_AT}={spec!r}: use POINT[:N[:SIGINT|SIGTERM|SIGKILL[:TIMES]]], "
                             f"e.g. search.trial:3:SIGTERM") from None
        out.append((fields[0], n, int(signum), times))
    return out


def _deliver(signum: int, times: int) -> None:
    """Send ``signum`` to this process ``times`` times, each after the previous one was handled (two pending
    signals of one kind would merge into one)."""
    for _ in range(times):
        before = _state.received
        os.kill(os.getpid(), signum)
        if not _state.active or threading.current_thread() is not threading.main_thread():
            # no handler of ours, or the handler runs in the main thread: give it a moment to land
            deadline = time.monotonic() + 5.0
            while _state.received == before and time.monotonic() < deadline:
                time.sleep(0.001)
        # in the main thread with our handler, os.kill has already run it (CPython checks signals at once)


def _on_signal(signum: int, frame) -> None:
    _state.received += 1
    name = _name(signum)
    flag = _state.parent_flag
    parent_says_now = flag is not None and flag.value < 0
    if _state.requested is None and not parent_says_now:
        _state.requested = name  # first: a graceful stop, noticed by the next check()
        for f in _state.child_flags:
            f.value = int(signum)
        return
    if _state.forced is not None:  # a third signal
        return
    _state.forced = name  # second: stop at once
    for f in _state.child_flags:
        f.value = -int(signum)
    if _state.worker:
        # the parent waits for this worker's clean-up (failing its RUNNING trial): let nothing cut it short
        for s in SIGNALS.values():
            signal.signal(s, signal.SIG_IGN)
    else:
        # a third signal gets Python's defaults: Ctrl-C again raises, SIGTERM again kills
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt(name)


@contextlib.contextmanager
def handling(*, parent=None) -> Iterator[None]:
    """Install the signal policy for the duration of a command (the CLI wraps every command in it).

    Args:
        parent: in a worker process, the shared flag its parent made with :func:`share_with_workers`.

    Nested uses, and uses outside the main thread (where Python cannot install handlers), change nothing.
    """
    if _state.active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS.values()}
    _state.reset()
    _state.active = True
    _state.parent_flag = parent
    _state.worker = parent is not None
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN if _state.worker else _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
        # a worker starts with the signals its parent blocked while starting it (see workers_starting)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(SIGNALS.values()))
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _state.reset()


def share_with_workers(ctx) -> object:
    """A shared flag for worker processes of ``ctx`` (a multiprocessing context), passed to their
    ``handling(parent=flag)``: this process's stop request (and its immediate stop) reaches them through it."""
    flag = ctx.RawValue("i", 0)
    name = stop_requested()
    if name is not None:
        flag.value = int(SIGNALS[name])
    _state.child_flags.append(flag)
    return flag


def release_workers(flag) -> None:
    """Stop forwarding requests to ``flag`` (its workers have ended)."""
    with contextlib.suppress(ValueError):
        _state.child_flags.remove(flag)


@contextlib.contextmanager
def workers_starting() -> Iterator[None]:
    """Hold SIGINT and SIGTERM while worker processes start: they inherit the blocked mask and take pending
    signals only once their own handlers are in place (in :func:`handling`), never half-way through startup."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, set(SIGNALS.values()))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def stop_workers_now(procs: Iterable) -> None:
    """After a second signal: tell live worker processes to stop at once (their flag says so; SIGTERM wakes them)."""
    for f in _state.child_flags:
        if f.value >= 0:
            f.value = -int(signal.SIGTERM) if not f.value else -abs(f.value)
    for p in procs:
        if p.is_alive() and p.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)


def exit_code_of(signame: str) -> int:
    """128 + the signal's number: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(SIGNALS.get(signame, signal.SIGINT))
