"""What a fine-tuning run is asked to do: :class:`FinetuneOptions`, checked when it is made, saved beside the
model (``options`` in ``model.json`` and ``metrics.json``) and hashed, with the seed, into the model's key.

Everything that changes the trained model is an option; where and how it runs (device, decode workers, cache,
resume, progress bar) is not, and is passed to :func:`featx.finetune.finetune` on its own.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import featx
from featx.cache import hash_key
from featx.errors import UsageError
from featx.model import MODEL_FORMAT, Group, finetune_command

UNFREEZE_HELP = "none, head, fc, all, gradual or last:N"
AUGMENTS = ("none", "flip", "crop", "resized-crop", "jitter", "sixview")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("step", "plateau", "cosine", "none")


def parse_unfreeze(unfreeze: str) -> tuple[str, int]:
    """``"last:3"`` -> ``("last", 3)``; the other strategies -> ``(name, 0)``.

    Raises:
        UsageError: an unknown strategy or a bad N.
    """
    s = str(unfreeze).strip().lower()
    if s.startswith("last:"):
        try:
            n = int(s.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"--unfreeze {unfreeze!r}: N in last:N must be a whole number of layers, at least 1")
        return "last", n
    if s in ("none", "head", "fc", "all", "gradual"):
        return s, 0
    raise UsageError(f"--unfreeze {unfreeze!r}: use {UNFREEZE_HELP}")


def parse_augment(augment: str | Sequence[str] | None) -> frozenset[str]:
    """``"flip,crop"`` -> ``{"flip", "crop"}``; ``none`` or empty -> no augmentation.

    Raises:
        UsageError: an unknown name, or two ways of cropping at once.
    """
    parts = [augment] if isinstance(augment, str) or augment is None else list(augment)
    names = {s.strip().lower() for p in parts if p for s in str(p).split(",") if s.strip()}
    bad = sorted(names - set(AUGMENTS))
    if bad:
        raise UsageError(f"--augment {bad[0]!r}: use {', '.join(AUGMENTS)} (combine with commas, e.g. flip,crop)")
    names.discard("none")
    crops = names & {"crop", "resized-crop", "sixview"}
    if len(crops) > 1:
        raise UsageError(f"--augment: {' and '.join(sorted(crops))} are two ways of cropping; choose one")
    return frozenset(names)


def trainable_groups(groups: list[Group], strategy: tuple[str, int], epoch: int, gradual_every: int) -> set[int]:
    """Indices of the backbone groups that train in ``epoch`` (1-based) under ``strategy``."""
    name, n = strategy
    top = len(groups)
    if name in ("none", "head"):
        return set()
    if name == "all":
        return set(range(top))
    if name == "fc":
        return {i for i, g in enumerate(groups) if g.kind == "linear"}
    if name == "last":
        return set(range(max(0, top - n), top))
    k = min(top, (epoch - 1) // gradual_every)  # gradual: one more layer from the top every gradual_every epochs
    return set(range(top - k, top))


@dataclass(frozen=True)
class FinetuneOptions:
    """Every choice that changes a fine-tuned model, with ``featx finetune``'s defaults (each field is the flag
    of the same name with dashes: ``backbone_lr_factor`` is ``--backbone-lr-factor``).

    Values are checked and put in one canonical form when the options are made (``"Last:2"`` becomes
    ``"last:2"``, ``"crop,flip"`` the tuple ``("crop", "flip")``), so two spellings of one run give one model.

    Raises:
        UsageError: a value out of range or unknown (the message names the flag).

    Example:
        >>> FinetuneOptions(epochs=5, unfreeze="last:2").unfreeze
        'last:2'
    """

    epochs: int = 10                # training epochs
    # what trains besides the head: head (nothing else; none is the same), fc (the fully connected layers before
    # the head's layer), last:N (the top N layers with parameters), all, gradual (one more layer from the top
    # every gradual_every epochs, starting with none)
    unfreeze: str = "all"
    lr: float = 1e-3                # the head's learning rate
    # the backbone's lr is lr x this (x backbone_lr_scale of the head's features when scale_backbone_lr)
    backbone_lr_factor: float = 0.1
    optimizer: str = "sgd"          # sgd (with momentum) or adam
    momentum: float = 0.9           # sgd only
    weight_decay: float = 5e-4      # L2 penalty, head and backbone
    # cosine (to 0 over the epochs), step (x0.1 every step_size epochs), plateau (x0.1 after plateau_patience
    # epochs without a lower validation loss) or none
    schedule: str = "cosine"
    step_size: int = 5              # step schedule only
    plateau_patience: int = 2       # plateau schedule only
    gradual_every: int = 1          # gradual unfreezing only
    # training views, comma-combined: none, flip, crop, resized-crop, jitter, sixview (augmented_pixels);
    # validation and test images get the plain centre crop
    augment: str | Sequence[str] = "flip,crop"
    batch_size: int = 32            # images per step (under torchrun: the global batch)
    amp: bool = False               # autocast: fp16 with loss scaling on CUDA, bf16 on the CPU
    early_stop: int | None = None   # stop after this many epochs without a better validation accuracy
    clip_grad: float | None = None  # rescale each step's gradient (head and backbone) to at most this L2 norm
    # retries of a diverged epoch (non-finite loss or gradient, or an exploding loss), each at half the lr
    recover: int = 3
    # the backbone's lr x min(1, s**2), s the median train std of the head's features (backbone_lr_scale)
    scale_backbone_lr: bool = True
    # keep the backbone's Dropout on in the layers that train (off: as when the features were extracted)
    backbone_dropout: bool = False
    seed: int = 0                   # held-out validation images, shuffling, augmentation, dropout

    def __post_init__(self) -> None:
        name, n = parse_unfreeze(self.unfreeze)
        augments = parse_augment(self.augment)
        canonical: dict[str, Any] = {
            "unfreeze": f"last:{n}" if name == "last" else name, "augment": tuple(sorted(augments)),
            "optimizer": str(self.optimizer).lower(), "schedule": str(self.schedule).lower(),
            "amp": bool(self.amp), "scale_backbone_lr": bool(self.scale_backbone_lr),
            "backbone_dropout": bool(self.backbone_dropout)}
        for field_name, kind in (("epochs", int), ("lr", float), ("backbone_lr_factor", float), ("momentum", float),
                                 ("weight_decay", float), ("step_size", int), ("plateau_patience", int),
                                 ("gradual_every", int), ("batch_size", int), ("early_stop", int),
                                 ("clip_grad", float), ("recover", int), ("seed", int)):
            canonical[field_name] = _number(field_name, getattr(self, field_name), kind)
        for field_name, value in canonical.items():
            object.__setattr__(self, field_name, value)  # frozen: set once, here
        self._check()

    def _check(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"--epochs {self.epochs}: train at least 1 epoch")
        if not self.lr > 0:
            raise UsageError(f"--lr {self.lr}: the learning rate must be positive")
        if self.backbone_lr_factor < 0:
            raise UsageError(f"--backbone-lr-factor {self.backbone_lr_factor}: must be 0 or more")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer {self.optimizer!r}: use {' or '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule {self.schedule!r}: use {', '.join(SCHEDULES)}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise UsageError("--momentum must be in [0, 1) and --weight-decay 0 or more")
        if self.batch_size < 1 or self.gradual_every < 1 or self.step_size < 1 or self.plateau_patience < 0:
            raise UsageError("--batch-size, --gradual-every and --step-size must be at least 1")
        if self.early_stop is not None and self.early_stop < 1:
            raise UsageError(f"--early-stop {self.early_stop}: give a number of epochs, at least 1 (or leave it out)")
        if self.clip_grad is not None and not 0 < self.clip_grad < math.inf:
            raise UsageError(f"--clip-grad {self.clip_grad}: give a positive gradient norm, e.g. 1.0 (or leave it out)")
        if self.recover < 0:
            raise UsageError(f"--recover {self.recover}: give how many times to halve the learning rate, 0 or more")

    @property
    def strategy(self) -> tuple[str, int]:
        """``unfreeze`` parsed: ``("last", N)`` or ``(name, 0)``."""
        return parse_unfreeze(self.unfreeze)

    @property
    def augments(self) -> frozenset[str]:
        """The training views' augmentations (empty: none)."""
        return frozenset(self.augment)

    def to_json(self) -> dict[str, Any]:
        """The options as saved beside the model and hashed into its key (the seed apart): an option that does
        not apply (``momentum`` with adam, ``step_size`` without the step schedule, ...) is ``null``."""
        return {
            "epochs": self.epochs, "unfreeze": self.unfreeze, "lr": self.lr,
            "backbone_lr_factor": self.backbone_lr_factor, "optimizer": self.optimizer,
            "momentum": self.momentum if self.optimizer == "sgd" else None, "weight_decay": self.weight_decay,
            "schedule": self.schedule, "step_size": self.step_size if self.schedule == "step" else None,
            "plateau_patience": self.plateau_patience if self.schedule == "plateau" else None,
            "gradual_every": self.gradual_every if self.strategy[0] == "gradual" else None,
            "augment": list(self.augment), "batch_size": self.batch_size, "amp": self.amp,
            "early_stop": self.early_stop, "clip_grad": self.clip_grad, "recover": self.recover,
            "scale_backbone_lr": self.scale_backbone_lr, "backbone_dropout": self.backbone_dropout}

    def model_key(self, head_meta: dict) -> str:
        """The key of the model these options train from the head whose ``featx-head.json`` is ``head_meta``:
        the head's files (their sha256), its feature set's key, the options, the seed, the model format and
        featx's major version."""
        return hash_key({"head": head_meta.get("files"), "features": (head_meta.get("source") or {}).get("key"),
                         "options": self.to_json(), "seed": self.seed, "format": MODEL_FORMAT,
                         "featx": featx.__version__.split(".")[0]})

    def command(self, head: Path, cache: str | os.PathLike) -> list[str]:
        """The ``featx finetune`` command line that trains this model (saved as ``command.json``)."""
        return finetune_command(head, self.to_json(), seed=self.seed, cache=Path(cache))


def _number(name: str, value: Any, kind: type) -> Any:
    """``value`` as an int or a float (None stays None where the option may be left out)."""
    if value is None and name in ("early_stop", "clip_grad"):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise UsageError(f"--{name.replace('_', '-')} {value!r}: give {what}") from None
