"""The network and what steps it: optimizer, learning-rate schedule and loss scaler, and their state as one.

Every parameter is in the optimizer from the start, in two groups (``head`` and ``backbone``, the backbone at
``lr x backbone_lr_factor x backbone_lr_scale``); a frozen parameter simply gets no gradient, which SGD and Adam
skip, so gradual unfreezing needs no new optimizer (nor a state reset).  :meth:`Learner.state` is what a
checkpoint saves and what the divergence guard returns to; :meth:`Learner.load` puts either back.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from featx.finetune.options import FinetuneOptions
from featx.model import FinetuneNet


def backbone_lr_scale(spread: float | None) -> float:
    """``min(1, spread**2)``: what the backbone's learning rate is multiplied by, ``spread`` being the median
    train standard deviation of the head's features in the backbone's units (:attr:`FeatureStats.spread`).

    A head tells images apart by feature differences of about ``spread``, so it reads the features in units of
    ``spread`` (a ``standard`` scaling divides by exactly that; an ``l2`` or unscaled head learns weights
    of about 1/``spread`` instead).  A backbone step is then amplified twice: the gradient reaching the backbone
    is multiplied by 1/``spread`` and the change of the features it makes is read at 1/``spread`` again.  The
    default learning rates suit features that vary by about 1 (pretrained backbones); features of random weights
    vary by 1e-3 to 1e-2, where the same step moved the head's input by more than its whole train spread and
    collapsed the network to chance within ten steps (docs/finetune.md, "Why fine-tuning diverged").
    """
    if spread is None or not math.isfinite(spread) or spread <= 0:
        return 1.0
    return min(1.0, float(spread) ** 2)


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``module``'s state dict on the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _cpu(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().to("cpu", copy=True)
    if isinstance(v, dict):
        return {k: _cpu(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_cpu(x) for x in v)
    return v


class Learner:
    """``net`` with its optimizer, schedule (None: constant) and loss scaler (enabled for fp16 on CUDA)."""

    def __init__(self, net: FinetuneNet, opts: FinetuneOptions, *, backbone_lr: float, cuda_amp: bool):
        self.net = net
        self.opts = opts
        self.opt = _make_optimizer(net, opts, backbone_lr)
        self.sched = _make_scheduler(self.opt, opts)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda_amp)

    @property
    def lrs(self) -> list[float]:
        """The learning rate of each group: the head's, then the backbone's."""
        return [float(g["lr"]) for g in self.opt.param_groups]

    def state(self) -> dict:
        """Weights, optimizer, scheduler and loss-scaler state, copied to the CPU."""
        return {"model": cpu_state(self.net), "optimizer": _cpu(self.opt.state_dict()),
                "scheduler": _cpu(self.sched.state_dict()) if self.sched is not None else None,
                "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}

    def load(self, state: dict) -> None:
        """Put back what :meth:`state` returned (or a checkpoint holds)."""
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and state.get("scheduler") is not None:
            self.sched.load_state_dict(state["scheduler"])
        if state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    def schedule_step(self, val_loss: float | None, train_loss: float) -> None:
        """The schedule's step after an epoch (plateau: on the validation loss, else the training loss)."""
        if self.sched is None:
            return
        if isinstance(self.sched, ReduceLROnPlateau):
            self.sched.step(val_loss if val_loss is not None else train_loss)
        else:
            self.sched.step()

    def scale_lr(self, factor: float) -> None:
        """Multiply every learning rate by ``factor``, for good: the schedule goes on from the lowered rates."""
        for g in self.opt.param_groups:
            g["lr"] *= factor
            if "initial_lr" in g:
                g["initial_lr"] *= factor
        for attr in ("base_lrs", "_last_lr"):  # the schedulers' closed forms start from these
            if getattr(self.sched, attr, None):
                setattr(self.sched, attr, [v * factor for v in getattr(self.sched, attr)])


def _make_optimizer(net: FinetuneNet, opts: FinetuneOptions, backbone_lr: float) -> torch.optim.Optimizer:
    groups: list[dict[str, Any]] = [{"params": list(net.head.parameters()), "lr": opts.lr, "name": "head"}]
    bb = [p for g in net.groups for p in g.parameters()]
    if bb:
        groups.append({"params": bb, "lr": backbone_lr, "name": "backbone"})
    if opts.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    return torch.optim.Adam(groups, lr=opts.lr, weight_decay=opts.weight_decay)


def _make_scheduler(opt: torch.optim.Optimizer, opts: FinetuneOptions) -> LRScheduler | None:
    if opts.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=opts.step_size, gamma=0.1)
    if opts.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1, patience=opts.plateau_patience)
    if opts.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, opts.epochs))
    return None


def autocast(dev: torch.device, amp: bool) -> torch.autocast:
    """Mixed precision when ``amp``: fp16 on CUDA (with the loss scaler), bf16 on the CPU."""
    return torch.autocast(dev.type, dtype=torch.float16 if dev.type == "cuda" else torch.bfloat16, enabled=amp)
