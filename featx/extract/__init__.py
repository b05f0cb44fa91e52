"""``featx extract``: from a folder of images to a feature set in the cache.

* :mod:`~featx.extract.api` - :func:`extract`: resolve the run, then reuse, compute or resume its feature set;
* :mod:`~featx.extract.scan` - listing the images and their content hash;
* :mod:`~featx.extract.target` - what is computed and where it goes (the key, the shard plan, the command);
* :mod:`~featx.extract.compute` - the decode/forward pipeline;
* :mod:`~featx.extract.shards` - writing shards and the manifest;
* :mod:`~featx.extract.ranks` - torchrun ranks' split of the shards and rank 0's merge;
* :mod:`~featx.extract.reuse` - deeper layers from a shallower cached layer of the same rows.

How the pipeline runs and what its timings mean: docs/extract.md.
"""
from __future__ import annotations

from typing import Any

from featx.extract.api import extract
from featx.extract.target import ExtractResult

__all__ = ["REUSE_ROWS", "ExtractResult", "extract", "reusable_source"]


def __getattr__(name: str) -> Any:
    # importing featx.extract imports no torch (extract() starts hashing the images first): the names of
    # featx.extract.reuse, which imports torch, are looked up on first use
    if name in ("REUSE_ROWS", "reusable_source"):
        from featx.extract import reuse

        return getattr(reuse, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
