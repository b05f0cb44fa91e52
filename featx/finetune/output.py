"""The model directory a fine-tuning run publishes, and how a finished one is recognized.

``model.pt`` (a plain state dict), ``model.json`` (the architecture, sealed, with ``model.pt``'s sha256),
``curve.png``, ``confusion.png`` and, last, ``metrics.json``, whose presence marks the model finished; the
checkpoint is then removed.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

import featx
from featx.cache import atomic_write_json, read_json, sha256_file, writing
from featx.finetune.checkpoint import CHECKPOINT, Progress
from featx.finetune.data import Part
from featx.finetune.learner import cpu_state
from featx.finetune.options import FinetuneOptions
from featx.metrics import metrics_for
from featx.model import MODEL_FILE, MODEL_META, FinetuneNet, HeadModel, model_json, model_problem

logger = logging.getLogger(__name__)


def finished(out: Path) -> dict | None:
    """The metrics of the finished, intact model in ``out``, or None (a damaged one is a miss: trained again)."""
    done = read_json(out / "metrics.json")
    if isinstance(done, dict) and (out / MODEL_META).exists() and (out / MODEL_FILE).exists():
        problem = model_problem(out)
        if problem is not None:
            logger.warning("model %s is damaged (%s): fine-tuning it again", out.name, problem)
            return None
        (out / CHECKPOINT).unlink(missing_ok=True)  # a run killed between finishing and tidying up
        return done
    return None


def write_model(hm: HeadModel, net: FinetuneNet, out: Path, key: str, opts: FinetuneOptions, p: Progress,
                dev: torch.device, parts: dict[str, Part], val_source: str, t_start: float, *, world_size: int = 1,
                extra: dict | None = None) -> dict:
    """Write the model (the kept epoch's weights, already in ``net``) and its metrics (the kept epoch's test
    evaluation is ``p.best_test``); the metrics."""
    from featx.plots import plot_confusion, plot_curve

    r, options = p.best_test, opts.to_json()
    classes = hm.classes
    scores = np.full((len(r["y"]), len(classes)), -np.inf, dtype=np.float32)
    scores[:, hm.logit_classes] = r["logits"]
    m = metrics_for(r["y"], r["pred"], scores, np.arange(len(classes)), classes)
    tmp = out / (".tmp-" + MODEL_FILE)
    try:
        with writing(out / MODEL_FILE):
            torch.save(cpu_state(net), tmp)
            os.replace(tmp, out / MODEL_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    model_meta = model_json(hm, net, options=options, key=key, best_epoch=p.best["epoch"])
    model_meta["files"] = {MODEL_FILE: sha256_file(out / MODEL_FILE)}
    atomic_write_json(out / MODEL_META, model_meta, seal=True)
    ips = [h["train_images_per_s"] for h in p.history]
    head_acc = head_test_accuracy(hm)
    metrics = {
        "initial_test_accuracy": p.initial["test_accuracy"], "head_test_accuracy": head_acc,
        "initial_val_accuracy": p.initial["val_accuracy"], "initial_val_loss": p.initial["val_loss"],
        "test_accuracy": m["accuracy"], "test_loss": r["loss"],
        "macro_f1": m["macro_f1"], **({"top5_accuracy": m["top5_accuracy"]} if "top5_accuracy" in m else {}),
        "best_epoch": int(p.best["epoch"]), "best_val_accuracy": p.best["val_accuracy"],
        "epochs_run": len(p.history), "stopped_early": len(p.history) < opts.epochs, "validation": val_source,
        "recoveries": [e for h in p.history for e in h.get("recoveries") or []],
        "curve": p.history, "per_class_accuracy": m["per_class_accuracy"], "confusion_matrix": m["confusion"],
        "classes": classes,
        "train_images_per_s": round(float(np.mean(ips)), 2) if ips else None,
        "images": {s: len(parts[s][0]) for s in ("train", "val", "test")},
        "options": options, "head": str(hm.head.path), "head_kind": hm.head.meta.get("kind"),
        "layer": hm.head.layer, "backbone": hm.manifest["config"]["backbone"], "weights": hm.weights_id,
        "features": hm.head.meta["source"].get("features"), "device": str(dev), "world_size": int(world_size),
        "seconds": round(time.perf_counter() - t_start, 3), "featx_version": featx.__version__,
        **(extra or {}),
    }
    title = f"fine-tuned {hm.head.meta.get('kind')} on {hm.head.layer} ({opts.unfreeze})"
    if p.history:
        plot_curve(p.history, out / "curve.png", title=title)
    plot_confusion(np.asarray(m["confusion"]), classes, out / "confusion.png",
                   title=f"{title}: test accuracy {m['accuracy']:.3f}")
    atomic_write_json(out / "metrics.json", metrics)  # last: its presence marks the model finished
    (out / CHECKPOINT).unlink(missing_ok=True)
    logger.info("fine-tuned %s: test accuracy %.4f (before: %.4f, head: %s), best epoch %d, %.1f train images/s",
                key, m["accuracy"], p.initial["test_accuracy"], fmt(head_acc), p.best["epoch"],
                metrics["train_images_per_s"] or 0.0)
    return metrics


def head_test_accuracy(hm: HeadModel) -> float | None:
    """The test accuracy the head itself recorded (``metrics.json`` of its directory)."""
    m = read_json(hm.head.path / "metrics.json")
    return float(m["test_accuracy"]) if isinstance(m, dict) and "test_accuracy" in m else None


def fmt(v: float | None, spec: str = ".4f") -> str:
    """A figure for the log (``-`` when there is none)."""
    return "-" if v is None else format(v, spec)
