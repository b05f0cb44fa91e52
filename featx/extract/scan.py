"""Listing the images and their content hash (the fingerprints that key a feature set).

Listing reads directories only (no image is opened).  The hash reads every byte of every image, which is why
:class:`BackgroundHash` starts it before torch is imported: hashlib releases the GIL, so the files are hashed
while the imports and the network's construction run.  Under torchrun each rank hashes its share of the files,
and the shares are put back in item order.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from featx.datasets import ImageDataset, fingerprints, fingerprints_of
from featx.datasets.base import fingerprint_file

if TYPE_CHECKING:
    from featx import distributed

CHUNK = 32  # files per task: few tasks, and a stop request is seen within one chunk


class BackgroundHash:
    """Every item's ``(path, size, sha256)``, computed on ``threads`` threads from creation on.

    :meth:`result` waits for them, in item order; :meth:`stop` abandons the work (a user error found meanwhile
    must not wait for the hash of a large dataset): the chunks not yet started are dropped and those running end
    after their current file.
    """

    def __init__(self, ds: ImageDataset, *, threads: int = 4):
        self._stop = threading.Event()
        self._paths = [it.path for it in ds.items]
        self._root = ds.root
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="featx-hash")
        self._parts: list[Future] = [self._pool.submit(self._chunk, a) for a in range(0, len(self._paths), CHUNK)]

    def _chunk(self, a: int) -> list:
        out = []
        for p in self._paths[a:a + CHUNK]:
            if self._stop.is_set():
                return []
            out.append((p, *fingerprint_file(self._root / p)))
        return out

    def result(self) -> list[tuple[str, int | None, str]]:
        try:
            return [fp for part in self._parts for fp in part.result()]
        finally:
            self._pool.shutdown(wait=False)

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def rank_fingerprints(ds: ImageDataset, ctx: distributed.Context) -> list:
    """Every item's fingerprint; under torchrun only this rank's share (every ``world_size``-th item, from
    ``rank``), so that N ranks read the data once between them instead of N times."""
    if not ctx.active:
        return fingerprints(ds)
    return fingerprints_of(ds.root, [it.path for it in ds.items[ctx.rank::ctx.world_size]])


def all_fingerprints(ctx: distributed.Context, mine: list) -> list:
    """The shares of :func:`rank_fingerprints` put back in item order on every rank."""
    shares = ctx.all_gather([list(f) for f in mine])
    out: list = [None] * sum(len(s) for s in shares)
    for r, share in enumerate(shares):
        out[r::ctx.world_size] = share
    return out
