"""``featx predict``: classes of new images from a fine-tuned model or straight from a fitted head.

A head directory is enough: through its source feature set it knows the backbone, the weights and the layer,
so :func:`featx.model.build_from_head` puts it back on the network.  Every image gets a row; one that cannot
be decoded gets an ``error`` instead of a prediction and never stops the others.

:func:`predict_to_cache` (what ``featx predict`` runs) also keeps the rows in ``<cache>/predictions/<key>/``,
the key being the model's and every input file's identity, so the same command run again answers at once.

Probabilities are the softmax of the network's outputs.  For logistic-regression and MLP heads those outputs
are logits and the softmax is the model's own probability; for an SVM head they are decision values and the
softmax is only a monotone score in [0, 1] (the ranking is the SVM's, the values are not calibrated).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import featx
from featx import interrupt
from featx.backbones import Preprocess
from featx.cache import atomic_write_bytes, atomic_write_json, cache_root, hash_key, read_json, sha256_file
from featx.datasets import DEFAULT_MAX_PIXELS, fingerprint_file, walk_images
from featx.datasets.loading import DecodeSet, collate
from featx.devices import default_workers, resolve_device
from featx.errors import DataError, UsageError
from featx.model import MODEL_META, FinetuneNet, build_from_head, load_model, preprocess_from_json

logger = logging.getLogger(__name__)


@dataclass
class Predictor:
    """A network ready to classify images: preprocessing, class names per logit, what its scores are."""

    net: FinetuneNet
    preprocess: Preprocess
    classes: list[str]        # name of each logit's class
    scores: str               # "logits" or "decision values"
    source: str               # "model" or "head"
    path: Path


PREDICTIONS_META = "summary.json"


@dataclass
class PredictResult:
    """What :func:`predict_to_cache` produced: the directory, the rows, whether they were computed now."""

    path: Path
    rows: list[dict]
    computed: bool


def load_predictor(model_or_head: str | os.PathLike) -> Predictor:
    """Load a fine-tuned model directory (``model.json``) or a head directory (``featx-head.json``).

    Raises:
        DataError: neither. IntegrityError: a changed file. UsageError: a head that cannot become torch layers.
    """
    from featx.fit import META as HEAD_META

    path = Path(model_or_head).expanduser().absolute()
    if (path / MODEL_META).is_file():
        net, meta = load_model(path)
        names = [meta["classes"][i] for i in meta["logit_classes"]]
        return Predictor(net, preprocess_from_json(meta["preprocess"]), names,
                         meta["head"].get("scores", "logits"), "model", path)
    if (path / HEAD_META).is_file():
        hm = build_from_head(path)
        names = [hm.classes[i] for i in hm.logit_classes]
        kind = hm.head.meta.get("kind")
        return Predictor(hm.net, hm.preprocess, names, "decision values" if kind == "svm" else "logits", "head", path)
    raise DataError(f"{str(model_or_head)!r} is neither a fine-tuned model ({MODEL_META}) nor a head "
                    f"({HEAD_META}): give a directory printed by featx finetune or featx fit")


def _expand(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given; folders as the image files below them (sorted, hidden entries skipped)."""
    out: list[Path] = []
    for p in inputs:
        p = Path(p).expanduser()
        if p.is_dir():
            found = sorted(walk_images(p))
            if not found:
                logger.warning("no images found in folder %s", p)
            out.extend(found)
        else:
            out.append(p)  # a missing or bad file still gets its row, with the reason
    return out


def predict(model_or_head: str | os.PathLike | Predictor, inputs: Sequence[str | os.PathLike], *, top_k: int = 5,
            device: str = "auto", batch_size: int = 32, workers: int | None = None,
            max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[dict]:
    """Classify images with a fine-tuned model or a head.

    Args:
        model_or_head: a ``featx finetune`` model directory, a ``featx fit`` head directory, or a loaded
            :class:`Predictor`.
        inputs: image files and/or folders (searched recursively for images).
        top_k: classes listed per image (at most the number of classes).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. batch_size: images per forward pass.
        workers: decode processes (default: none for a few images, else one per core, up to 8).

    Returns:
        One dict per image, in input order: ``path``, ``class`` (the top class), ``probability`` (its softmax
        score), ``top_k`` (``[{"class", "probability"}]``, best first) and ``error`` (None, or why the image
        could not be used, in which case the other fields are empty).

    Raises:
        UsageError: bad ``top_k``/``batch_size``, or no inputs. DataError, IntegrityError: see :func:`load_predictor`.

    Example:
        >>> rows = predict("cache/models/0123abcd", ["photos/"], top_k=3)  # doctest: +SKIP
        >>> print(format_predictions(rows, "csv"))  # doctest: +SKIP
    """
    _check_sizes(top_k, batch_size)
    paths = _inputs(inputs)
    dev = resolve_device(device)
    pr = model_or_head if isinstance(model_or_head, Predictor) else load_predictor(model_or_head)
    return _predict(pr, paths, top_k=top_k, dev=dev, batch_size=batch_size, workers=workers, max_pixels=max_pixels)


def _check_sizes(top_k: int, batch_size: int) -> None:
    if top_k < 1 or batch_size < 1:
        raise UsageError("--top-k and --batch-size must be at least 1")


def _inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    paths = _expand(inputs)
    if not paths:
        raise UsageError("no images to predict: give image files or folders holding images")
    return paths


def _predict(pr: Predictor, paths: list[Path], *, top_k: int, dev: torch.device, batch_size: int,
             workers: int | None, max_pixels: int | None) -> list[dict]:
    net = pr.net.to(dev).to(memory_format=torch.channels_last).eval()
    k = min(int(top_k), len(pr.classes))
    if workers is None:
        workers = 0 if len(paths) <= 2 * batch_size else default_workers("cuda")  # decode processes
    batches = [list(range(a, min(a + batch_size, len(paths)))) for a in range(0, len(paths), batch_size)]
    loader = torch.utils.data.DataLoader(DecodeSet(paths, pr.preprocess, max_pixels), batch_sampler=batches,
                                         num_workers=workers, collate_fn=collate, pin_memory=dev.type == "cuda")
    rows: list[dict | None] = [None] * len(paths)
    for idx, pixels, bad in loader:
        interrupt.check("predict.batch")  # nothing is written before every row is known
        for i, why in bad:
            reason = "no such file" if not os.path.lexists(paths[i]) else why
            rows[i] = {"path": str(paths[i]), "class": None, "probability": None, "top_k": [], "error": reason}
        if pixels is None:
            continue
        x = pr.preprocess.normalize(pixels.to(dev, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            prob = torch.softmax(net(x).float(), dim=1).cpu().numpy()
        top = np.argsort(-prob, axis=1, kind="stable")[:, :k]
        for r, i in enumerate(idx):
            tk = [{"class": pr.classes[j], "probability": float(prob[r, j])} for j in top[r]]
            rows[i] = {"path": str(paths[i]), "class": tk[0]["class"], "probability": tk[0]["probability"],
                       "top_k": tk, "error": None}
    n_bad = sum(1 for r in rows if r and r["error"])
    if n_bad:
        logger.warning("%d of %d image(s) could not be used (their rows say why)", n_bad, len(rows))
    return [r for r in rows if r is not None]


def predict_to_cache(model_or_head: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, top_k: int = 5,
                     device: str = "auto", batch_size: int = 32, workers: int | None = None,
                     max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     cache: str | os.PathLike | None = None) -> PredictResult:
    """:func:`predict`, with the rows kept in ``<cache>/predictions/<key>/``.

    The directory holds ``predictions.csv`` and ``predictions.json`` (the rows, as :func:`format_predictions`
    writes them) and ``summary.json`` (the model, the number of images and errors, predicted images per class),
    written last.  The key hashes the model's metadata (which holds its files' sha256), every input's path, size
    and sha256, ``top_k`` and ``max_pixels``: the same call again reads the rows back instead of computing them,
    and a changed image or model makes a new directory.

    Raises:
        as :func:`predict`.
    """
    _check_sizes(top_k, batch_size)
    from featx.fit import META as HEAD_META

    where = Path(model_or_head).expanduser().absolute()
    metas = [where / m for m in (MODEL_META, HEAD_META) if (where / m).is_file()]
    if not metas:
        load_predictor(where)  # raises the error that says what MODEL should be
    paths = _inputs(inputs)
    key = hash_key({"model": sha256_file(metas[0]), "top_k": int(top_k), "max_pixels": max_pixels,
                    "inputs": [(str(p), str(p.absolute()), *fingerprint_file(p)) for p in paths]})
    out = cache_root(cache) / "predictions" / key
    done = read_json(out / PREDICTIONS_META)
    rows = read_json(out / "predictions.json")
    if isinstance(done, dict) and done.get("key") == key and isinstance(rows, list):
        logger.info("predictions %s are already in the cache", key)
        return PredictResult(out, rows, False)
    t = time.perf_counter()
    pr = load_predictor(where)
    rows = _predict(pr, paths, top_k=top_k, dev=resolve_device(device), batch_size=batch_size, workers=workers,
                    max_pixels=max_pixels)
    elapsed = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "predictions.csv", format_predictions(rows, "csv").encode())
    atomic_write_bytes(out / "predictions.json", format_predictions(rows, "json").encode())
    good = [r for r in rows if not r["error"]]
    per_class = dict.fromkeys(pr.classes, 0)
    for r in good:
        per_class[r["class"]] += 1
    atomic_write_json(out / PREDICTIONS_META, {
        "key": key, "featx_version": featx.__version__, "model": str(pr.path), "source": pr.source,
        "scores": pr.scores, "classes": list(pr.classes), "top_k": int(top_k), "n_images": len(rows),
        "n_errors": len(rows) - len(good), "predicted_per_class": per_class,
        "images_per_s": round(len(rows) / elapsed, 2) if elapsed > 0 else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    return PredictResult(out, rows, True)


def format_predictions(rows: list[dict], fmt: str = "csv") -> str:
    """Rows of :func:`predict` as CSV (``path,class,probability,top_k,error``; ``top_k`` as
    ``class:probability`` pairs joined by ``;``) or as a JSON list.

    Raises:
        UsageError: an unknown format.
    """
    if fmt == "json":
        return json.dumps(rows, indent=2, ensure_ascii=False) + "\n"
    if fmt != "csv":
        raise UsageError(f"--format {fmt!r}: use csv or json")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "class", "probability", "top_k", "error"])
    for r in rows:
        tk = ";".join(f"{t['class']}:{t['probability']:.6f}" for t in r["top_k"])
        w.writerow([r["path"], r["class"] if r["class"] is not None else "",
                    f"{r['probability']:.6f}" if r["probability"] is not None else "", tk, r["error"] or ""])
    return buf.getvalue()
