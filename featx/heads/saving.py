"""Heads on disk without pickles: :func:`save_head` / :func:`load_head` and the format's version.

``head.json`` (class, parameters, classes, array names, sha256 of the data file) plus ``head.npz``, read with
``allow_pickle=False``: every head, the RBF SVM included, is arrays and JSON, and loading runs no code.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import atomic_write_bytes as _atomic_write
from ..errors import IntegrityError, UsageError
from ._compat import ClassifierBase, check_is_fitted
from .logreg import LogisticHead
from .mlp import MLPHead
from .svm import SVMHead

logger = logging.getLogger(__name__)

HEAD_CLASSES: dict[str, type[ClassifierBase]] = {c.__name__: c for c in (SVMHead, LogisticHead, MLPHead)}
_FORMAT = "featx-head"
_FORMAT_VERSION = 1
_DATA_FILE = "head.npz"


def _json_safe(value: Any) -> Any:
    """Parameters as JSON; callables (an epoch callback) are not saved."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if callable(value):
        return None
    raise UsageError(f"cannot save a head parameter of type {type(value).__name__}: {value!r}")


def save_head(est: ClassifierBase, directory: str | os.PathLike[str]) -> None:
    """Save a fitted head to ``directory``: ``head.json`` plus ``head.npz``.

    ``head.json`` records the class, the parameters, the classes, the array names and the sha256 of the data
    file; :func:`load_head` checks that hash before reading anything.  The data file is written first and
    ``head.json`` last, each atomically, so an interrupted save never leaves a json describing other data.
    """
    name = type(est).__name__
    if name not in HEAD_CLASSES:
        raise UsageError(f"save_head saves featx heads ({', '.join(HEAD_CLASSES)}), not {name}")
    check_is_fitted(est)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    classes = np.asarray(est.classes_)  # type: ignore[attr-defined]
    if classes.dtype.kind not in "biufU" and not all(isinstance(c, str) for c in classes.tolist()):
        raise UsageError(f"cannot save class labels of dtype {classes.dtype} as JSON")
    meta: dict[str, Any] = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "class": name,
        "params": {k: _json_safe(v) for k, v in est.get_params(deep=False).items()},
        "classes": {"dtype": classes.dtype.str if classes.dtype.kind != "O" else "str", "values": classes.tolist()},
    }
    arrays = est._saved_arrays()  # type: ignore[attr-defined]
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    data = buf.getvalue()
    meta.update(
        {
            "file": _DATA_FILE,
            "sha256": hashlib.sha256(data).hexdigest(),
            "arrays": sorted(arrays),
            "state": est._saved_state(),  # type: ignore[attr-defined]
        }
    )
    _atomic_write(out / _DATA_FILE, data)
    _atomic_write(out / "head.json", (json.dumps(meta, indent=2, allow_nan=True) + "\n").encode("utf-8"))
    # debug only: featx fit saves into a temporary directory and logs the final one once it is in place
    logger.debug("saved %s to %s", name, out)


def _refuse_unknown(src: Path, meta_path: Path, names: list, state: dict) -> None:
    """One clear error for what a featx head never holds: another ``head.*`` file (a pickle of an older format)
    or a recorded name that is not a learned attribute (``name_``)."""
    others = sorted(p.name for p in src.glob("head.*") if p.name not in ("head.json", _DATA_FILE))
    if others:
        raise IntegrityError(f"{src} holds {', '.join(others)}, which featx does not load (heads are head.json and "
                             f"{_DATA_FILE}, no pickles): fit the head again")
    bad = [k for k in [*names, *state] if not (isinstance(k, str) and k.isidentifier() and k.endswith("_"))]
    if bad:
        raise IntegrityError(f"{meta_path} names unknown attributes {bad!r}")


def load_head(directory: str | os.PathLike[str]) -> ClassifierBase:
    """Load a head saved by :func:`save_head`, verifying the data file's sha256 first.

    Raises :class:`IntegrityError` (one line) when a file is missing, unreadable, malformed or does not
    match the recorded hash.
    """
    src = Path(directory)
    meta_path = src / "head.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"no head.json in {src}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{meta_path} is unreadable or not JSON: {exc}".replace("\n", " ")) from None
    try:
        if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
            raise IntegrityError(f"{meta_path} is not a featx head (format {meta.get('format')!r})")
        cls = HEAD_CLASSES.get(meta["class"])
        if cls is None:
            raise IntegrityError(f"{meta_path} names an unknown head class {meta['class']!r}")
        fname = meta["file"]
        if fname != _DATA_FILE:
            raise IntegrityError(f"{meta_path} names the data file {fname!r}; featx heads load only from "
                                 f"{_DATA_FILE} (arrays, no pickles): fit the head again")
        expected = str(meta["sha256"])
        params = dict(meta["params"])
        cdt = meta["classes"]["dtype"]
        classes = np.asarray(meta["classes"]["values"], dtype=object if cdt == "str" else np.dtype(cdt))
        state = dict(meta.get("state", {}))
        names = list(meta["arrays"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{meta_path} is malformed: {exc!r}") from None
    _refuse_unknown(src, meta_path, names, state)
    data_path = src / fname
    try:
        data = data_path.read_bytes()
    except OSError:
        raise IntegrityError(f"{data_path} is missing or unreadable") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise IntegrityError(f"{data_path} does not match the sha256 recorded in head.json (tampered or corrupt)")
    est = cls(**params)
    est.classes_ = classes  # type: ignore[attr-defined]
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in names}
    except Exception as exc:  # noqa: BLE001 - a zip/format error or a missing array: corrupt file
        raise IntegrityError(f"{data_path} could not be read: {exc!r}") from None
    for key, arr in arrays.items():
        setattr(est, key, arr)
    for key, value in state.items():
        setattr(est, key, value)
    return est
