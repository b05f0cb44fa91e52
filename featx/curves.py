"""Curves: fine-tuning curves as TensorBoard event files (:class:`EventLog`), and several few-shot learning
curves in one plot (:func:`plot_curves`, a pipeline run's ``fewshot.png``).

Fine-tuning curves go to TensorBoard event files in the model directory (when ``tensorboard`` is installed).

``tensorboard --logdir <cache>/models`` then shows every fine-tuned model as a run named by its key.  One point
per epoch (step = epoch; step 0 is the network before training): ``loss/{train,val,test}``,
``accuracy/{train,val,test}``, ``lr`` and ``world_size`` (the number of torchrun processes that trained it).

A resumed run continues the same curves: the writer is opened with ``purge_step`` = the first epoch it will
write, which tells every reader to drop the points a killed run had written from that step on, and an epoch's
points are written *before* its checkpoint, so the epoch a resume starts from is always rewritten, never
duplicated, never missing.  Only rank 0 writes (the caller decides).  Without the ``tensorboard`` package
(``pip install 'featx[tensorboard]'``) nothing is written and training is unchanged.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

SCALARS = {"train_loss": "loss/train", "val_loss": "loss/val", "test_loss": "loss/test",
           "train_accuracy": "accuracy/train", "val_accuracy": "accuracy/val", "test_accuracy": "accuracy/test",
           "lr": "lr"}


class EventLog:
    """Scalars of a fine-tuning run, one step per epoch, as TensorBoard event files in ``directory``.

    Args:
        directory: the model directory.
        first_step: the first step this run writes (0 for a fresh run, ``epoch`` when resuming before it);
            points a previous, killed run wrote at this step or later are purged.
        enabled: False (ranks other than 0) writes nothing.
    """

    def __init__(self, directory: Path, *, first_step: int, enabled: bool = True):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the extra is not installed: curves stay in metrics.json, history.jsonl, curve.png
            logger.debug("tensorboard is not installed: no event files")
            return
        self.writer = SummaryWriter(log_dir=str(directory), purge_step=int(first_step))

    def write(self, step: int, record: dict, *, world_size: int = 1) -> None:
        """Write ``record``'s known values (None skipped) at ``step`` and flush them to disk."""
        if self.writer is None:
            return
        for key, tag in SCALARS.items():
            v = record.get(key)
            if v is not None:
                self.writer.add_scalar(tag, float(v), step)
        self.writer.add_scalar("world_size", float(world_size), step)
        self.writer.flush()  # a kill -9 after this epoch keeps its points

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def plot_curves(curves: Sequence[tuple[str, Sequence[tuple[int, float, float]], float | None]],
                path: str | os.PathLike, *, title: str = "") -> None:
    """Few-shot learning curves side by side: for each ``(name, [(k, mean, std), ...], full)``, the mean test
    accuracy over the draws against k (log scale) with the standard deviation as a band, and the accuracy of the
    same head on every train row (``full``, None for none) as a dotted line of the same colour."""
    from matplotlib.figure import Figure

    from featx.cache import temp_path

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ticks: set[int] = set()
    for i, (name, points, full) in enumerate(curves):
        colour = f"C{i % 10}"
        ks = [k for k, _, _ in points]
        means = [m for _, m, _ in points]
        stds = [s for _, _, s in points]
        ticks.update(ks)
        ax.plot(ks, means, marker="o", color=colour, label=name)
        ax.fill_between(ks, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=colour, alpha=0.15, linewidth=0)
        if full is not None:
            ax.axhline(full, color=colour, linestyle=":", linewidth=1)
    if ticks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ticks), [str(k) for k in sorted(ticks)])
    ax.set_xlabel("train images per class (k)")
    ax.set_ylabel("test accuracy (dotted: every train image)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    out = Path(path)
    tmp = temp_path(out)
    fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    os.replace(tmp, out)
