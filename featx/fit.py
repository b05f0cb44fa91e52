"""``featx fit`` and ``featx evaluate``: a head on cached features, measured and saved.

A head directory ``<cache>/heads/<key>/`` holds the classifier (``head.json`` + ``head.npz``, the RBF SVC
included, written by :func:`featx.heads.save_head`), the feature scaling (``scaler.npz``), ``featx-head.json``
(kind, layer, parameters, the source feature set and what it depends on, sha256 of every file) and
``metrics.json``, ``confusion.png`` and, for the MLP, ``curve.png``.  Everything loads without running code.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import featx
from featx import interrupt, memory
from featx.cache import (
    StagePlan,
    atomic_write_json,
    cache_root,
    canonical_json,
    hash_key,
    read_json,
    read_sealed_json,
    repair_hint,
    sha256_file,
    temp_path,
)
from featx.errors import DataError, IntegrityError, UsageError
from featx.metrics import metrics_for, predict_and_score
from featx.store import FeatureSet

logger = logging.getLogger(__name__)

HEAD_KINDS = ("svm", "logreg", "mlp")
SCALES = ("standard", "l2", "none")
META = "featx-head.json"


# ------------------------------------------------------------------------------------------------ scaling

@dataclass
class Scaler:
    """Feature scaling fitted on the train rows: ``standard`` ((x - mean) / std), ``l2`` (unit rows) or ``none``.

    Applied in place, chunk by chunk, so scaling never needs a second copy of the matrix.
    """

    kind: str = "standard"
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCALES:
            raise UsageError(f"--scale {self.kind!r}: use one of {', '.join(SCALES)}")

    def fit_chunks(self, chunks: Iterator[np.ndarray]) -> Scaler:
        if self.kind != "standard":
            return self
        n, s, ss = 0, None, None  # type: tuple[int, Any, Any]
        for X in chunks:
            # float64 sums over blocks of at most 2 Mi values (16 MB): bounded temporaries, small enough that each
            # block reuses the last one's memory (512 rows of 9,216 features mapped 38 MB of fresh pages each time)
            step = max(1, min(512, (2 << 20) // max(1, X.shape[1])))
            for a in range(0, len(X), step):
                interrupt.raise_if_requested()
                X64 = X[a:a + step].astype(np.float64)
                s = X64.sum(0) if s is None else s + X64.sum(0)
                ss = np.einsum("ij,ij->j", X64, X64) if ss is None else ss + np.einsum("ij,ij->j", X64, X64)
            n += len(X)
        if not n:
            raise DataError("no training rows to fit the feature scaling on")
        mean = s / n
        var = np.maximum(ss / n - mean * mean, 0.0)
        std = np.sqrt(var)
        std[std < 1e-12 * max(1.0, float(np.abs(mean).max(initial=0)))] = 1.0  # constant features stay as they are
        self.mean, self.scale = mean.astype(np.float32), std.astype(np.float32)
        return self

    def fit(self, X: np.ndarray) -> Scaler:
        return self.fit_chunks(iter([X]))

    def transform_(self, X: np.ndarray) -> np.ndarray:
        """Scale ``X`` in place (and return it)."""
        for a in range(0, len(X), 4096):
            interrupt.raise_if_requested()
            block = X[a:a + 4096]
            if self.kind == "standard":
                block -= self.mean
                block /= self.scale
            elif self.kind == "l2":
                norms = np.linalg.norm(block, axis=1, keepdims=True)
                block /= np.maximum(norms, 1e-12)
        return X

    def arrays(self) -> dict[str, Any]:
        return {} if self.kind != "standard" else {"mean": self.mean, "scale": self.scale}

    def affine(self, d: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(weight, bias)`` with ``scaled = x * weight + bias``, or None for ``l2`` (not affine)/``none``."""
        if self.kind == "standard":
            assert self.mean is not None and self.scale is not None
            w = (1.0 / self.scale).astype(np.float32)
            return w, (-self.mean * w).astype(np.float32)
        return None


# ------------------------------------------------------------------------------------------------ loading

@dataclass
class Rows:
    """The rows of one feature set used by a head: which are train/val/test, and their labels."""

    fs: FeatureSet
    layer: str
    splits: np.ndarray
    labels: np.ndarray
    classes: list[str]
    _source: dict | None = field(default=None, repr=False)

    def mask(self, name: str) -> np.ndarray:
        return self.splits == name

    def load(self, name: str, scaler: Scaler | None = None) -> np.ndarray:
        X = self.fs.load(self.layer, mask=self.mask(name))
        _check_finite(X, name)
        return scaler.transform_(X) if scaler is not None else X

    def chunks(self, name: str, scaler: Scaler | None = None) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
        def gen():
            for X, y in self.fs.iter_chunks(self.layer, mask=self.mask(name)):
                X = np.array(X, dtype=np.float32, copy=True)
                _check_finite(X, name)
                yield (scaler.transform_(X) if scaler is not None else X), y
        return gen


def _check_finite(X: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise DataError(f"{int(bad.sum())} {name} row(s) hold NaN or infinite feature values: "
                        f"re-extract them or drop them before fitting")


def open_rows(features: str | os.PathLike, layer: str | None = None, *, split: str | None = None,
              seed: int = 0) -> Rows:
    """Open a feature set (or HDF5 file) for fitting: check the layer, resolve the splits.

    Without a recorded split (a plain HDF5 file), a stratified ``split`` (default ``test=0.15``) is made with ``seed``.
    """
    from featx.datasets.splits import parse_split, stratified

    fs = FeatureSet(features)
    if layer is None:
        layer = fs.layers[0] if fs.layers else "pool5"
    fs.check_layer(layer)
    labels = fs.labels()
    if fs.dim(layer) < 1:
        raise DataError(f"layer {layer!r} has no feature columns")
    splits = fs.splits()
    if splits is None:
        fractions = parse_split(split)
        splits = np.asarray(stratified(labels.tolist(), fractions, seed), dtype=object)
        logger.info("%s records no split: made a stratified one (%s, seed %d)", fs.path.name, fractions, seed)
    else:
        bad = sorted(set(splits.tolist()) - {"train", "val", "test"})
        if bad:
            raise DataError(f"split values must be train, val or test; found {bad[:3]}")
    if labels.min(initial=0) < 0:
        raise DataError("labels must be non-negative integers")
    classes = fs.classes
    if len(classes) <= int(labels.max(initial=0)):
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    rows = Rows(fs, layer, splits, labels, classes)
    n_train = int(rows.mask("train").sum())
    if n_train == 0:
        raise DataError(f"{fs.path.name} has no train rows")
    if int(rows.mask("test").sum()) == 0:
        raise DataError(f"{fs.path.name} has no test rows: the head must be measured on rows it never saw "
                        f"(extract with --split test=0.15, or give a split dataset)")
    if len(np.unique(labels[rows.mask("train")])) < 2:
        raise DataError("the train rows hold only one class: a classifier needs at least two")
    return rows


def source_identity(rows: Rows) -> dict:
    """What a head depends on: the features it was fit on (computed once per opened rows: for a plain HDF5 file
    it hashes the whole file, which a search would otherwise do for its study name, its attributes and its refit)."""
    if rows._source is None:
        ident = rows.fs.identity(rows.layer)
        if rows.fs.kind == "featx":
            rows._source = {"features": str(rows.fs.path), "key": rows.fs.key, **ident, "dim": rows.fs.dim(rows.layer)}
        else:
            digest = sha256_file(rows.fs.path, stoppable=True)
            rows._source = {"features": str(rows.fs.path), "sha256": digest, "layer": rows.layer,
                            "dim": rows.fs.dim(rows.layer)}
    return rows._source


# ------------------------------------------------------------------------------------------------ heads

def make_head(kind: str, params: dict[str, Any]):
    """A head estimator of ``kind`` with ``params`` (unknown parameters are a UsageError)."""
    from featx import heads

    cls = {"svm": heads.SVMHead, "logreg": heads.LogisticHead, "mlp": heads.MLPHead}.get(kind)
    if cls is None:
        raise UsageError(f"unknown head {kind!r}: use one of {', '.join(HEAD_KINDS)}")
    valid = cls().get_params()
    bad = sorted(set(params) - set(valid))
    if bad:
        raise UsageError(f"{kind} has no parameter {bad[0]!r}: its parameters are {', '.join(sorted(valid))}")
    return cls(**params)


def _resolve_device(device: str) -> str:
    from featx.devices import resolve_device_type

    return resolve_device_type(device)  # without importing torch: the svm and logreg heads are numpy


def plan_head(rows: Rows, kind: str, params: dict, *, stream: bool | None = None,
              max_memory: str | int | None = None) -> memory.Plan:
    """How ``kind`` will be fitted on ``rows``'s train rows within ``max_memory`` (default: 70% of available memory).

    ``stream`` True forces the streamed path, False an in-memory one; None lets the plan choose the fastest path
    that fits.  An MLP's validation rows, held beside the train rows, come off the budget.

    Raises:
        NotEnoughMemory: nothing fits (one line naming what the cheapest candidate needs and the budget).
    """
    n = int(rows.mask("train").sum())
    d = rows.fs.dim(rows.layer)
    k = len(np.unique(rows.labels[rows.mask("train")]))
    head = "svm-rbf" if kind == "svm" and params.get("kernel", "linear") == "rbf" else kind
    choose_c = bool(getattr(make_head(kind, {k: v for k, v in params.items() if k == "C"}), "chooses_c", False))
    limit = memory.budget(max_memory)
    held = int(rows.mask("val").sum()) * d * 4 if kind == "mlp" else 0
    room = max(1, limit - held)
    if stream is None or stream:
        return replace(memory.plan_fit(head, n, d, k, budget=room, path="stream" if stream else None,
                                       choose_c=choose_c), budget=limit)
    refusal: memory.NotEnoughMemory | None = None
    for path in [p for p in memory.paths_by_speed(head, n, d) if p != "stream"]:
        try:
            return replace(memory.plan_fit(head, n, d, k, budget=room, path=path, choose_c=choose_c), budget=limit)
        except memory.NotEnoughMemory as e:
            refusal = refusal or e
    assert refusal is not None
    raise refusal


@dataclass
class FitResult:
    path: Path
    metrics: dict
    computed: bool
    estimator: Any = field(default=None, repr=False)


def fit_head(features: str | os.PathLike, kind: str, *, layer: str | None = None, params: dict | None = None,
             scale: str = "standard", split: str | None = None, seed: int = 0, device: str = "auto",
             cache: str | os.PathLike | None = None, stream: bool | None = None,
             rows: Rows | None = None, extra_meta: dict | None = None,
             extra_files: Callable[[Path], None] | None = None, plan: bool = False,
             max_memory: str | int | None = None) -> FitResult | StagePlan:
    """Fit a head of ``kind`` on ``layer`` of ``features``'s train rows, measure it on the test rows, save it.

    Args:
        features: a feature-set directory or an HDF5 file.
        kind: ``svm``, ``logreg`` or ``mlp``.
        params: the head's parameters (e.g. ``{"C": 0.1}``, ``{"hidden": 256, "epochs": 30}``).
        scale: ``standard`` (default: train rows' mean/std), ``l2`` or ``none``.
        split, seed: the split to make when the features record none.
        device: where torch heads compute. stream: fit chunk by chunk (True) or in memory (False); default: the
            memory plan's choice (:func:`plan_head`, :mod:`featx.memory`).
        max_memory: the memory budget, bytes or a size such as ``24G`` (default: 70% of available memory); the
            fastest way of fitting whose predicted peak fits it is used, and the head's metadata records it.
        rows: already-opened rows (the search reuses them).
        extra_meta: more entries for ``metrics.json`` (and the key), e.g. the search's summary.
        extra_files: called with the head's unfinished directory to add files (plots) before it is published.
        plan: fit nothing: return a :class:`~featx.cache.StagePlan` saying where the head is and whether it is
            already fitted (the parameters are checked as for a fit).

    Returns:
        :class:`FitResult` with the head's directory (``plan``: a :class:`~featx.cache.StagePlan`).

    Raises:
        DataError, UsageError; NotEnoughMemory when no way of fitting fits ``max_memory``.
    """
    params = dict(params or {})
    rows = rows or open_rows(features, layer, split=split, seed=seed)
    dev = _resolve_device(device)
    accepts = make_head(kind, {}).get_params()
    if "epoch_callback" in accepts and params.get("epoch_callback") is None:
        params["epoch_callback"] = _stop_between_epochs  # Ctrl-C / SIGTERM: the fit is abandoned, nothing written
    est = make_head(kind, {**params, **({"random_state": seed} if "random_state" not in params else {}),
                           **({"device": dev} if "device" in accepts else {})})
    scaler = Scaler(scale)
    source = source_identity(rows)
    resolved = {k: v for k, v in est.get_params().items() if k not in ("device", "epoch_callback")}
    key = hash_key({"source": source, "split": rows.splits.tolist() if rows.fs.kind == "h5" else None,
                    "kind": kind, "params": resolved, "scale": scale, "seed": seed,
                    "featx": featx.__version__.split(".")[0], "extra": extra_meta})
    out = cache_root(cache) / "heads" / key
    done = read_json(out / "metrics.json")
    if plan:
        return StagePlan(out, isinstance(done, dict) and (out / META).exists(), {"key": key})
    if isinstance(done, dict) and (out / META).exists():
        problem = head_problem(out)
        if problem is None:
            logger.info("head %s is already fitted", key)
            return FitResult(out, done, False)
        logger.warning("head %s is damaged (%s): fitting it again", key, problem)
    n_train = int(rows.mask("train").sum())
    d = rows.fs.dim(rows.layer)
    mem = plan_head(rows, kind, params, stream=stream, max_memory=max_memory)
    stream = mem.path == "stream"
    logger.info("%s (%d x %d train rows)", mem.describe(), n_train, d)
    t0 = time.perf_counter()
    if kind != "mlp":  # (the MLP imports torch as it fits: two threads importing big packages at once gain little)
        from featx.plots import preload

        preload(rows.classes)  # matplotlib and the confusion plot's frame, on another core while the solver runs
    X = _fit_on(est, rows, scaler, kind=kind, path=mem.path, device=dev)
    fit_s = time.perf_counter() - t0
    metrics = measure(est, rows, scaler, classes=rows.classes, train=X)
    del X
    metrics.update({"kind": kind, "layer": rows.layer, "scale": scale, "params": _jsonable(resolved),
                    "fit_seconds": round(fit_s, 3), "source": source, "seed": seed,
                    "rows": {s: int(rows.mask(s).sum()) for s in ("train", "val", "test")},
                    "streamed": bool(stream), "memory": _memory_record(mem)})
    if getattr(est, "chooses_c", False):
        metrics["chosen_C"] = {"C": float(est.C_), "held_out_accuracy": _jsonable(est.C_path_)}
    if hasattr(est, "history_"):
        metrics["curve"] = _jsonable(est.history_)
        metrics["best_epoch"] = int(getattr(est, "best_epoch_", -1))
    if extra_meta:
        metrics.update(extra_meta)
    argv = _command(features, kind, layer=rows.layer, params=params, scale=scale, split=split, seed=seed,
                    search=bool(extra_meta and "search" in extra_meta), cache=cache_root(cache))
    save_fitted(out, est, scaler, kind=kind, layer=rows.layer, source=source, classes=rows.classes,
                params=resolved, metrics=metrics, extra_files=extra_files, command=argv,
                fit_path=_memory_record(mem))
    logger.info("%s on %s: test accuracy %.4f (train %.4f), fit %.2fs", kind, rows.layer,
                metrics["test_accuracy"], metrics["train_accuracy"], fit_s)
    return FitResult(out, metrics, True, est)


def _fit_on(est, rows: Rows, scaler: Scaler, *, kind: str, path: str, device: str) -> np.ndarray | None:
    """Fit ``est`` on the train rows by the memory plan's ``path``; returns the scaled train rows when they were
    held in memory (the metrics reuse them), None when they were streamed."""
    has_val = bool(rows.mask("val").any())
    if path == "stream":
        logger.info("fitting %s chunk by chunk (%d x %d train rows)", kind, int(rows.mask("train").sum()),
                    rows.fs.dim(rows.layer))
        scaler.fit_chunks(X for X, _ in rows.chunks("train")())
        # only the MLP watches validation rows while it trains (the linear heads solve to a tolerance)
        val = (rows.load("val", scaler), rows.labels[rows.mask("val")]) if has_val and kind == "mlp" else None
        est.fit_stream(rows.chunks("train", scaler), classes=np.arange(len(rows.classes)),
                       n_features=rows.fs.dim(rows.layer), val=val)
        return None
    X = rows.load("train")  # the one copy of the train rows: scaled in place, fitted, measured
    scaler.fit(X).transform_(X)
    y = rows.labels[rows.mask("train")]
    if kind == "mlp" and has_val:
        est.fit(X, y, X_val=rows.load("val", scaler), y_val=rows.labels[rows.mask("val")])
    elif path in ("gram", "feature"):
        from featx.heads import LinearProblem

        est.fit(X, y, problem=LinearProblem(X, device=device, space=path))
    else:
        est.fit(X, y)
    return X


# the head parameters that ``featx fit KIND`` takes as options
_FIT_OPTIONS = {"svm": ("C", "kernel", "gamma"), "logreg": ("C",),
                "mlp": ("hidden", "dropout", "lr", "weight_decay", "optimizer", "momentum", "batch_size", "epochs",
                        "patience")}


def _memory_record(plan: memory.Plan) -> dict:
    """What the head's metadata says of the way it was fitted: the path, its predicted peak and the budget."""
    return {"path": plan.path, "predicted_peak_bytes": int(plan.peak), "budget_bytes": int(plan.budget)}


def _command(features, kind: str, *, layer: str, params: dict, scale: str, split: str | None, seed: int,
             search: bool, cache: Path) -> list[str]:
    """The command line that makes this head again (``featx search`` for a search's refit)."""
    argv = ["featx", "search" if search else "fit", kind, str(Path(features).expanduser().absolute()),
            "--layer", layer]
    if not search:
        argv += ["--scale", scale]
        for name in _FIT_OPTIONS.get(kind, ()):
            if name in params:
                argv += [f"--{name.replace('_', '-')}", str(params[name])]
    if split:
        argv += ["--split", str(split)]
    return argv + ["--seed", str(seed), "--cache", str(cache)]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def measure(est, rows: Rows, scaler: Scaler, *, classes: list[str], train: np.ndarray | None = None) -> dict:
    """Train, validation (when there are val rows) and test metrics of a fitted head (test rows are only ever
    predicted).

    ``train``: the scaled train rows when they are already in memory (else they are streamed again).
    """
    out: dict[str, Any] = {}
    for name in ("train", "val", "test"):
        if not rows.mask(name).any():
            continue
        preds, ys, scs = [], [], []
        chunks: Any
        if name == "train" and train is not None:
            y_train = rows.labels[rows.mask("train")]
            chunks = [(train[a:a + 4096], y_train[a:a + 4096]) for a in range(0, len(train), 4096)]
        else:
            chunks = rows.chunks(name, scaler)()
        for X, y in chunks:
            pred, sc = predict_and_score(est, X)
            preds.append(pred)
            scs.append(sc)
            ys.append(y)
        y = np.concatenate(ys)
        m = metrics_for(y, np.concatenate(preds), np.concatenate(scs), est.classes_, classes)
        if name == "train":
            out["train_accuracy"] = m["accuracy"]
        elif name == "val":  # what a choice between heads may rely on (the test rows must not choose)
            out["val_accuracy"] = m["accuracy"]
        else:
            out["test_accuracy"] = m["accuracy"]
            out["macro_f1"] = m["macro_f1"]
            if "top5_accuracy" in m:
                out["top5_accuracy"] = m["top5_accuracy"]
            out["per_class_accuracy"] = m["per_class_accuracy"]
            out["confusion_matrix"] = m["confusion"]
    out["classes"] = list(classes)
    return out


def _stop_between_epochs(epoch: int, val_accuracy: float) -> None:
    interrupt.check("fit.epoch")


# ------------------------------------------------------------------------------------------------ saving

def save_fitted(out: Path, est, scaler: Scaler, *, kind: str, layer: str, source: dict, classes: list[str],
                params: dict, metrics: dict, extra_files: Callable[[Path], None] | None = None,
                command: list[str] | None = None, fit_path: dict | None = None) -> None:
    """Write a head directory; files appear under a temporary directory renamed into place at the end.

    ``featx-head.json`` is sealed (a digest of its content) and lists the sha256 of every file written before it;
    ``command``: the command line that makes the head again, kept in ``command.json`` for repair hints;
    ``fit_path``: how it was fitted (the memory plan's path, predicted peak and budget), kept in the metadata."""
    from featx.cache import write_command, writing
    from featx.heads import save_head
    from featx.locks import hold
    from featx.plots import plot_confusion, plot_curve

    tmp = temp_path(out.with_name(out.name + ".partial"))
    tmp.unlink()
    tmp.mkdir()
    try:
        save_head(est, tmp)
        savez: Any = np.savez
        with writing(tmp / "scaler.npz"):
            savez(tmp / "scaler.npz", **scaler.arrays())
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        meta = {"featx_version": featx.__version__, "kind": kind, "layer": layer, "scale": scaler.kind,
                "params": _jsonable(params), "classes": list(classes), "source": source, "files": files,
                "n_features": int(source.get("dim", getattr(est, "n_features_in_", 0)))}
        if fit_path is not None:
            meta["fit"] = fit_path
        atomic_write_json(tmp / META, meta, seal=True)
        atomic_write_json(tmp / "metrics.json", metrics)
        if command:
            write_command(tmp, command)
        plot_confusion(np.asarray(metrics["confusion_matrix"]), classes, tmp / "confusion.png",
                       title=f"{kind} on {layer}: test accuracy {metrics['test_accuracy']:.3f}")
        if metrics.get("curve"):
            plot_curve(metrics["curve"], tmp / "curve.png", title=f"{kind} on {layer}")
        if extra_files is not None:
            extra_files(tmp)
        with hold(out.with_name(out.name + ".lock"), what=f"head {out.name}"):  # the lock outlives the rename
            if out.exists() and (out / "metrics.json").is_file() and head_problem(out) is None:
                shutil.rmtree(tmp)  # another process saved the same head meanwhile: keep it
            else:
                if out.exists():  # an unfinished earlier attempt (no metrics.json): replace it
                    shutil.rmtree(out)
                os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved the %s head to %s", kind, out)


@dataclass
class FittedHead:
    """A saved head loaded back: the estimator, its scaler and metadata."""

    path: Path
    estimator: Any
    scaler: Scaler
    meta: dict

    @property
    def layer(self) -> str:
        return self.meta["layer"]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]


def load_fitted(path: str | os.PathLike) -> FittedHead:
    """Load a head directory, checking every file's sha256 first.

    Raises:
        DataError: not a head directory.  IntegrityError: a file changed since it was written.
    """
    from featx.heads import load_head

    path = Path(path).expanduser().absolute()
    meta = _read_meta(path)
    if not isinstance(meta, dict):
        raise DataError(f"{str(path)!r} is not a featx head (no readable {META}): "
                        "give a directory printed by featx fit")
    problem = _files_problem(path, meta)
    if problem:
        raise IntegrityError(f"head {path}: {problem}: {repair_hint(path, verb='fit it again')}")
    try:
        est = load_head(path)
    except IntegrityError as e:
        raise IntegrityError(f"{e}: {repair_hint(path, verb='fit it again')}") from None
    with np.load(path / "scaler.npz", allow_pickle=False) as z:
        scaler = Scaler(meta["scale"], z["mean"] if "mean" in z else None, z["scale"] if "scale" in z else None)
    return FittedHead(path, est, scaler, meta)


def _read_meta(path: Path) -> dict | None:
    return read_sealed_json(path / META, what="head metadata", fix=repair_hint(path, verb="fit it again"))


def _files_problem(path: Path, meta: dict) -> str | None:
    for name, digest in meta.get("files", {}).items():
        f = path / name
        if not f.exists():
            return f"{name} is missing"
        if sha256_file(f) != digest:
            return f"{name} is damaged or was modified after it was written (sha256 differs)"
    return None


def head_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a finished head directory (its metadata's seal, every file's sha256), or None."""
    path = Path(path)
    try:
        meta = _read_meta(path)
    except IntegrityError as e:
        return str(e).split(": run ")[0]
    if meta is None:
        return f"{META} is missing"
    return _files_problem(path, meta)


# ------------------------------------------------------------------------------------------------ evaluate

def evaluate(head: str | os.PathLike, features: str | os.PathLike, *, split: str = "all",
             cache: str | os.PathLike | None = None) -> FitResult:
    """Measure a saved head on another feature set's rows (``split``: ``all``, ``train``, ``val`` or ``test``).

    Raises:
        DataError: the feature set was made with another backbone, weights, layer or transform (the message says
            which), or its classes or dimensions differ.
    """
    fh = load_fitted(head)
    from featx.plots import preload

    preload(fh.classes)  # matplotlib and the confusion plot's frame while the rows are read and scored
    fs = FeatureSet(features)
    layer = fh.layer
    fs.check_layer(layer)
    src = fh.meta["source"]
    if fs.kind == "featx" and "backbone" in src:
        mine = fs.identity(layer)
        for what in ("backbone", "weights", "layer", "preprocess"):
            if mine.get(what) != src.get(what):
                raise DataError(f"cannot evaluate: the feature set was made with another {what} "
                                f"({_short(mine.get(what))} vs the head's {_short(src.get(what))})")
    elif fs.kind == "featx" or "backbone" in src:
        raise DataError("cannot evaluate: one of the head and the features comes from a plain HDF5 file, the other "
                        "from featx extract; their backbone, weights and transform cannot be checked")
    if fs.dim(layer) != fh.meta["n_features"]:
        raise DataError(f"cannot evaluate: {layer} has {fs.dim(layer)} values per row here, the head expects "
                        f"{fh.meta['n_features']}")
    if list(fs.classes) != list(fh.classes):
        raise DataError(f"cannot evaluate: the feature set's classes {fs.classes[:5]}... differ from the head's "
                        f"{fh.classes[:5]}...")
    splits = fs.splits()
    if split == "all":
        mask = np.ones(fs.n_rows, dtype=bool)
    elif splits is None:
        raise DataError(f"{fs.path.name} records no split; use --split all")
    else:
        mask = splits == split
    if not mask.any():
        raise DataError(f"no {split} rows in {fs.path.name}")
    preds, ys, scs = [], [], []
    for X, y in fs.iter_chunks(layer, mask=mask):
        X = np.array(X, dtype=np.float32, copy=True)
        _check_finite(X, split)
        fh.scaler.transform_(X)
        pred, sc = predict_and_score(fh.estimator, X)
        preds.append(pred)
        scs.append(sc)
        ys.append(y)
    y = np.concatenate(ys)
    m = metrics_for(y, np.concatenate(preds), np.concatenate(scs), fh.estimator.classes_, fh.classes)
    key = hash_key({"head": fh.meta["files"], "features": fs.key or sha256_file(fs.path), "split": split})
    out = cache_root(cache) / "evaluations" / key
    metrics = {"head": str(fh.path), "features": str(fs.path), "split": split, "accuracy": m["accuracy"],
               "macro_f1": m["macro_f1"], **({"top5_accuracy": m["top5_accuracy"]} if "top5_accuracy" in m else {}),
               "per_class_accuracy": m["per_class_accuracy"], "confusion_matrix": m["confusion"], "n": m["n"]}
    from featx.plots import plot_confusion

    out.mkdir(parents=True, exist_ok=True)
    plot_confusion(np.asarray(m["confusion"]), fh.classes, out / "confusion.png",
                   title=f"{fh.meta['kind']} on {fs.path.name} ({split}): accuracy {m['accuracy']:.3f}")
    atomic_write_json(out / "metrics.json", metrics)
    return FitResult(out, metrics, True, fh.estimator)


def _short(v) -> str:
    s = v if isinstance(v, str) else canonical_json(v)
    return s if len(s) <= 80 else s[:77] + "..."
