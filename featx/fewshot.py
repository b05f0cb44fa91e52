"""``featx fewshot``: few-shot learning curves on cached features, the linear-probe benchmarks' k-shot protocol.

For each k of ``shots`` and each of ``draws`` seeded draws, a head is fitted on k train images of every class and
tested on the whole test split; the curve is the mean (and standard deviation) of the draws' test accuracy against
k, beside the accuracy of the same head fitted on every train row.  Only cached rows are read: no image is opened.

The protocol (docs/fewshot.md):

* **Draws.** Draw ``r`` shuffles the train images of each class with a generator seeded by ``(seed, r)``; its k-shot
  training set is the first k images of every class.  The sets of one draw are nested (the 2-shot set holds the
  1-shot one), which makes the curve of a draw a curve and not noise; the draws are independent of one another.
  An image is drawn with all its rows (its views), so k counts images, as in the papers.
* **Scaling.** ``standard`` scaling uses the mean and standard deviation of *all* the train rows, labels unused:
  the unlabelled images are in the feature set anyway, and statistics of 1-16 rows per class would be noise (a
  1-shot draw of 10 classes has 10 rows to estimate thousands of variances from).  Computed once, they are
  exactly what every draw would compute, so all draws share them.  ``l2`` and ``none`` use no other row at all.
* **Heads.** Every draw is fitted from scratch (no warm start from another draw): a warm start changes where the
  solver stops within its tolerance, so a draw's result would depend on the draws fitted before it, and a resumed
  run would not end equal to an uninterrupted one.
* **Scores.** Accuracy and balanced accuracy (the mean recall over the classes of the test split) on every test
  row; the standard deviation is over the draws (``ddof=1``; 0 for a single draw).

The output is a directory ``<cache>/fewshot/<key>/`` whose key hashes the features, the layer, the head and its
parameters, the scaling, the shots, the number of draws and the seed.  Each finished draw is written at once
(``draws/``), so a stopped run keeps its draws and the same command continues it and ends with the same numbers.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import featx
from featx import interrupt
from featx.cache import (
    DIGEST_FIELD,
    StagePlan,
    atomic_write_bytes,
    atomic_write_json,
    cache_root,
    hash_key,
    read_sealed_json,
    write_command,
)
from featx.devices import resolve_device_type
from featx.errors import DataError, IntegrityError, UsageError
from featx.fit import Rows, Scaler, make_head, open_rows, source_identity
from featx.locks import hold
from featx.metrics import confusion

logger = logging.getLogger(__name__)

PROTOCOL = 1  # bump when the draws or the scores change meaning: a new key
DEFAULT_SHOTS = (1, 2, 4, 8, 16)
CSV_FIELDS = ("k", "draw", "accuracy", "balanced_accuracy")


@dataclass
class FewshotResult:
    """What :func:`fewshot` produced: its directory, whether it was computed now, the summary and every draw."""

    path: Path
    computed: bool
    summary: dict
    draws: list[dict] = field(default_factory=list)


def parse_shots(shots: str | Sequence[int]) -> list[int]:
    """``"1,2,4,8,16"`` (or a list of ints) -> sorted distinct positive ints; anything else is a UsageError."""
    parts = shots.split(",") if isinstance(shots, str) else list(shots)
    try:
        ks = sorted({int(str(p).strip()) for p in parts if str(p).strip()})
    except ValueError:
        raise UsageError(f"--shots {shots!r}: give whole numbers separated by commas, e.g. 1,2,4,8,16") from None
    if not ks or ks[0] < 1:
        raise UsageError(f"--shots {shots!r}: give one or more numbers of images per class, each at least 1")
    return ks


def train_images(rows: Rows) -> list[list[np.ndarray]]:
    """Per class, the train images as arrays of their row positions among the train rows, in row order.  Rows of one
    image (its views) share a path; a feature file without paths has one row per image."""
    train = np.flatnonzero(rows.mask("train"))
    labels = rows.labels[train]
    try:
        paths = rows.fs.column("path")[train]
    except DataError:  # a plain HDF5 file without a path column: each row is an image
        paths = np.arange(len(train)).astype(str)
    _, first, inverse = np.unique(paths, return_index=True, return_inverse=True)
    out: list[list[np.ndarray]] = [[] for _ in rows.classes]
    for img in np.argsort(first, kind="stable"):  # images in the order of their first row
        pos = np.flatnonzero(inverse == img)
        out[int(labels[pos[0]])].append(pos)
    return out


def check_shots(rows: Rows, images: list[list[np.ndarray]], shots: Sequence[int]) -> None:
    """k must not exceed the train images of the smallest class (named, with its count)."""
    counts = [len(c) for c in images]
    smallest = int(np.argmin(counts))
    if max(shots) > counts[smallest]:
        raise UsageError(f"--shots {max(shots)} is more than the {counts[smallest]} train image(s) of class "
                         f"{rows.classes[smallest]!r}, the smallest class: use shots of at most {counts[smallest]}")


def draw_rows(images: list[list[np.ndarray]], shots: Sequence[int], draws: int,
              seed: int) -> dict[tuple[int, int], np.ndarray]:
    """``{(k, r): positions among the train rows}``: draw ``r`` shuffles each class's images with
    ``default_rng([seed, r])`` and takes the first k of each class (nested in k, independent across draws)."""
    out = {}
    for r in range(draws):
        rng = np.random.default_rng([seed, r])
        perms = [rng.permutation(len(c)) for c in images]
        for k in shots:
            pos = [images[c][i] for c in range(len(images)) for i in perms[c][:k]]
            out[(k, r)] = np.sort(np.concatenate(pos))
    return out


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """The mean recall over the classes present in ``y`` (scikit-learn's ``balanced_accuracy_score``)."""
    cm = confusion(y, pred, n_classes)
    support = cm.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present])) if present.any() else float("nan")


@dataclass
class _Problem:
    """The scaled train and test rows (loaded and scaled once, shared by every draw) and how to make a head."""

    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    train_rows: np.ndarray  # the feature set's row number of each train row
    n_classes: int
    kind: str
    params: dict

    def score(self, pos: np.ndarray | None, random_state: int) -> dict:
        """Fit a fresh head on the train rows ``pos`` (all when None) and score it on the test rows."""
        X, y = (self.X, self.y) if pos is None else (self.X[pos], self.y[pos])
        est = make_head(self.kind, {**self.params, "random_state": int(random_state)})
        est.fit(X, y)
        pred = np.asarray(est.predict(self.X_test))
        return {"accuracy": float(np.mean(pred == self.y_test)),
                "balanced_accuracy": balanced_accuracy(self.y_test, pred, self.n_classes),
                "n_train_rows": int(len(y))}


def _head_params(kind: str, params: dict | None, device: str) -> tuple[dict, dict]:
    """The parameters each fit gets, and the resolved ones the key hashes (without device and callbacks)."""
    params = dict(params or {})
    accepts = make_head(kind, {}).get_params()
    if "device" in accepts:
        params.setdefault("device", resolve_device_type(device))
    if "epoch_callback" in accepts:
        params.setdefault("epoch_callback", _stop_between_epochs)
    resolved = {k: v for k, v in make_head(kind, params).get_params().items()
                if k not in ("device", "epoch_callback", "random_state")}
    return params, resolved


def _stop_between_epochs(epoch: int, val_accuracy: float) -> None:
    interrupt.check("fewshot.epoch")


def fewshot(features: str | os.PathLike, *, shots: str | Sequence[int] = DEFAULT_SHOTS, draws: int = 10,
            head: str = "logreg", params: dict | None = None, layer: str | None = None, scale: str = "standard",
            seed: int = 0, split: str | None = None, device: str = "auto", cache: str | os.PathLike | None = None,
            plan: bool = False) -> FewshotResult | StagePlan:
    """Few-shot learning curve of ``head`` on ``layer`` of ``features``: for each k of ``shots``, ``draws`` heads
    fitted on k train images per class, each tested on the whole test split (see the module's docstring).

    Args:
        features: a feature-set directory or an HDF5 file (only its rows are read).
        shots: images per class, ``"1,2,4,8,16"`` or a list.  draws: draws per k.
        head, params: the head (``logreg``, ``svm``, ``mlp``) and its parameters (``{"C": 0.1}``).
        layer: the feature layer (default: the set's first).  scale: ``standard`` (statistics of all train rows),
            ``l2`` or ``none``.  seed: seeds the draws (and the heads).  split: the split to make when the features
            record none (a plain HDF5 file).  device: where torch heads compute.
        plan: compute nothing: a :class:`~featx.cache.StagePlan` saying where the curve is and whether it is done.

    Returns:
        :class:`FewshotResult` (``plan``: :class:`~featx.cache.StagePlan`).

    Raises:
        UsageError: bad shots or draws, k above the smallest class's train images, unknown head or parameter.
        DataError: unknown layer, no test split, a single class.

    Example:
        >>> fewshot("cache/features/0123abcd", shots="1,2,4", draws=5).path  # doctest: +SKIP
    """
    ks = parse_shots(shots)
    if int(draws) < 1:
        raise UsageError(f"--draws {draws}: give at least 1")
    if int(seed) < 0:
        raise UsageError(f"--seed {seed}: give a number of at least 0")
    Scaler(scale)  # an unknown scaling is refused before anything is read
    rows = open_rows(features, layer, split=split, seed=seed)
    run_params, resolved = _head_params(head, params, device)
    images = train_images(rows)
    check_shots(rows, images, ks)
    source = source_identity(rows)
    key = hash_key({"source": source, "split": rows.splits.tolist() if rows.fs.kind == "h5" else None,
                    "shots": ks, "draws": int(draws), "head": head, "params": resolved, "scale": scale,
                    "seed": int(seed), "protocol": PROTOCOL, "featx": featx.__version__.split(".")[0]})
    out = cache_root(cache) / "fewshot" / key
    done = _finished(out)
    if plan:
        return StagePlan(out, done is not None, {"key": key})
    if done is not None:
        logger.info("few-shot curve %s is already complete", key)
        return FewshotResult(out, False, done, _read_draws(out, done))
    with hold(out, what=f"few-shot curve {key}"):
        done = _finished(out)  # another process may have finished it while we waited
        if done is not None:
            return FewshotResult(out, False, done, _read_draws(out, done))
        write_command(out, _command(features, ks, int(draws), head, params or {}, rows.layer, scale, int(seed),
                                    split, cache_root(cache)))
        config = {"key": key, "features": str(rows.fs.path), "source": source, "layer": rows.layer, "head": head,
                  "params": resolved, "scale": scale, "seed": int(seed), "shots": ks, "draws": int(draws),
                  "protocol": PROTOCOL}
        summary, records = _compute(out, rows, images, ks, int(draws), int(seed), head, run_params, scale, config)
    return FewshotResult(out, True, summary, records)


def _compute(out: Path, rows: Rows, images: list[list[np.ndarray]], ks: list[int], draws: int, seed: int, kind: str,
             params: dict, scale: str, config: dict) -> tuple[dict, list[dict]]:
    """Load and scale the rows once, fit every draw not yet on disk (each written as it finishes), then the
    full-data head, and write the CSV, the plot and the summary (last: it marks the directory complete)."""
    t0 = time.perf_counter()
    X = rows.load("train")
    X_test = rows.load("test")
    scaler = Scaler(scale).fit(X)
    scaler.transform_(X)
    scaler.transform_(X_test)
    problem = _Problem(X, rows.labels[rows.mask("train")], X_test, rows.labels[rows.mask("test")],
                       np.flatnonzero(rows.mask("train")), len(rows.classes), kind, params)
    t_load = time.perf_counter() - t0
    chosen = draw_rows(images, ks, draws, seed)
    records, fitted = [], 0
    for k in ks:
        for r in range(draws):
            rec = _draw(out, problem, k, r, chosen[(k, r)], seed)
            fitted += rec.pop("_fitted")
            records.append(rec)
    full = _draw(out, problem, 0, 0, None, seed)
    fitted += full.pop("_fitted")
    summary = _summarize(config, records, full, problem, ks)
    summary["timings"] = {"load_s": round(t_load, 3), "total_s": round(time.perf_counter() - t0, 3),
                          "fits_now": fitted}
    _write_outputs(out, summary, records)
    for s in summary["per_k"]:
        logger.info("k=%d: accuracy %.4f +- %.4f, balanced %.4f +- %.4f over %d draws (%d distinct)", s["k"],
                    s["accuracy_mean"], s["accuracy_std"], s["balanced_accuracy_mean"], s["balanced_accuracy_std"],
                    s["n_draws"], s["distinct_draws"])
    logger.info("all %d train rows: accuracy %.4f, balanced %.4f", full["n_train_rows"], full["accuracy"],
                full["balanced_accuracy"])
    return summary, records


def _draw(out: Path, problem: _Problem, k: int, r: int, pos: np.ndarray | None, seed: int) -> dict:
    """One draw (``k = 0``: every train row), read back when a previous run finished it, else fitted and written."""
    path = out / "draws" / (f"k{k:04d}-d{r:04d}.json" if k else "full.json")
    rows = [] if pos is None else problem.train_rows[pos].tolist()
    saved = _read_sealed(path)
    if saved is not None and saved.get("k") == k and saved.get("draw") == r and saved.get("train_rows") == rows:
        return {**saved, "_fitted": 0}
    interrupt.check("fewshot.draw")  # between draws: a stop keeps every finished one
    state = int(np.random.SeedSequence([seed, k, r]).generate_state(1)[0])
    rec = {"k": k, "draw": r, **problem.score(pos, state), "train_rows": rows}
    atomic_write_json(path, rec, seal=True)
    return {**rec, "_fitted": 1}


def _summarize(config: dict, records: list[dict], full: dict, problem: _Problem, ks: list[int]) -> dict:
    per_k = []
    for k in ks:
        mine = [r for r in records if r["k"] == k]
        acc = np.array([r["accuracy"] for r in mine])
        bal = np.array([r["balanced_accuracy"] for r in mine])
        ddof = 1 if len(mine) > 1 else 0
        per_k.append({"k": k, "n_draws": len(mine), "distinct_draws": len({tuple(r["train_rows"]) for r in mine}),
                      "n_train_rows": int(mine[0]["n_train_rows"]),
                      "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(ddof=ddof)),
                      "balanced_accuracy_mean": float(bal.mean()), "balanced_accuracy_std": float(bal.std(ddof=ddof))})
    return {**config, "per_k": per_k,
            "full": {k: full[k] for k in ("accuracy", "balanced_accuracy", "n_train_rows")},
            "n_test_rows": int(len(problem.y_test)), "featx_version": featx.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _write_outputs(out: Path, summary: dict, records: list[dict]) -> None:
    from featx.plots import plot_fewshot

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in records:
        w.writerow([r["k"], r["draw"], repr(float(r["accuracy"])), repr(float(r["balanced_accuracy"]))])
    atomic_write_bytes(out / "fewshot.csv", buf.getvalue().encode())
    plot_fewshot([(s["k"], s["accuracy_mean"], s["accuracy_std"]) for s in summary["per_k"]],
                 [(r["k"], r["accuracy"]) for r in records], summary["full"]["accuracy"], out / "fewshot.png",
                 title=f"{summary['head']} on {summary['layer']}: {summary['draws']} draws per k")
    atomic_write_json(out / "summary.json", summary, seal=True)


def _finished(out: Path) -> dict | None:
    """The summary of a complete directory (sealed summary, CSV and plot present), else None."""
    s = _read_sealed(out / "summary.json")
    return s if s is not None and (out / "fewshot.csv").is_file() and (out / "fewshot.png").is_file() else None


def _read_sealed(path: Path) -> dict | None:
    """A sealed record without its digest; None when missing, damaged, edited or unsealed (then made again)."""
    try:
        obj = read_sealed_json(path)
    except IntegrityError:
        return None
    if obj is None or DIGEST_FIELD not in obj:
        return None
    return {k: v for k, v in obj.items() if k != DIGEST_FIELD}


def _read_draws(out: Path, summary: dict) -> list[dict]:
    recs = []
    for k in summary["shots"]:
        for r in range(summary["draws"]):
            rec = _read_sealed(out / "draws" / f"k{k:04d}-d{r:04d}.json")
            if rec is not None:
                recs.append(rec)
    return recs


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``fewshot.csv`` (``k`` and ``draw`` as ints, the scores as floats)."""
    with open(path, newline="") as f:
        return [{"k": int(r["k"]), "draw": int(r["draw"]), "accuracy": float(r["accuracy"]),
                 "balanced_accuracy": float(r["balanced_accuracy"])} for r in csv.DictReader(f)]


def _command(features, ks: list[int], draws: int, head: str, params: dict, layer: str, scale: str, seed: int,
             split: str | None, cache: Path) -> list[str]:
    """The ``featx fewshot`` command line that makes this curve (and so finishes or repairs it)."""
    argv = ["featx", "fewshot", str(Path(features).expanduser().absolute()), "--shots", ",".join(map(str, ks)),
            "--draws", str(draws), "--head", head, "--layer", layer, "--scale", scale, "--seed", str(seed)]
    if "C" in params:
        argv += ["--C", str(params["C"])]
    if split:
        argv += ["--split", split]
    return argv + ["--cache", str(cache)]

