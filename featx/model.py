"""The network a head becomes, and a fine-tuned model on disk.

A head directory knows everything needed to rebuild the network that made its features: its source feature
set's ``manifest.json`` records the backbone, the weights identity (ImageNet, ``random`` with a seed, or a file
with its sha256), the preprocessing (dataset normalization included) and the layer.  :func:`build_from_head`
turns that into one module::

    images -> truncated(backbone, layer) -> fixed feature scaling -> head.to_torch() -> logits

which classifies images exactly as the head classified their features.  :func:`model_json` describes such a
module as data and :func:`load_model` rebuilds it from ``model.json`` and a plain state dict (``model.pt``, read
with ``torch.load(weights_only=True)``), so a model directory loads without running code.  Training it is
:mod:`featx.finetune`; classifying with it, :mod:`featx.predict`.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import featx
from featx.backbones import Backbone, Preprocess, get_spec, load_backbone, truncated
from featx.cache import read_sealed_json, repair_hint, sha256_file
from featx.errors import DataError, IntegrityError, UsageError, WeightsError
from featx.fit import FittedHead, Scaler, load_fitted

logger = logging.getLogger(__name__)

MODEL_FORMAT = 1
MODEL_FILE = "model.pt"
MODEL_META = "model.json"
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


# ============================================================================================ the network

class Affine(nn.Module):
    """``x * weight + bias`` per feature: a head's ``standard`` scaling as fixed buffers (never trained)."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(d))
        self.register_buffer("bias", torch.zeros(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, x, self.weight)


class L2Normalize(nn.Module):
    """Unit-length rows: the ``l2`` scaling (the same floor of 1e-12 on the norm as :class:`featx.fit.Scaler`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def scale_module(kind: str, d: int, scaler: Scaler | None = None) -> nn.Module:
    """The torch form of a head's feature scaling (``standard`` -> :class:`Affine`, ``l2``, ``none``)."""
    if kind == "standard":
        m = Affine(d)
        wb = scaler.affine(d) if scaler is not None else None
        if wb is not None:
            w, b = wb
            m.weight.copy_(torch.from_numpy(np.asarray(w, dtype=np.float32)))
            m.bias.copy_(torch.from_numpy(np.asarray(b, dtype=np.float32)))
        return m
    if kind == "l2":
        return L2Normalize()
    if kind == "none":
        return nn.Identity()
    raise DataError(f"unknown feature scaling {kind!r} in the head (expected standard, l2 or none)")


@dataclass
class Group:
    """One trainable unit of the backbone: a layer with parameters (its BatchNorm attached) and the
    parameter-free modules whose mode matters around it (the Dropout that feeds it)."""

    name: str            # the layer's name in the torchvision model, e.g. ``features.10`` or ``classifier.4``
    kind: str            # ``conv``, ``linear`` or ``other``
    modules: list[nn.Module]

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules for p in m.parameters(recurse=False)]


def backbone_groups(backbone: nn.Module, names: dict[int, str] | None = None) -> list[Group]:
    """Cut a truncated backbone into :class:`Group` s, in forward order (the last one is the top)."""
    names = names or {}
    groups: list[Group] = []
    pending: list[nn.Module] = []
    for qual, m in backbone.named_modules():
        if any(True for _ in m.children()):
            continue
        own = list(m.parameters(recurse=False))
        if own and isinstance(m, _NORM_TYPES) and groups:
            groups[-1].modules.extend(pending + [m])  # a norm layer belongs to the layer it normalizes
            pending = []
        elif own:
            kind = ("conv" if isinstance(m, nn.modules.conv._ConvNd) else
                    "linear" if isinstance(m, nn.Linear) else "other")
            groups.append(Group(names.get(id(m), qual), kind, pending + [m]))
            pending = []
        else:
            pending.append(m)  # ReLU, pooling, Dropout: applied before the next layer with parameters
    if pending and groups:
        groups[-1].modules.extend(pending)
    return groups


class Envelope(nn.Module):
    """Each feature clamped to ``[lo, hi]``, the range it took over the rows the head was fit on (fixed buffers,
    saved with the model, never trained)."""

    lo: torch.Tensor
    hi: torch.Tensor

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor):
        super().__init__()
        self.register_buffer("lo", lo.float())
        self.register_buffer("hi", hi.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo.to(x.dtype), self.hi.to(x.dtype))


class FinetuneNet(nn.Module):
    """Images ``[B, 3, H, W]`` -> logits ``[B, k]``: backbone up to the head's layer, [envelope,] scaling, head.

    The ``envelope`` (fine-tuned models) clamps each backbone feature to the range it took over the head's train
    rows, in training and in evaluation alike.  Why: a ``standard`` scaling divides each feature by its
    train-rows standard deviation, and some features (units that fire on one or two train images, common with
    random weights) have standard deviations 1e-4 to 1e-7 of the others'.  On an augmented view, or after one
    backbone step, those features take values thousands of standard deviations away from any the head was fit
    on, and their gain of up to 1e7 turns that into logits, losses and gradients that overflow within a few SGD
    steps (docs/finetune.md, "Why fine-tuning diverged").  Held to the range of the head's own train rows, the
    head's input stays where it was fit, whatever the augmentation or the step.  (What keeps the backbone's steps
    themselves in scale is its learning rate, x ``min(1, spread**2)``: :func:`featx.finetune.backbone_lr_scale`.)
    """

    def __init__(self, backbone: nn.Module, scale: nn.Module, head: nn.Module, groups: list[Group] | None = None,
                 envelope: Envelope | None = None):
        super().__init__()
        self.backbone = backbone
        self.scale = scale
        self.head = head
        self.envelope = envelope
        # plain list: the groups' modules are already registered under ``backbone``
        self.groups = groups if groups is not None else backbone_groups(backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        if self.envelope is not None:
            f = self.envelope(f)
        return self.head(self.scale(f))

    def set_trainable(self, top: set[int], *, dropout: bool = True) -> None:
        """Make the head and the backbone groups of index ``top`` trainable and in train mode; everything else
        is frozen and in eval mode (so a frozen part's Dropout and BatchNorm behave as at extraction).

        ``dropout=False`` keeps the backbone's Dropout layers off in the trainable groups too, as at extraction,
        so the head sees during training the features it was fit on (fine-tuning's default; the head's own
        dropout, an MLP's, still trains as it was fit)."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        for i in top:
            for p in self.groups[i].parameters():
                p.requires_grad_(True)
        for p in self.head.parameters():
            p.requires_grad_(True)
        self.train()
        self.scale.eval()
        for i, g in enumerate(self.groups):
            for m in g.modules:
                if i not in top or (not dropout and isinstance(m, nn.modules.dropout._DropoutNd)):
                    m.eval()


# ------------------------------------------------------------------------------ head modules as data

_LEAVES = {nn.Linear: "linear", nn.ReLU: "relu", nn.Dropout: "dropout", nn.Identity: "identity",
           nn.Flatten: "flatten", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.GELU: "gelu"}


def describe_module(m: nn.Module) -> dict | None:
    """A JSON description of a head module built from standard layers (``None`` when it is not one), from
    which :func:`build_module` makes the same module, with the same state-dict keys."""
    if type(m) is nn.Sequential:
        children = []
        for name, c in m.named_children():
            d = describe_module(c)
            if d is None:
                return None
            children.append([name, d])
        return {"type": "sequential", "children": children}
    kind = _LEAVES.get(type(m))
    if kind is None or list(m.buffers()):
        return None
    if isinstance(m, nn.Linear):
        return {"type": kind, "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
    if isinstance(m, nn.Dropout):
        return {"type": kind, "p": float(m.p)}
    if isinstance(m, nn.Flatten):
        return {"type": kind, "start": m.start_dim, "end": m.end_dim}
    return {"type": kind}


def build_module(desc: dict) -> nn.Module:
    """The module :func:`describe_module` described (parameters uninitialized: load a state dict into it)."""
    t = desc.get("type")
    if t == "sequential":
        seq = nn.Sequential()
        for name, child in desc["children"]:
            seq.add_module(str(name), build_module(child))
        return seq
    if t == "linear":
        return nn.Linear(int(desc["in"]), int(desc["out"]), bias=bool(desc["bias"]))
    if t == "dropout":
        return nn.Dropout(float(desc["p"]))
    if t == "flatten":
        return nn.Flatten(int(desc["start"]), int(desc["end"]))
    simple = {"relu": nn.ReLU, "identity": nn.Identity, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
    if t in simple:
        return simple[t]()
    raise IntegrityError(f"model.json describes an unknown head layer {t!r}: it was written by another featx")


# ============================================================================================ from a head

@dataclass
class HeadModel:
    """Everything rebuilt from a head directory: the network, its preprocessing and where its data lives."""

    net: FinetuneNet
    head: FittedHead
    manifest: dict
    preprocess: Preprocess
    weights_id: dict
    logit_classes: list[int]       # the class index of each logit (the estimator's ``classes_``)
    feature_spread: float | None = None  # FeatureStats.spread of the head's train rows (built for training)

    @property
    def classes(self) -> list[str]:
        return list(self.head.classes)


def preprocess_from_json(d: dict) -> Preprocess:
    """The single-view :class:`Preprocess` recorded in a manifest (dataset normalization included)."""
    try:
        mean, std = (float(x) for x in d["mean"]), (float(x) for x in d["std"])
        return Preprocess(resize=int(d["resize"]), crop=int(d["crop"]), interpolation=str(d["interpolation"]),
                          antialias=bool(d["antialias"]), mean=(next(mean), next(mean), next(mean)),
                          std=(next(std), next(std), next(std)), views=1)
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        raise DataError(f"the recorded preprocessing is incomplete ({type(e).__name__}: {e})") from None


def _source_manifest(fh: FittedHead) -> tuple[Path, dict]:
    src = fh.meta.get("source") or {}
    if "backbone" not in src:
        raise UsageError(f"head {fh.path.name} was fit on a plain HDF5 file ({src.get('features')}): it records no "
                         f"backbone, weights or images, so it cannot be put back on a network; fit a head on a "
                         f"feature set made by featx extract")
    from featx.store import read_manifest

    fdir = Path(src["features"])
    manifest = read_manifest(fdir) if fdir.is_dir() else None
    if not isinstance(manifest, dict):
        raise DataError(f"head {fh.path.name}: its feature set {str(fdir)!r} is gone (no readable manifest.json); "
                        f"re-extract it with the same options")
    if src.get("key") and manifest.get("key") != src["key"]:
        raise IntegrityError(f"head {fh.path.name}: the feature set at {fdir} is not the one it was fit on "
                             f"(key {manifest.get('key')} vs {src['key']})")
    return fdir, manifest


def _check_match(fh: FittedHead, config: dict) -> None:
    """The head, its source record and the feature set's config must name the same network, layer and pixels."""
    src = fh.meta["source"]
    spec = get_spec(config["backbone"])
    layer = fh.layer
    for what in ("backbone", "weights", "preprocess"):
        if src.get(what) != config.get(what):
            raise DataError(f"head {fh.path.name} records another {what} than its feature set "
                            f"({json.dumps(src.get(what))[:80]} vs {json.dumps(config.get(what))[:80]})")
    if layer not in spec.dims or layer not in config.get("layers", []):
        raise DataError(f"layer/backbone mismatch: head {fh.path.name} is on layer {layer!r}, but its {spec.name} "
                        f"feature set has {', '.join(config.get('layers', [])) or 'no layers'}")
    d = int(fh.meta.get("n_features") or src.get("dim") or 0)
    if d != spec.dims[layer]:
        raise DataError(f"layer/backbone mismatch: head {fh.path.name} expects {d} features, {spec.name} {layer} "
                        f"gives {spec.dims[layer]}")


def _backbone_for(config: dict) -> Backbone:
    """The backbone with exactly the weights the features were extracted with."""
    ident = config["weights"]
    name = config["backbone"]
    kind = ident.get("kind")
    pre = preprocess_from_json(config["preprocess"])
    if kind == "random":
        torch_now = torch.__version__.split("+")[0]
        if ident.get("torch") and ident["torch"] != torch_now:
            logger.warning("the features' random weights were made by torch %s, this is %s: the initialization may "
                           "differ, and the network may no longer match the head", ident["torch"], torch_now)
        return load_backbone(name, "random", seed=int(ident.get("seed", 0)), preprocess=pre)
    if kind == "file":
        path = Path(ident["file"])
        if not path.is_file():
            raise WeightsError(f"the weights file the features were extracted with, {str(path)!r}, is gone: "
                               f"put it back")
        if sha256_file(path) != ident.get("sha256"):
            raise IntegrityError(f"the weights file {str(path)!r} changed since the features were extracted "
                                 f"(sha256 differs): the head no longer matches it; restore it or re-extract")
        return load_backbone(name, str(path), preprocess=pre)
    if kind == "imagenet":
        spec = get_spec(name)
        if ident.get("enum") not in (None, spec.weights):
            raise DataError(f"the features used {ident['enum']} but featx's {name} now ships {spec.weights}")
        return load_backbone(name, "imagenet", preprocess=pre)
    raise DataError(f"unknown weights kind {kind!r} in the feature set's manifest")


def head_torch(fh: FittedHead) -> nn.Module:
    """The head's estimator as torch layers (``to_torch()``); an RBF SVM and the like cannot be."""
    to_torch = getattr(fh.estimator, "to_torch", None)
    if to_torch is None:
        raise UsageError(f"the {fh.meta.get('kind')} head {fh.path.name} cannot be turned into torch layers")
    try:
        module = to_torch()
    except UsageError as e:
        raise UsageError(f"head {fh.path.name} cannot be fine-tuned: {e}") from None
    return module.float()


@dataclass
class FeatureStats:
    """Per-feature range and spread of the train rows of a head's layer (in the backbone's units, before scaling)."""

    lo: np.ndarray
    hi: np.ndarray
    std: np.ndarray

    @property
    def spread(self) -> float | None:
        """The median train standard deviation of the features that vary (None when none does): how far apart the
        images lie in the backbone's units, i.e. the scale of the differences the head was fit to tell apart."""
        live = self.std[self.std > 0]
        return float(np.median(live)) if len(live) else None

    def envelope(self) -> Envelope:
        return Envelope(torch.from_numpy(self.lo), torch.from_numpy(self.hi))


def feature_stats(fh: FittedHead) -> FeatureStats:
    """Min, max and standard deviation of each feature over the train rows of the head's layer in its source
    feature set: one pass over those rows, a shard at a time (float64 sums; no copy of the matrix is held).

    Raises:
        DataError: the feature set has no train rows of that layer.
    """
    from featx.store import FeatureSet

    fs = FeatureSet(fh.meta["source"]["features"])
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    s: np.ndarray | None = None
    ss: np.ndarray | None = None
    n = 0
    for X, _ in fs.iter_chunks(fh.layer, "train"):
        a, b = X.min(0), X.max(0)
        lo, hi = (a, b) if lo is None or hi is None else (np.minimum(lo, a), np.maximum(hi, b))
        for i in range(0, len(X), 512):  # bounded float64 temporaries
            X64 = X[i:i + 512].astype(np.float64)
            s = X64.sum(0) if s is None else s + X64.sum(0)
            ss = np.einsum("ij,ij->j", X64, X64) if ss is None else ss + np.einsum("ij,ij->j", X64, X64)
        n += len(X)
    if lo is None or hi is None or s is None or ss is None or not n:
        raise DataError(f"head {fh.path.name}: its feature set has no train rows of layer {fh.layer!r}")
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 0.0))
    std[(hi - lo) <= 0] = 0.0  # constant over the train rows: no rounding residue counts as spread
    return FeatureStats(lo, hi, std)


def build_from_head(head: str | os.PathLike | FittedHead, *, envelope: bool = False) -> HeadModel:
    """Rebuild backbone + scaling + head from a head directory (weights checked, nothing trained).

    Args:
        head: a head directory written by ``featx fit`` (or an already loaded :class:`FittedHead`).
        envelope: for training: clamp the features to the range of the head's train rows (:class:`FinetuneNet`;
            only with a ``standard`` scaling, the one whose gain needs bounding) and measure their spread
            (``HeadModel.feature_spread``, which scales the backbone's learning rate).  Costs a pass over those
            rows.  Without it (the default) the network is exactly the head on its backbone.

    Returns:
        :class:`HeadModel` with the network in eval mode on the CPU.

    Raises:
        DataError: the head is not a head, its feature set is gone, or they disagree (layer/backbone mismatch).
        IntegrityError: a head file or the weights file changed.  UsageError: the head cannot become torch
        layers (RBF SVM) or was fit on a plain HDF5 file.  WeightsError: weights that cannot be had.
    """
    fh = head if isinstance(head, FittedHead) else load_fitted(head)
    head_module = head_torch(fh)
    _, manifest = _source_manifest(fh)
    config = manifest["config"]
    _check_match(fh, config)
    bb = _backbone_for(config)
    names = {id(m): n for n, m in bb.model.named_modules()}
    trunk = truncated(bb, fh.layer)
    d = bb.spec.dims[fh.layer]
    groups = backbone_groups(trunk, names)
    stats = feature_stats(fh) if envelope else None
    env = stats.envelope() if stats is not None and fh.scaler.kind == "standard" else None
    net = FinetuneNet(trunk, scale_module(fh.scaler.kind, d, fh.scaler), head_module, groups, env)
    net.eval()
    logit_classes = [int(c) for c in np.asarray(getattr(fh.estimator, "classes_", np.arange(len(fh.classes))))]
    with torch.inference_mode():
        k = net.head(torch.zeros(1, d)).shape[1]
    if k != len(logit_classes):
        raise DataError(f"head {fh.path.name}: its torch form gives {k} logits for {len(logit_classes)} classes")
    return HeadModel(net, fh, manifest, bb.preprocess, bb.weights_id, logit_classes,
                     stats.spread if stats is not None else None)


# ============================================================================================ on disk

def model_json(hm: HeadModel, net: FinetuneNet, *, options: dict | None = None, key: str = "",
               best_epoch: int | None = None) -> dict:
    """The description ``model.json`` holds: enough to rebuild :class:`FinetuneNet` and preprocess its input."""
    config = hm.manifest["config"]
    desc = describe_module(net.head)
    d = get_spec(config["backbone"]).dims[hm.head.layer]
    return {
        "format": MODEL_FORMAT, "featx_version": featx.__version__, "key": key,
        "backbone": config["backbone"], "weights": hm.weights_id, "layer": hm.head.layer, "dim": d,
        "preprocess": pre_json(hm.preprocess), "classes": hm.classes, "logit_classes": hm.logit_classes,
        "head": {"kind": hm.head.meta.get("kind"), "params": hm.head.meta.get("params"),
                 "scores": "decision values" if hm.head.meta.get("kind") == "svm" else "logits",
                 "module": desc, "dir": str(hm.head.path), "files": hm.head.meta.get("files"),
                 "shapes": {k: list(v.shape) for k, v in net.head.state_dict().items()}},
        "scaler": {"kind": hm.head.scaler.kind, "dim": d},
        "features": hm.head.meta["source"].get("features"), "features_key": hm.head.meta["source"].get("key"),
        "options": options, "best_epoch": best_epoch,
        "envelope": net.envelope is not None,  # features clamped to the head's train range (FinetuneNet)
    }


def pre_json(pre: Preprocess) -> dict:
    d = pre.to_json()
    d.pop("view_names", None)
    return d


_ON_BY_DEFAULT = ("scale_backbone_lr",)  # boolean options whose flag is --X/--no-X, on by default


def finetune_command(head: Path, options: dict, *, seed: int, cache: Path) -> list[str]:
    """The ``featx finetune`` command line of these options (each option's flag is its name with dashes)."""
    argv = ["featx", "finetune", str(head)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is False and name in _ON_BY_DEFAULT:
            argv.append("--no-" + flag[2:])
            continue
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        else:
            if isinstance(value, (list, tuple)):  # --augment: [] is "none"
                value = ",".join(map(str, value)) or "none"
            argv += [flag, str(value)]
    return argv + ["--seed", str(seed), "--cache", str(cache)]


def read_model_meta(path: Path) -> dict | None:
    """``model.json`` checked against its digest (None when there is none). Raises IntegrityError when damaged."""
    return read_sealed_json(Path(path) / MODEL_META, what="model description",
                            fix=repair_hint(path, verb="fine-tune it again"))


def model_file_problem(path: Path, meta: dict) -> str | None:
    """What is wrong with ``model.pt`` against the sha256 that ``model.json`` records, or None."""
    f = Path(path) / MODEL_FILE
    if not f.is_file():
        return f"{MODEL_FILE} is missing"
    want = (meta.get("files") or {}).get(MODEL_FILE)
    if want and sha256_file(f) != want:
        return f"{MODEL_FILE} is damaged or was modified after it was written (sha256 differs)"
    return None


def model_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a finished model directory (``model.json``'s seal, ``model.pt``'s sha256), or None."""
    try:
        meta = read_model_meta(Path(path))
    except IntegrityError as e:
        return str(e).split(": run ")[0]
    if meta is None:
        return f"{MODEL_META} is missing"
    return model_file_problem(Path(path), meta)


def load_model(path: str | os.PathLike) -> tuple[FinetuneNet, dict]:
    """Rebuild a fine-tuned model directory: ``(net in eval mode on the CPU, model.json)``.

    The backbone architecture comes from the registry and the head from ``model.json``'s description; every
    tensor comes from ``model.pt`` through ``torch.load(weights_only=True)`` (no code runs).

    Raises:
        DataError: not a model directory. IntegrityError: ``model.pt`` changed, or does not fit the description.
    """
    path = Path(path).expanduser().absolute()
    meta = read_model_meta(path)
    if not isinstance(meta, dict) or "backbone" not in meta:
        raise DataError(f"{str(path)!r} is not a fine-tuned model (no readable {MODEL_META})")
    f = path / MODEL_FILE
    problem = model_file_problem(path, meta)
    if problem:
        raise IntegrityError(f"model {path}: {problem}: {repair_hint(path, verb='fine-tune it again')}")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise IntegrityError(f"model {path.name}: {MODEL_FILE} cannot be read as a plain state dict "
                             f"({type(e).__name__})") from None
    spec = get_spec(meta["backbone"])
    with torch.device("meta"):  # no time spent initializing weights that the state dict replaces
        bb = Backbone(spec, spec.build(), meta["weights"], preprocess_from_json(meta["preprocess"]))
        trunk = truncated(bb, meta["layer"])
        scale = scale_module(meta["scaler"]["kind"], int(meta["dim"]))
        env = Envelope(torch.empty(int(meta["dim"])), torch.empty(int(meta["dim"]))) if meta.get("envelope") else None
        desc = meta["head"].get("module")
        head = build_module(desc) if desc else None
    if head is None:  # a head whose torch form is not plain layers: rebuild it from its (unchanged) directory
        fh = load_fitted(meta["head"]["dir"])
        if fh.meta.get("files") != meta["head"].get("files"):
            raise IntegrityError(f"model {path.name}: its head directory {meta['head']['dir']} changed")
        head = head_torch(fh).to("meta")
    names = {id(m): n for n, m in bb.model.named_modules()}
    net = FinetuneNet(trunk, scale, head, backbone_groups(trunk, names), env)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = [l.strip() for l in str(e).splitlines() if l.strip()][1:2]
        raise IntegrityError(f"model {path.name}: {MODEL_FILE} does not fit model.json "
                             f"({' '.join(first)[:200]})") from None
    net.eval()
    return net, meta
