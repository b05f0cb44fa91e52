"""Listing the images and their content hash (the fingerprints that key a feature set).

Under torchrun each rank hashes its share of the files, and the shares are put back in item order.
"""
from __future__ import annotations

from featx import distributed
from featx.datasets import ImageDataset, fingerprints, fingerprints_of


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
