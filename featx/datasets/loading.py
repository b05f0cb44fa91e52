"""Decoding images into batches for the network, shared by the stages that run it (extract, finetune, predict).

Every item decodes to ``(index, uint8 [V, 3, H, W] or None, reason or None)``: a bad file costs one row and
is reported with its reason, never the run.  Imports torch: kept apart from the rest of :mod:`featx.datasets`,
which the torch-free commands import.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from featx.backbones import Preprocess
from featx.datasets.images import BadImage, open_rgb

__all__ = ["decode", "DecodeSet", "collate", "CollateReady", "decode_loader"]


def decode(path: Path, pre: Preprocess, max_pixels: int | None) -> tuple[torch.Tensor | None, str | None]:
    """uint8 ``[V, 3, H, W]`` and None, or None and the reason the file cannot be used; never raises for a bad file."""
    try:
        return pre.pixels(open_rgb(path, max_pixels=max_pixels)), None
    except BadImage as e:
        return None, str(e)
    except Exception as e:  # anything else a decoder can throw must cost one file, not the run
        return None, f"cannot decode: {type(e).__name__}: {e}"


class DecodeSet(torch.utils.data.Dataset):
    """Item i -> (i, uint8 [V, 3, H, W] or None, reason or None); never raises for a bad file."""

    def __init__(self, paths: Sequence[Path], preprocess: Preprocess, max_pixels: int | None):
        self.paths = list(paths)
        self.pre = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return (i, *decode(self.paths[i], self.pre, self.max_pixels))


def collate(batch):
    good = [(i, px) for i, px, _ in batch if px is not None]
    bad = [(i, why) for i, px, why in batch if px is None]
    pixels = torch.cat([px for _, px in good]) if good else None
    return [i for i, _ in good], pixels, bad


class CollateReady:
    """Collate into the network's input: normalized float32 in channels_last, built in the worker process so
    the main process only runs the forward pass (CPU).  The values are those of :meth:`Preprocess.normalize`."""

    def __init__(self, pre: Preprocess):
        self.pre = pre

    def __call__(self, batch):
        idx, pixels, bad = collate(batch)
        if pixels is not None:
            pixels = self.pre.normalize(pixels).contiguous(memory_format=torch.channels_last)
        return idx, pixels, bad


def decode_loader(paths: Sequence[Path], batches: list[list[int]], pre: Preprocess, *, workers: int, pin: bool,
                  max_pixels: int | None, ready: bool = False) -> torch.utils.data.DataLoader:
    """Decode in ``workers`` processes; ``ready``: batches arrive normalized (else uint8, e.g. for the GPU, where
    sending uint8 and normalizing there moves 4x fewer bytes)."""
    kw: dict[str, Any] = {}
    if workers > 0:
        kw = {"prefetch_factor": 4, "persistent_workers": False}
    return torch.utils.data.DataLoader(DecodeSet(paths, pre, max_pixels), batch_sampler=batches,
                                       num_workers=workers, collate_fn=CollateReady(pre) if ready else collate,
                                       pin_memory=pin, **kw)
