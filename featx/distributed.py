"""torchrun ranks: who this process is, which device it uses, and the few collectives the stages need.

``torchrun --nnodes N --nproc-per-node G -m featx COMMAND ...`` starts ``N x G`` copies of the same command and
tells each who it is through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``TORCHELASTIC_RESTART_COUNT``; https://docs.pytorch.org/docs/stable/elastic/run.html).  :func:`init` reads it,
starts the process group once per process (``gloo`` on the CPU; ``cpu:gloo,cuda:nccl`` on CUDA, so that the small
Python objects exchanged below travel over gloo on the CPU while DDP's gradients use NCCL) and returns a
:class:`Context`.  Without torchrun, or with a world of one process, it starts nothing and every helper below
is a no-op, so the stages run one code path.

What the stages exchange is small and happens at the start and the end: a digest of every rank's resolved
arguments (:meth:`Context.agree`: ranks that disagree stop with one error before anything is written), a token
file that proves the cache is one shared filesystem (:meth:`Context.check_shared`), and the plan of who
computes what (:meth:`Context.broadcast`).  Waiting for another rank's *work* is done on the filesystem
(:func:`wait_for_files`), never in a collective, because the gloo/NCCL timeout would turn uneven work into a
crash; a rank that dies is torchrun's to notice (it stops the others, then restarts them with
``--max-restarts`` or fails the job).
"""
from __future__ import annotations

import atexit
import datetime
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from featx.errors import DataError, UsageError

logger = logging.getLogger(__name__)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
TIMEOUT_ENV = "FEATX_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800  # collectives: only at the start and the end of a stage, where ranks arrive together
SHARED_WAIT_S = 60.0  # how long a rank looks for rank 0's token (NFS may cache a directory listing ~30 s)


@dataclass(frozen=True)
class Context:
    """This process's place among the ranks torchrun started (one process: rank 0 of a world of 1).

    Attributes:
        rank, world_size: global rank and number of processes. local_rank, local_world_size: the same on this
            node. restart_count: torchrun's ``TORCHELASTIC_RESTART_COUNT`` (0 on the first attempt).
        backend: the process group's backend, or None when no group was started (world of one).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    restart_count: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        """True when several processes cooperate (a process group is running)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes what is written once (manifest, checkpoints, metrics, curves)."""
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world_size} on {socket.gethostname()}"

    # ------------------------------------------------------------------ collectives (no-ops in a world of one)
    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (a small picklable object)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any = None, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (what the others pass is ignored)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (float64 on the CPU)."""
        if not self.active:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if self.backend and "nccl" in self.backend and "gloo" not in self.backend:  # pragma: no cover - CUDA only
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().tolist()

    def agree(self, fields: dict[str, Any], *, what: str = "arguments") -> None:
        """Stop every rank with one :class:`UsageError` unless all ranks hold the same ``fields``.

        Each value is reduced to a digest (its canonical JSON's sha256) plus a short readable form, so that big
        values (the list of files) cost a few bytes; the error names the first field that differs and what each
        rank has.  Call it before anything is written: on a mismatch nothing is.
        """
        if not self.active:
            return
        from featx.cache import canonical_json

        mine = {k: (hashlib.sha256(canonical_json(v).encode()).hexdigest()[:16], _short(v)) for k, v in fields.items()}
        every = self.all_gather((socket.gethostname(), mine))
        for k in fields:
            seen = {d[k][0] if k in d else None for _, d in every}
            if len(seen) > 1:
                shown = "; ".join(f"rank {r} ({host}): {d[k][1] if k in d else 'missing'}"
                                  for r, (host, d) in enumerate(every))
                raise UsageError(f"the {self.world_size} torchrun ranks disagree on {k}: {shown}. Every rank must "
                                 f"get the same {what} and see the same data; nothing was written")

    def check_shared(self, directory: Path, *, what: str) -> None:
        """Stop every rank with one :class:`DataError` unless every rank sees the files rank 0 writes in
        ``directory`` (``what`` names it in the message, e.g. ``"cache"``).

        Rank 0 creates ``directory`` and an empty token file with a fresh name inside it; the others look for it
        (up to :data:`SHARED_WAIT_S` seconds, for a network filesystem's caching); the verdicts are gathered so
        every rank fails together; rank 0 removes the token.  A cache that is not shared would otherwise make
        rank 0 wait forever for shards that land on another machine's disk.
        """
        if not self.active:
            return
        token = None
        if self.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            token = f".featx-shared-{os.getpid()}-{os.urandom(6).hex()}"
            (directory / token).touch()
        token = self.broadcast(token)
        seen = True
        if not self.is_main:
            deadline = time.monotonic() + float(os.environ.get("FEATX_SHARED_WAIT", SHARED_WAIT_S))
            while not (directory / token).exists():
                if time.monotonic() > deadline:
                    seen = False
                    break
                time.sleep(0.2)
        verdicts = self.all_gather((seen, socket.gethostname()))
        if self.is_main:
            (directory / token).unlink(missing_ok=True)
        blind = [f"rank {r} ({host})" for r, (ok, host) in enumerate(verdicts) if not ok]
        if blind:
            raise DataError(f"the {what} {str(directory)!r} is not shared between the torchrun ranks: "
                            f"{', '.join(blind)} cannot see the file rank 0 ({verdicts[0][1]}) wrote there. Put "
                            f"--cache (or $FEATX_CACHE) on a filesystem every node mounts (NFS, Lustre, a shared "
                            f"volume), at a path each node can reach")

    def barrier(self) -> None:
        """Wait for every rank (only where all ranks arrive together; see the module's docstring)."""
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    # ------------------------------------------------------------------ resources
    def device(self, dev: torch.device) -> torch.device:
        """The device this rank uses: on CUDA, the one of index ``LOCAL_RANK`` (made current); else ``dev``."""
        if dev.type != "cuda" or not self.active:
            return dev
        n = torch.cuda.device_count()
        if self.local_rank >= n:
            raise UsageError(f"torchrun started {self.local_world_size} processes on this node but it has {n} CUDA "
                             f"device(s): use --nproc-per-node {n} or fewer")
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def cores(self) -> int:
        """CPU cores for this process: the affinity set shared out between the node's ranks."""
        return cores_per_process()


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)) and len(v) > 4:
        return f"{len(v)} entries (digest {hashlib.sha256(repr(v).encode()).hexdigest()[:8]})"
    s = repr(v)
    return s if len(s) <= 100 else s[:97] + "..."


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"environment variable {name}={raw!r} is not a whole number (torchrun sets it)") from None


def from_env() -> Context:
    """The :class:`Context` torchrun's environment describes (rank 0 of 1 without it); starts nothing.

    Raises:
        UsageError: malformed variables (a rank outside the world).
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", 1 if world == 1 else world)
    local_rank = _env_int("LOCAL_RANK", rank if local_world == world else 0)
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < max(1, local_world):
        raise UsageError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} "
                         f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}")
    return Context(rank, world, local_rank, local_world, _env_int("TORCHELASTIC_RESTART_COUNT", 0))


def cores_per_process() -> int:
    """Cores of this process's affinity set divided by the ranks torchrun started on this node (at least 1):
    two ranks on a 2-core node get one core each instead of both oversubscribing both."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    local = max(1, _env_int("LOCAL_WORLD_SIZE", 1)) if _env_int("WORLD_SIZE", 1) > 1 else 1
    return max(1, n // local)


def init(dev: torch.device) -> Context:
    """The :class:`Context` of this process, starting the process group on first use under torchrun.

    ``gloo`` when ``dev`` is the CPU, ``cpu:gloo,cuda:nccl`` on CUDA, with an explicit timeout of
    ``$FEATX_DIST_TIMEOUT`` seconds (default 1800) for the collectives; the group is destroyed when the
    process exits.  A group already started by the caller (a script that set up torch.distributed itself) is
    used as it is.

    Raises:
        UsageError: an inconsistent torchrun environment.
    """
    ctx = from_env()
    if not ctx.active:
        return ctx
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - every torch build featx supports has it
        raise UsageError("this torch build has no torch.distributed: run featx without torchrun")
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise UsageError(f"WORLD_SIZE={ctx.world_size} is set but {' and '.join(missing)} not: start featx with "
                             f"torchrun (which sets them all), or unset WORLD_SIZE to run one process")
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=_env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
        # torchrun's c10d rendezvous hands the workers of every attempt the same agent store, and the gloo mesh
        # of a restarted attempt then read the dead attempt's addresses ("Connection refused" after an elastic
        # restart, seen with torch 2.14): keys are put under the attempt's own prefix instead.
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"featx/attempt-{ctx.restart_count}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
        atexit.register(_destroy)
        logger.info("%s: process group started (%s, collectives time out after %s)", ctx, backend, timeout)
    else:
        backend = str(dist.get_backend())
    return Context(ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size, ctx.restart_count, backend)


def _destroy() -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # exiting anyway; a peer that left first must not turn a success into a traceback
        pass


def wait_for_files(paths: Sequence[Path], *, what: str, ready: Callable[[Path], bool] | None = None,
                   log_every_s: float = 60.0) -> None:
    """Return once every path exists (and ``ready(path)`` holds, when given): how a rank that has finished
    its share waits for the others' work.  Files appear atomically (``os.replace``), so existence means
    complete.  No timeout: a rank that dies is torchrun's to notice, and it then stops this process too;
    slow ranks (uneven work, a slower node) are simply waited for, which a collective's timeout would not do."""
    from featx import interrupt

    todo = list(paths)
    check = ready or (lambda p: p.exists())
    pause, last_log = 0.05, time.monotonic()
    while todo:
        interrupt.check("distributed.wait")  # a SIGTERM (torchrun passes it on) stops the wait too
        todo = [p for p in todo if not check(p)]
        if not todo:
            return
        if time.monotonic() - last_log >= log_every_s:
            logger.info("waiting for %d %s from the other ranks, e.g. %s", len(todo), what, todo[0].name)
            last_log = time.monotonic()
        time.sleep(pause)
        pause = min(2.0, pause * 1.5)
