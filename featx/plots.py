"""PNG plots saved beside each output: confusion matrices, training curves, search histories.

matplotlib runs headless (Agg) and is imported only when a plot is drawn: its object-oriented ``Figure``, not
``pyplot``, which costs more to import and keeps a registry of open figures we do not need.  A command that will
draw once its computation is done calls :func:`preload` first: matplotlib (~0.8 s of one core) is then imported on a
background thread while the computation runs (mostly BLAS, which releases the GIL), and the drawing waits for it.
"""
from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_DPI = 110
_preloading: threading.Thread | None = None
_prepared: dict[tuple[str, ...], _ConfusionFigure] = {}  # built by the preload thread, taken by plot_confusion


def preload(confusion_classes: Sequence[str] | None = None) -> None:
    """Start importing matplotlib's ``Figure`` and Agg canvas on a background thread, and there build the frame of
    the confusion plot for ``confusion_classes`` (axes, ticks, labels and their layout) when they are given.

    Harmless: does nothing while an earlier preload still runs; any error is left for the drawing itself to raise.
    """
    global _preloading
    if _preloading is not None and _preloading.is_alive():
        return
    if confusion_classes is None and "matplotlib.backends.backend_agg" in sys.modules:
        return

    def run() -> None:
        try:
            if confusion_classes is not None:
                frame = _ConfusionFigure(confusion_classes)
                _prepared.clear()  # one frame at most: that of the plot coming next
                _prepared[frame.key] = frame
            else:
                from matplotlib.backends.backend_agg import FigureCanvasAgg
                from matplotlib.figure import Figure

                fig = Figure(figsize=(1, 1))  # one tiny draw: loads the font, builds the text and tick machinery
                fig.subplots().set_title("0", fontsize=7)
                FigureCanvasAgg(fig).draw()
        except Exception:  # noqa: BLE001 - the real drawing reports it
            pass

    _preloading = threading.Thread(target=run, name="featx-plot-preload", daemon=True)
    _preloading.start()


def _wait_preload() -> None:
    if _preloading is not None:
        _preloading.join()  # never import matplotlib from two threads at once


def _figure(**kw):
    _wait_preload()
    from matplotlib.figure import Figure

    return Figure(**kw)


def _save(fig, path: str | os.PathLike, bbox_inches: Any = "tight") -> None:
    from featx.cache import temp_path, writing

    path = Path(path)
    tmp = temp_path(path)
    try:
        with writing(path):
            fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches=bbox_inches)
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _ConfusionFigure:
    """The confusion plot in two steps: the frame, which depends only on the classes (built ahead, on the preload
    thread, while the head fits), then the counts and the title.

    Saved with the bounding box that ``bbox_inches="tight"`` would compute, measured here on the Agg renderer that
    the frame's layout already used, so that saving draws the figure once instead of twice (the same pixels; ~0.2 s
    less for 20 classes).
    """

    def __init__(self, classes: Sequence[str]) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.key = tuple(str(c) for c in classes)
        k = len(self.key)
        size = min(12.0, 3.0 + 0.35 * k)
        self.fig = Figure(figsize=(size, size), dpi=_DPI)
        FigureCanvasAgg(self.fig)
        ax = self.ax = self.fig.subplots()
        self.image = ax.imshow(np.zeros((k, k)), cmap="Blues", vmin=0, vmax=1)
        if k <= 40:
            ax.set_xticks(range(k), list(self.key), rotation=90, fontsize=7)
            ax.set_yticks(range(k), list(self.key), fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        self.fig.get_tightbbox(_renderer(self.fig))  # lays out the ticks and labels on that renderer

    def save(self, cm: np.ndarray, path: str | os.PathLike, title: str) -> None:
        import matplotlib

        k = len(self.key)
        cm = np.asarray(cm, dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            norm = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
        ax = self.ax
        self.image.set_data(norm)
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    if cm[i, j]:
                        ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                                color="white" if norm[i, j] > 0.5 else "black")
        ax.set_title(title, fontsize=9)
        bbox = self.fig.get_tightbbox(_renderer(self.fig))
        _save(self.fig, path, bbox_inches=bbox.padded(matplotlib.rcParams["savefig.pad_inches"]))


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: str | os.PathLike, *, title: str = "") -> None:
    """Row-normalized confusion matrix (true class per row), counts written in cells when there is room."""
    _wait_preload()
    key = tuple(str(c) for c in classes)
    frame = _prepared.pop(key, None) or _ConfusionFigure(classes)
    frame.save(cm, path, title)


def plot_curve(history: Sequence[dict], path: str | os.PathLike, *, title: str = "") -> None:
    """Loss and accuracy per epoch (whatever of train/val/test loss and accuracy the history holds)."""
    fig = _figure(figsize=(9, 3.5))
    a1, a2 = fig.subplots(1, 2)
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    for key in sorted({k for h in history for k in h}):
        vals = [h.get(key) for h in history]
        if not all(isinstance(v, (int, float)) for v in vals) or key in ("epoch", "seconds", "lr"):
            continue
        ax = a1 if "loss" in key else a2 if "acc" in key else None
        if ax is not None:
            ax.plot(epochs, vals, label=key, marker=".")
    for side, what in ((a1, "loss"), (a2, "accuracy")):
        side.set_xlabel("epoch")
        side.set_ylabel(what)
        side.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def plot_results(cases: Sequence[tuple[str, float | None]], references: Sequence[tuple[float, str, Sequence[str]]],
                 path: str | os.PathLike, *, title: str = "") -> None:
    """Test accuracy per case (one horizontal bar each; a failed case is an empty row marked "failed") with each
    reference drawn as a dashed vertical line labelled with its source."""
    n = max(1, len(cases))
    fig = _figure(figsize=(8, 1.2 + 0.32 * n))
    ax = fig.subplots()
    names = [c for c, _ in cases]
    vals = [a if a is not None else 0.0 for _, a in cases]
    ax.barh(range(len(cases)), vals, color="#4c72b0")
    for i, (_, a) in enumerate(cases):
        ax.text((a or 0.0) + 0.005, i, "failed" if a is None else f"{100 * a:.1f}%", va="center", fontsize=7)
    for j, (acc, label, _) in enumerate(references):
        ax.axvline(acc, color=f"C{(j + 1) % 10}", linestyle="--", linewidth=1, label=f"{100 * acc:.2f}% {label}")
    ax.set_yticks(range(len(cases)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("test accuracy")
    if references:
        ax.legend(fontsize=6, loc="lower right")
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def plot_fewshot(means: Sequence[tuple[int, float, float]], draws: Sequence[tuple[int, float]], full: float | None,
                 path: str | os.PathLike, *, title: str = "") -> None:
    """A few-shot learning curve: test accuracy against images per class (log scale), the mean of the draws with
    their standard deviation as error bars, each draw as a faint dot, and the head fitted on every train row as a
    dashed horizontal line."""
    fig = _figure(figsize=(6, 4))
    ax = fig.subplots()
    if draws:
        ax.scatter([k for k, _ in draws], [a for _, a in draws], s=8, color="#4c72b0", alpha=0.25, label="draws")
    ks = [k for k, _, _ in means]
    ax.errorbar(ks, [m for _, m, _ in means], yerr=[s for _, _, s in means], marker="o", capsize=3,
                color="#4c72b0", label="mean +- std over the draws")
    if full is not None:
        ax.axhline(full, color="C1", linestyle="--", linewidth=1, label=f"all train rows: {100 * full:.1f}%")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("train images per class (k)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def _renderer(fig) -> Any:
    """The renderer of ``fig``'s canvas (an Agg canvas: ``get_renderer`` is not on the base class's type)."""
    canvas: Any = fig.canvas
    return canvas.get_renderer()
