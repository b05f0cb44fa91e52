"""Measuring the network on the validation and test images: before any step (the head itself), and after
every epoch; and the rule that says which epoch is kept.

Under torchrun each rank evaluates a consecutive share of the images and the shares are gathered in rank
order, so every rank gets the result of the whole set, in the single process's order.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch.nn import functional as F

from featx.backbones import Preprocess
from featx.datasets import DEFAULT_MAX_PIXELS
from featx.datasets.loading import DecodeSet
from featx.errors import DataError
from featx.finetune.data import Part, batches_of, make_loader
from featx.finetune.learner import autocast
from featx.finetune.reducer import Reducer
from featx.model import FinetuneNet

logger = logging.getLogger(__name__)


class Evaluator:
    """Loss, accuracy, predictions and logits of a network on the ``val`` and ``test`` images of ``parts``.

    ``index_of``: the logit index of each class (-1 for a class the head never saw: its images count as wrong and
    are left out of the loss).
    """

    def __init__(self, parts: dict[str, Part], pre: Preprocess, dev: torch.device, index_of: np.ndarray, *,
                 amp: bool, reducer: Reducer, batch_size: int, workers: int):
        self.pre, self.dev, self.index_of, self.amp, self.reducer = pre, dev, index_of, amp, reducer
        self.loaders, self.labels = {}, {}
        for s in ("val", "test"):
            if len(parts[s][0]):
                paths, labels = reducer.share(*parts[s])
                self.labels[s] = np.asarray(labels, dtype=np.int64)
                self.loaders[s] = make_loader(DecodeSet(paths, pre, DEFAULT_MAX_PIXELS),
                                              batches_of(len(paths), batch_size), workers=workers,
                                              pin=dev.type == "cuda")

    @property
    def has_val(self) -> bool:
        return "val" in self.loaders

    def __call__(self, net: FinetuneNet) -> dict[str, dict]:
        """The evaluation of ``net`` on each split, in eval mode."""
        return {s: self.evaluate(net, s) for s in self.loaders}

    def evaluate(self, net: FinetuneNet, split: str) -> dict:
        """``loss``, ``accuracy``, ``n``, ``pred`` (class indices), ``y`` and ``logits`` of ``net`` on ``split``."""
        net.eval()
        loader = self.loaders[split]
        logits, labels, bad = [], [], 0
        label_all = self.labels[split]
        with torch.inference_mode(), autocast(self.dev, self.amp):
            for idx, pixels, skipped in loader:
                bad += len(skipped)
                if pixels is None:
                    continue
                x = self.pre.normalize(pixels.to(self.dev, non_blocking=True)).contiguous(
                    memory_format=torch.channels_last)
                logits.append(net(x).float().cpu().numpy())
                labels.append(label_all[idx])
        shares = self.reducer.gather((logits, labels, bad))
        logits = [z for share in shares for z in share[0]]
        labels = [y for share in shares for y in share[1]]
        bad = sum(share[2] for share in shares)
        if bad:
            logger.warning("%d image(s) could not be decoded during evaluation and were left out", bad)
        if not logits:
            return {"loss": None, "accuracy": None, "n": 0, "pred": np.zeros(0, int), "y": np.zeros(0, int),
                    "logits": np.zeros((0, 0), np.float32)}
        z = torch.from_numpy(np.concatenate(logits))
        y = np.concatenate(labels)
        target = torch.from_numpy(self.index_of[y])
        loss = F.cross_entropy(z, target, ignore_index=-1, reduction="sum").item() / max(1, int((target >= 0).sum()))
        logit_classes = np.nonzero(self.index_of >= 0)[0][np.argsort(self.index_of[self.index_of >= 0])]
        pred = logit_classes[z.argmax(1).numpy()]
        return {"loss": float(loss), "accuracy": float(np.mean(pred == y)), "n": int(len(y)), "pred": pred, "y": y,
                "logits": z.numpy()}

    def before_training(self, net: FinetuneNet) -> tuple[dict, dict, dict | None]:
        """``(initial, test, val)``: the network before any step, exactly the head (measured without the envelope
        that holds the features to the head's train range while training).

        Raises:
            DataError: none of the test images could be decoded.
        """
        t0 = time.perf_counter()
        env, net.envelope = net.envelope, None
        try:
            test0 = self.evaluate(net, "test")
            val0 = self.evaluate(net, "val") if self.has_val else None
        finally:
            net.envelope = env
        initial = {"test_accuracy": test0["accuracy"], "test_loss": test0["loss"],
                   "val_accuracy": val0["accuracy"] if val0 else None, "val_loss": val0["loss"] if val0 else None,
                   "seconds": round(time.perf_counter() - t0, 3)}
        if test0["accuracy"] is None:
            raise DataError("none of the feature set's test images could be decoded: the model cannot be measured")
        return initial, test0, val0


def better(rec: dict, best: dict | None) -> bool:
    """Higher validation accuracy, or the same with a lower validation loss."""
    if best is None:
        return True
    a, b = rec.get("val_accuracy"), best.get("val_accuracy")
    if a is None or b is None:
        return False
    return a > b or (a == b and rec["val_loss"] < best["val_loss"])
