"""``featx demo``: the whole pipeline on scikit-learn's 1,797 real handwritten digits, with no download.

The digits (8x8 grey images, 10 classes) are written once as an image folder under the cache
(:func:`featx.datasets.digits.write_digits`); then each stage runs on them with the library API, exactly as the
commands would, and a short summary is printed to stderr.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from featx import interrupt
from featx.cache import cache_root
from featx.datasets.digits import write_digits
from featx.errors import WeightsError

logger = logging.getLogger(__name__)


def _say(msg: str) -> None:
    import click

    click.echo(msg, err=True)


def run_demo(*, weights: str | None = None, cache: str | os.PathLike | None = None, device: str = "auto",
             limit: int | None = None) -> Path:
    """Run the demo and return the directory of its last output.

    Args:
        weights: ``imagenet``, ``random`` or a state-dict path; default: ImageNet if available, else random
            (with a notice).
        limit: use only the first ``limit`` digits (tests); default all 1,797.
    """
    from featx.extract import ExtractResult, extract

    root = cache_root(cache)
    data = write_digits(root / "demo" / ("digits" if limit is None else f"digits-{limit}"), limit=limit)

    def features(w: str) -> ExtractResult:
        res = extract(data, layers=["pool5"], weights=w, split="test=0.15,val=0.1", seed=0, cache=root, device=device)
        assert isinstance(res, ExtractResult)  # (a StagePlan only when asked for one)
        return res

    if weights is None:
        try:
            res = features("imagenet")
            weights = "imagenet"
        except WeightsError as e:
            _say(f"featx demo: notice: ImageNet weights are not available here ({e}).")
            _say("featx demo: notice: using seeded RANDOM weights instead: the accuracies below show the pipeline "
                 "working, not what pretrained features reach.")
            weights = "random"
            res = features("random")
    else:
        res = features(weights)
    m = res.manifest
    lines = [
        "",
        "featx demo summary",
        f"  data      scikit-learn digits: {m['n_images']} images, {len(m['classes'])} classes, split {m['counts']}",
        f"  features  alexnet pool5 ({m['dims']['pool5']} values per image), {weights} weights"
        + (f", {m['timings']['images_per_s']} images/s" if res.computed else " (from the cache)"),
        f"  skipped   {len(m['skipped'])} file(s)",
    ]
    last = res.path
    interrupt.check("demo.stage")  # between stages; each stage also stops between its own units
    _fit_heads(res.path, root, device, lines)
    interrupt.check("demo.stage")
    best = _search(res.path, root, device, lines)
    interrupt.check("demo.stage")
    last = _finetune_and_predict(best, root, device, lines, data)
    lines.append(f"  output    {last}")
    if weights == "random":
        lines.append("  note      random weights: these accuracies show the pipeline working, not what pretrained "
                     "ImageNet features reach.")
    _say("\n".join(lines))
    return last


def _fit_heads(features: Path, root: Path, device: str, lines: list[str]) -> dict[str, Path]:
    from featx.fit import FitResult, fit_head

    out = {}
    for kind, params in (("svm", {"C": 0.01}), ("logreg", {"C": 1.0}), ("mlp", {"hidden": 256, "epochs": 30})):
        interrupt.check("demo.stage")
        r = fit_head(features, kind, params=params, cache=root, device=device)
        assert isinstance(r, FitResult)
        out[kind] = r.path
        m = r.metrics
        lines.append(f"  fit {kind:<6} test accuracy {m['test_accuracy']:.3f} (train {m['train_accuracy']:.3f}, "
                     f"{m['fit_seconds']:.1f}s)")
    return out


def _search(features: Path, root: Path, device: str, lines: list[str]) -> Path:
    from featx.search import search

    r = search(features, "logreg", trials=8, cache=root, device=device)
    s = r.search
    lines.append(f"  search    logreg, {s['trials']} trials in study {s['study']}: best validation accuracy "
                 f"{s['best_value']:.3f} (C={s['best_params']['C']:.3g}, {s['best_params']['scale']}), "
                 f"refit test accuracy {r.metrics['test_accuracy']:.3f}")
    return r.path


def _finetune_and_predict(head: Path, root: Path, device: str, lines: list[str], data: Path) -> Path:
    from featx.finetune import FinetuneOptions, FinetuneResult, finetune
    from featx.predict import predict

    r = finetune(head, FinetuneOptions(epochs=1, unfreeze="all", lr=1e-3), cache=root, device=device)
    assert isinstance(r, FinetuneResult)
    m = r.metrics
    lines.append(f"  finetune  1 epoch from the best searched head, all layers: test accuracy "
                 f"{m['initial_test_accuracy']:.3f} before, {m['test_accuracy']:.3f} after")
    imgs = sorted(data.rglob("*.png"))[::400][:4]
    preds = predict(r.path, [str(p) for p in imgs], device=device)
    shown = ", ".join(f"{Path(p['path']).parent.name}/{Path(p['path']).name} -> "
                      f"{p['class'] if not p.get('error') else p['error']}" for p in preds)
    lines.append(f"  predict   {shown}")
    return r.path
