"""The divergence guard: a fine-tuning epoch that diverges is retried at a lower learning rate, or the run stops
with one line, never silently.

Each step's loss is checked before ``backward`` (so the step then changes nothing) and its gradient norm after;
the validation and test losses after each epoch too (docs/finetune.md, "the guard").  A step diverges when
the loss or the gradient norm is not finite, or when the training loss explodes: the mean of the last
``EXPLODE_WINDOW`` step losses above ``EXPLODE_FACTOR`` x the larger of chance level (log k, the loss of a
uniform guess over the k logits) and the epoch's first step's loss.  An epoch diverges at its evaluation when a
loss is not finite or the validation loss is above ``VAL_EXPLODE_FACTOR`` x the larger of log k and the
validation loss the epoch started from.  The epoch is then run again from the weights, optimizer, scheduler and
loss-scaler state it started with, at ``RECOVER_FACTOR`` x every learning rate, at most ``recover`` times in
the whole run; then :class:`~featx.errors.DivergenceError`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

from featx.errors import DivergenceError
from featx.finetune.checkpoint import Progress
from featx.finetune.learner import Learner

logger = logging.getLogger(__name__)

RECOVER_FACTOR = 0.5  # a diverged epoch is retried at this times the learning rate
EXPLODE_WINDOW = 5
EXPLODE_FACTOR = 10.0
VAL_EXPLODE_FACTOR = 3.0

T = TypeVar("T")


class Diverged(Exception):
    """A non-finite or exploding loss, or a non-finite gradient, at ``epoch``/``step`` (``step`` 0: in the
    evaluation after the epoch); ``limit`` and ``why``: the threshold an exploding (finite) value passed."""

    def __init__(self, epoch: int, step: int, what: str, value: float, *, limit: float | None = None,
                 why: str = ""):
        self.epoch, self.step, self.what, self.value, self.limit, self.why = epoch, step, what, value, limit, why
        super().__init__(f"{what} is {self.shown} at epoch {epoch}, step {step}")

    @property
    def shown(self) -> str:
        """The value as said in the log and the error: ``nan``, or ``123.4, above 23.03 (10 x ...)``."""
        if self.limit is None or not math.isfinite(self.value):
            return str(self.value)
        return f"{self.value:.4g}, above {self.limit:.4g} ({self.why})"


def grad_norm(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, clip_grad: float | None) -> float:
    """The L2 norm of every gradient of the step (unscaled first under AMP); clipped to ``clip_grad`` if given."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return 0.0
    if scaler.is_enabled():
        scaler.unscale_(opt)  # clipping and the check must see the true gradients; step() will not unscale twice
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if clip_grad and bool(torch.isfinite(norm)):
        torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm)
    return float(norm)


class DivergenceGuard:
    """The checks of one run (``chance``: log k) and its retry rule (``recover`` retries in all).

    ``undo`` names the options a user who diverged should turn off first (``--no-scale-backbone-lr``,
    ``--backbone-dropout``) when they are on.
    """

    def __init__(self, *, chance: float, recover: int, undo: tuple[str, ...] = ()):
        self.chance = chance
        self.recover = recover
        self.undo = undo

    # ------------------------------------------------------------------ the checks
    def train_limit(self, losses: list[float]) -> float:
        return EXPLODE_FACTOR * max(self.chance, losses[0])

    def record_loss(self, losses: list[float], value: float, epoch: int, step: int) -> None:
        """Add a step's loss (over every rank) to the epoch's ``losses``, raising :class:`Diverged` first when it
        is not finite, or after when the last ones explode."""
        if not math.isfinite(value):
            raise Diverged(epoch, step, "the loss", value)
        losses.append(value)
        recent = losses[-EXPLODE_WINDOW:]
        limit = self.train_limit(losses)
        if sum(recent) / len(recent) > limit:
            raise Diverged(epoch, step, f"the training loss (mean of the last {len(recent)} steps)",
                           sum(recent) / len(recent), limit=limit,
                           why=f"{EXPLODE_FACTOR:g} x the larger of chance level log(k) = {self.chance:.3g} "
                               f"and the epoch's first loss {losses[0]:.3g}")

    def check_grad(self, norm: float, scaler: torch.amp.GradScaler, epoch: int, step: int) -> None:
        # with fp16 loss scaling an overflowing gradient is expected now and then: the scaler skips that step
        # and lowers its scale, so only an unscaled non-finite gradient is divergence
        if not math.isfinite(norm) and not scaler.is_enabled():
            raise Diverged(epoch, step, "the gradient norm", norm)

    def check_evaluation(self, results: dict[str, dict], before: float | None, epoch: int) -> None:
        """``results``: the epoch's evaluations by split; ``before``: the validation loss the epoch started from."""
        for s, r in results.items():
            if r["loss"] is not None and not math.isfinite(r["loss"]):
                raise Diverged(epoch, 0, f"the {'validation' if s == 'val' else s} loss", r["loss"])
        val = results.get("val")
        if val is not None and val["loss"] is not None and before is not None:
            limit = VAL_EXPLODE_FACTOR * max(self.chance, before)
            if val["loss"] > limit:
                raise Diverged(epoch, 0, "the validation loss", val["loss"], limit=limit,
                               why=f"{VAL_EXPLODE_FACTOR:g} x the larger of chance level log(k) = "
                                   f"{self.chance:.3g} and the validation loss before the epoch, {before:.3g}")

    def loss_figures(self, losses: list[float]) -> dict:
        """What the training check compared, for the epoch's record: the largest mean of ``EXPLODE_WINDOW``
        consecutive step losses (``train_loss_peak``) and its limit (``train_loss_limit``)."""
        if not losses:
            return {}
        windows = [np.mean(losses[max(0, i + 1 - EXPLODE_WINDOW):i + 1]) for i in range(len(losses))]
        return {"train_loss_peak": round(float(max(windows)), 4),
                "train_loss_limit": round(self.train_limit(losses), 4)}

    # ------------------------------------------------------------------ the retry rule
    def run(self, epoch: int, attempt: Callable[[], T], learner: Learner, progress: Progress) -> T:
        """``attempt()`` (one epoch and its evaluation), run again from the state it started with at a lower
        learning rate while it raises :class:`Diverged`; each retry is recorded in ``progress.recoveries``.

        Raises:
            DivergenceError: no retry left (nothing of the epoch is kept).
        """
        snap = learner.state()
        while True:
            try:
                return attempt()
            except Diverged as d:
                used = sum(len(h.get("recoveries") or []) for h in progress.history) + len(progress.recoveries)
                if used >= self.recover:
                    raise DivergenceError(self.message(d, used, learner, epoch)) from None
                learner.load(snap)
                lrs = learner.lrs
                learner.scale_lr(RECOVER_FACTOR)
                snap = learner.state()
                progress.recoveries.append({"epoch": d.epoch, "step": d.step, "what": d.what, "value": str(d.value),
                                            **({"limit": d.limit} if d.limit is not None else {}),
                                            "lr_before": lrs[0], "lr_after": learner.lrs[0]})
                left = self.recover - used - 1
                logger.warning("epoch %d, %s: %s is %s; back to the weights and optimizer state the epoch started "
                               "with, retrying it at %g x the learning rate (head %.3g%s); %d more retr%s allowed "
                               "(--recover)", epoch, f"step {d.step}" if d.step else "evaluation", d.what, d.shown,
                               RECOVER_FACTOR, learner.lrs[0],
                               f", backbone {learner.lrs[1]:.3g}" if len(lrs) > 1 else "",
                               left, "y" if left == 1 else "ies")

    def message(self, d: Diverged, used: int, learner: Learner, epoch: int) -> str:
        """The one line a run that gave up on divergence ends with: what happened, what was kept, what to change."""
        lr = learner.lrs[0]
        lrs = ", ".join(f"{g.get('name', 'head')} lr {g['lr']:.3g}" for g in learner.opt.param_groups)
        where = f"step {d.step}" if d.step else "its evaluation"
        again = (f", still after {used} retr{'y' if used == 1 else 'ies'} at {RECOVER_FACTOR:g}x the learning rate"
                 if used else "")
        kept = f"the checkpoint of epoch {epoch - 1} is left as it was" if epoch > 1 else "no epoch had finished"
        first = f"without {' and '.join(self.undo)}, " if self.undo else ""
        return (f"fine-tuning diverged: {d.what} was {d.shown} at epoch {d.epoch}, {where}{again} ({lrs}); "
                f"nothing of epoch {epoch} was written and {kept}: run again {first}with a lower --lr (e.g. "
                f"{lr / 10:.3g}) or --backbone-lr-factor, --clip-grad 1.0, --unfreeze head, or a larger --recover")
