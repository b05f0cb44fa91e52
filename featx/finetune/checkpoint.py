"""Checkpoints: where a fine-tuning run stands, written atomically with its sha256, read back to resume.

After every epoch (and when a stop is requested mid-epoch, at the step it stopped before) the model directory's
``checkpoint.pt`` holds the model, optimizer, scheduler and loss-scaler state and the run's
:class:`Progress`, saved with ``torch.save`` as a dict of tensors and plain values (read with
``weights_only=True``) followed by ``FEATX-SHA256:`` and the sha256 of everything before it.  A reader sees the
old checkpoint or the whole new one; a damaged one is detected and never loaded.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featx.cache import atomic_write_bytes
from featx.errors import IntegrityError, UsageError
from featx.finetune.data import epoch_seed

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.jsonl"
_MAGIC = b"\nFEATX-SHA256:"  # trailer of a checkpoint: the sha256 of everything before it


@dataclass
class Progress:
    """How far a run has come: what the training loop carries from one epoch to the next, and resumes from."""

    initial: dict                  # the network before any step: test/val accuracy and loss, seconds
    best: dict                     # the kept epoch (0: the head itself): epoch, val_accuracy, val_loss
    best_state: dict | None        # its weights, on the CPU (None without validation images: the last is kept)
    best_test: dict                # its test evaluation (loss, accuracy, n, pred, y, logits): the final measure
    epoch: int = 0                 # the last finished epoch
    history: list[dict] = field(default_factory=list)  # one record per finished epoch (history.jsonl)
    bad_epochs: int = 0            # epochs since the kept one (early stopping)
    stopped: bool = False          # early stopping ended the run
    recoveries: list[dict] = field(default_factory=list)  # retries of the epoch under way (divergence guard)
    partial: dict | None = None    # stopped mid-epoch: the step to continue at, the epoch's sums, dropout's RNG


@dataclass
class Checkpoint:
    """Everything ``checkpoint.pt`` holds: the model's key, the run's progress, the state of the network and of
    what steps it (``learner``: ``model``, ``optimizer``, ``scheduler``, ``grad_scaler``), the options, the seed."""

    key: str
    progress: Progress
    learner: dict
    options: dict
    seed: int

    def to_dict(self) -> dict:
        """The checkpoint as saved: a flat dict of tensors and plain values."""
        p = self.progress
        d: dict[str, Any] = {"key": self.key, "epoch": p.epoch, **self.learner, "best": p.best,
                             "best_state": p.best_state, "best_test": _pack(p.best_test), "bad_epochs": p.bad_epochs,
                             "stopped": p.stopped, "history": p.history, "initial": p.initial, "options": self.options}
        if p.partial is not None:
            d["partial"] = p.partial
            d["recoveries"] = p.recoveries  # retries of the stopped epoch so far
        # no generator state to carry between epochs: every draw of epoch e (shuffle, augmentation, dropout) is
        # seeded from (seed, e), so the next epoch draws the same after a resume as without one
        d["rng"] = {"seed": self.seed, "next_epoch_seed": epoch_seed(self.seed, p.epoch + 1)}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Checkpoint:
        """A checkpoint read by :func:`load_checkpoint` (written by this featx or an earlier one)."""
        progress = Progress(initial=d["initial"], best=d["best"], best_state=d["best_state"],
                            best_test=_unpack(d["best_test"]), epoch=int(d["epoch"]), history=list(d["history"]),
                            bad_epochs=int(d["bad_epochs"]), stopped=bool(d["stopped"]),
                            recoveries=list(d.get("recoveries") or []), partial=d.get("partial"))
        learner = {k: d.get(k) for k in ("model", "optimizer", "scheduler", "grad_scaler")}
        seed = int((d.get("rng") or {}).get("seed", 0))
        return cls(str(d.get("key")), progress, learner, d.get("options") or {}, seed)


def _pack(r: dict) -> dict:
    """An evaluation's result in checkpoint form (tensors and numbers only)."""
    return {"loss": r["loss"], "accuracy": r["accuracy"], "n": r["n"], "pred": torch.from_numpy(np.asarray(r["pred"])),
            "y": torch.from_numpy(np.asarray(r["y"])), "logits": torch.from_numpy(np.asarray(r["logits"]))}


def _unpack(r: dict) -> dict:
    return {**r, "pred": r["pred"].numpy(), "y": r["y"].numpy(), "logits": r["logits"].numpy()}


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` with its sha256 appended, atomically: a reader sees the old file or the whole new one."""
    buf = io.BytesIO()
    torch.save(checkpoint.to_dict(), buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest().encode()
    atomic_write_bytes(path, data + _MAGIC + digest)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint, checking its embedded sha256 first (tensors only: ``weights_only=True``).

    Returns:
        The saved dict (:meth:`Checkpoint.to_dict`'s form; :meth:`Checkpoint.from_dict` reads it).

    Raises:
        IntegrityError: truncated, modified or unreadable; nothing of it is loaded.
    """
    path = Path(path)
    raw = path.read_bytes()
    cut = raw.rfind(_MAGIC)
    digest = raw[cut + len(_MAGIC):] if cut >= 0 else b""
    fix = "delete it to restart from epoch 0, or run again with resume=False (--no-resume)"
    if cut < 0 or len(digest) != 64:
        raise IntegrityError(f"checkpoint {path} is corrupt (no sha256 trailer: truncated or not featx's); "
                             f"it was not loaded: {fix}")
    if hashlib.sha256(raw[:cut]).hexdigest().encode() != digest:
        raise IntegrityError(f"checkpoint {path} is corrupt (sha256 differs); it was not loaded: {fix}")
    try:
        return torch.load(io.BytesIO(raw[:cut]), map_location="cpu", weights_only=True)
    except Exception as e:
        raise IntegrityError(f"checkpoint {path} cannot be read ({type(e).__name__}); it was not loaded: "
                             f"{fix}") from None


def checkpoint_to_resume(out: Path, key: str, resume: bool | None) -> Checkpoint | None:
    """The checkpoint of ``out`` that the run continues from, or None to start from the head.

    ``resume``: None continues from a checkpoint if there is one; True insists on one; False ignores one (it is
    overwritten after the first epoch).

    Raises:
        UsageError: ``resume=True`` and no checkpoint.  IntegrityError: a damaged checkpoint, or one of another
        model.
    """
    path = out / CHECKPOINT
    if resume is not False and path.exists():
        state = load_checkpoint(path)
        if state.get("key") != key:
            raise IntegrityError(f"checkpoint {path} belongs to another run ({state.get('key')}); not loaded")
        return Checkpoint.from_dict(state)
    if resume is True:
        raise UsageError(f"nothing to resume: {out} holds no checkpoint (run without --resume to start)")
    if path.exists():
        logger.info("resume=False: the existing checkpoint is ignored and will be overwritten after epoch 1")
    return None


def write_history(path: Path, history: list[dict]) -> None:
    """``history.jsonl``: one JSON line per finished epoch, written atomically."""
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in history).encode())
