"""Fine-tuning curves as TensorBoard event files in the model directory (when ``tensorboard`` is installed).

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
