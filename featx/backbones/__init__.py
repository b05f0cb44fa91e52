"""Backbones: a registry of torchvision networks, their layer taps, weights and preprocessing.

A backbone is cut into consecutive *stages*, each ending at a named layer (AlexNet: ``pool5`` -> ``fc6`` ->
``fc7`` -> ``logits``). A forward pass runs the stages in order up to the deepest layer asked for and keeps the
output of each requested one, so all layers come from one pass and nothing past the deepest is computed.
:func:`truncated` gives the same stages as one module, which is what fine-tuning trains.

Preprocessing travels with the weights, as in torchvision: :class:`Preprocess` is read off the weights enum's
published ``transforms()``, and the pixels featx feeds the network are exactly those.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from featx.cache import sha256_file
from featx.errors import UsageError, WeightsError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- preprocessing

VIEW_SETS: dict[int, tuple[str, ...]] = {
    1: ("center",),
    2: ("center", "center_flip"),
    5: ("center", "top_left", "top_right", "bottom_left", "bottom_right"),
    10: ("center", "top_left", "top_right", "bottom_left", "bottom_right",
         "center_flip", "top_left_flip", "top_right_flip", "bottom_left_flip", "bottom_right_flip"),
}


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side, crop, scale to [0, 1], normalize: torchvision's ``ImageClassification`` preset.

    The work is split in two so that it can be spread over processes without changing a single value:
    :meth:`pixels` (decode-side, per image: resize + crop(s) -> uint8) and :meth:`normalize` (batch-side:
    ``/255``, ``-mean``, ``/std``, the very operations ``ImageClassification`` applies).
    """

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    antialias: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    views: int = 1

    def __post_init__(self) -> None:
        if self.views not in VIEW_SETS:
            raise UsageError(f"--views {self.views} is not supported: use one of {sorted(VIEW_SETS)}")

    @classmethod
    def from_weights(cls, weights_enum, **overrides) -> Preprocess:
        t = weights_enum.transforms()
        return cls(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), interpolation=t.interpolation.value,
                   antialias=bool(t.antialias), mean=tuple(float(x) for x in t.mean),
                   std=tuple(float(x) for x in t.std), **overrides)

    def to_json(self) -> dict:
        d = asdict(self)
        d["view_names"] = list(self.view_names)
        return d

    @property
    def view_names(self) -> tuple[str, ...]:
        return VIEW_SETS[self.views]

    def pixels(self, img) -> torch.Tensor:
        """uint8 ``[V, 3, crop, crop]`` for a Pillow RGB image: one row per view."""
        img = TF.resize(img, [self.resize], interpolation=InterpolationMode(self.interpolation), antialias=self.antialias)
        if self.views == 1:
            crops = [TF.center_crop(img, [self.crop])]
        else:
            tl, tr, bl, br, center = TF.five_crop(img, [self.crop])
            crops = [center] if self.views == 2 else [center, tl, tr, bl, br]
            if self.views in (2, 10):
                crops = crops + [TF.hflip(c) for c in crops]
        return torch.stack([TF.pil_to_tensor(c) for c in crops])

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """float32 network input from a uint8 ``[B, 3, H, W]`` batch (on any device)."""
        x = TF.convert_image_dtype(batch, torch.float32)
        return TF.normalize(x, mean=list(self.mean), std=list(self.std), inplace=True)

    def transform(self, img) -> torch.Tensor:
        """The whole preprocessing for one image and the first view, as ``weights.transforms()`` would do it."""
        return self.normalize(self.pixels(img)[:1])[0]


# ------------------------------------------------------------------------------------------------- registry

StageFn = Callable[[nn.Module], list[tuple[str, nn.Module]]]


def _alexnet_stages(m: nn.Module) -> list[tuple[str, nn.Module]]:
    c = m.classifier
    return [("pool5", nn.Sequential(m.features, m.avgpool, nn.Flatten(1))),
            ("fc6", c[0:3]),   # dropout (identity in eval), Linear 9216->4096, ReLU
            ("fc7", c[3:6]),   # dropout, Linear 4096->4096, ReLU
            ("logits", c[6:7])]


def _vgg_stages(m: nn.Module) -> list[tuple[str, nn.Module]]:
    c = m.classifier
    return [("pool5", nn.Sequential(m.features, m.avgpool, nn.Flatten(1))),
            ("fc6", c[0:2]),   # Linear 25088->4096, ReLU
            ("fc7", c[2:5]),   # dropout, Linear, ReLU
            ("logits", c[5:7])]


def _resnet_stages(m: nn.Module) -> list[tuple[str, nn.Module]]:
    trunk = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4,
                          m.avgpool, nn.Flatten(1))
    return [("pool", trunk), ("logits", m.fc)]


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: how to build it, which weights it ships with, where its layers are."""

    name: str
    builder: str                      # torchvision.models function
    weights: str                      # attribute of torchvision.models: "<Enum>.<member>"
    stages: StageFn = field(repr=False, compare=False)
    dims: dict[str, int] = field(default_factory=dict)
    default_layer: str = "pool5"
    # create_feature_extractor node names of each layer: the reference the tests compare against
    nodes: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.dims)

    def weights_enum(self):
        enum_name, member = self.weights.split(".")
        return getattr(getattr(torchvision.models, enum_name), member)

    def build(self) -> nn.Module:
        return getattr(torchvision.models, self.builder)(weights=None)


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    BACKBONES[spec.name] = spec
    return spec


register(BackboneSpec("alexnet", "alexnet", "AlexNet_Weights.IMAGENET1K_V1", _alexnet_stages,
                      {"pool5": 9216, "fc6": 4096, "fc7": 4096, "logits": 1000}, "pool5",
                      {"pool5": "flatten", "fc6": "classifier.2", "fc7": "classifier.5", "logits": "classifier.6"}))
register(BackboneSpec("vgg16", "vgg16", "VGG16_Weights.IMAGENET1K_V1", _vgg_stages,
                      {"pool5": 25088, "fc6": 4096, "fc7": 4096, "logits": 1000}, "pool5",
                      {"pool5": "flatten", "fc6": "classifier.1", "fc7": "classifier.4", "logits": "classifier.6"}))
register(BackboneSpec("resnet18", "resnet18", "ResNet18_Weights.IMAGENET1K_V1", _resnet_stages,
                      {"pool": 512, "logits": 1000}, "pool", {"pool": "flatten", "logits": "fc"}))
register(BackboneSpec("resnet50", "resnet50", "ResNet50_Weights.IMAGENET1K_V2", _resnet_stages,
                      {"pool": 2048, "logits": 1000}, "pool", {"pool": "flatten", "logits": "fc"}))


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UsageError(f"unknown backbone {name!r}: valid backbones are {', '.join(sorted(BACKBONES))}") from None


def check_layers(spec: BackboneSpec, layers: Sequence[str]) -> list[str]:
    """The requested layers, de-duplicated, in forward order; an unknown one is a UsageError listing the valid."""
    bad = [l for l in layers if l not in spec.dims]
    if bad:
        raise UsageError(f"unknown layer {bad[0]!r} for {spec.name}: valid layers are {', '.join(spec.layers)}")
    if not layers:
        return [spec.default_layer]
    return [l for l in spec.layers if l in set(layers)]


# -------------------------------------------------------------------------------------------------- weights

def torch_hub_checkpoint(url: str) -> Path:
    """Where torchvision keeps a downloaded checkpoint (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _imagenet_state(spec: BackboneSpec, *, download_timeout: float = 30.0) -> tuple[dict, dict]:
    enum = spec.weights_enum()
    target = torch_hub_checkpoint(enum.url)
    if not target.exists():
        logger.info("downloading %s weights to %s", spec.weights, target)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(download_timeout)  # offline, fail in seconds rather than hang
    try:
        state = torch.hub.load_state_dict_from_url(enum.url, progress=False, check_hash=True, map_location="cpu")
    except Exception as e:  # network errors come in many types (URLError, socket errors, HTTP errors)
        raise WeightsError(
            f"ImageNet weights for {spec.name} are not in torchvision's cache and cannot be downloaded ({type(e).__name__}): "
            f"put {os.path.basename(enum.url)} (from {enum.url}) at {target} (TORCH_HOME is honoured), "
            f"or use --weights random or --weights PATH") from None
    finally:
        socket.setdefaulttimeout(old)
    ident = {"kind": "imagenet", "enum": spec.weights, "file": os.path.basename(enum.url),
             # torchvision's file names carry the sha256 prefix that check_hash=True has just verified
             "sha256_prefix": os.path.basename(enum.url).rsplit("-", 1)[-1].split(".")[0]}
    return state, ident


def _file_state(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise WeightsError(f"--weights {str(path)!r}: no such file (use imagenet, random, or a state-dict file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower():  # torch reports both kinds as UnpicklingError; code needs a GLOBAL
            raise WeightsError(f"cannot read --weights {str(path)!r}: not a torch checkpoint") from None
        raise WeightsError(f"refusing --weights {str(path)!r}: it is not a plain state dict (it holds objects that "
                           f"torch.load(weights_only=True) will not run); save model.state_dict() instead") from None
    except Exception as e:
        raise WeightsError(f"cannot read --weights {str(path)!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"--weights {str(path)!r} is not a state dict (a mapping of parameter names to tensors)")
    return state, {"kind": "file", "file": str(path), "sha256": sha256_file(path)}


def weights_identity(name: str = "alexnet", weights: str = "imagenet", *, seed: int = 0) -> dict:
    """The ``weights_id`` that :func:`load_backbone` records for these weights, without building the network or
    reading the weights (a file is hashed): what a cache key needs to be known in advance (``featx run --dry-run``).

    Raises:
        UsageError: unknown backbone.  WeightsError: a weights file that does not exist.
    """
    spec = get_spec(name)
    if weights == "random":
        return {"kind": "random", "seed": int(seed), "torch": torch.__version__.split("+")[0]}
    if weights == "imagenet":
        url = spec.weights_enum().url
        return {"kind": "imagenet", "enum": spec.weights, "file": os.path.basename(url),
                "sha256_prefix": os.path.basename(url).rsplit("-", 1)[-1].split(".")[0]}
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"--weights {str(path)!r}: no such file (use imagenet, random, or a state-dict file)")
    return {"kind": "file", "file": str(path), "sha256": sha256_file(path)}


@dataclass
class Backbone:
    """A built backbone: the torch module in eval mode, its stages, weights identity and preprocessing."""

    spec: BackboneSpec
    model: nn.Module
    weights_id: dict
    preprocess: Preprocess

    def stages(self) -> list[tuple[str, nn.Module]]:
        return self.spec.stages(self.model)


def load_backbone(name: str = "alexnet", weights: str = "imagenet", *, seed: int = 0,
                  preprocess: Preprocess | None = None) -> Backbone:
    """Build a registered backbone with its weights.

    Args:
        name: registry name (``alexnet``, ``vgg16``, ``resnet18``, ``resnet50``).
        weights: ``imagenet`` (torchvision's published weights through its cache, ``TORCH_HOME`` honoured),
            ``random`` (initialized from ``seed``), or the path of a state-dict file.
        seed: seed of random weights.
        preprocess: override of the weights' published preprocessing (views, dataset normalization).

    Raises:
        UsageError: unknown backbone.  WeightsError: weights that cannot be had or do not fit.
    """
    spec = get_spec(name)
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.build()
        ident = {"kind": "random", "seed": int(seed), "torch": torch.__version__.split("+")[0]}
    else:
        model = spec.build()
        state, ident = _imagenet_state(spec) if weights == "imagenet" else _file_state(Path(weights).expanduser())
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = [l.strip() for l in str(e).splitlines() if l.strip()][1:3]
            raise WeightsError(f"weights {ident.get('file', weights)!r} do not fit {spec.name}: {' '.join(first)[:300]}") from None
    model.eval()
    pre = preprocess or Preprocess.from_weights(spec.weights_enum())
    return Backbone(spec, model, ident, pre)


# ------------------------------------------------------------------------------------------------- forwards

class Tapped(nn.Module):
    """Runs a backbone's stages up to the deepest requested layer; returns ``{layer: [B, d] tensor}``.

    ``start``: run "from tap A to tap B": the input is then the output of layer ``start`` (rows a feature set
    holds) rather than images, and only the stages after it run; ``start`` itself may be among ``layers``
    (returned as given).  That is how a deeper layer is computed from a cached shallower one, with the very
    modules a direct pass would run after it.
    """

    def __init__(self, stages: list[tuple[str, nn.Module]], layers: Sequence[str], *, start: str | None = None):
        super().__init__()
        names = [n for n, _ in stages]
        first = 0 if start is None else names.index(start) + 1
        last = max(names.index(l) for l in layers)
        if last < first - 1:
            raise ValueError(f"layers {list(layers)} lie before the start layer {start!r}")
        self.start = start
        self.names = names[first:last + 1]
        self.keep = set(layers)
        self.stages = nn.ModuleList([m for _, m in stages[first:last + 1]])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        if self.start is not None and self.start in self.keep:
            out[self.start] = x
        for name, stage in zip(self.names, self.stages):
            x = stage(x)
            if name in self.keep:
                out[name] = x
        return out


def start_layer(spec: BackboneSpec, have: Sequence[str], want: Sequence[str]) -> str | None:
    """The layer of ``have`` (cached) from which every layer of ``want`` can be computed: the deepest one at or
    before the shallowest wanted layer; None when every cached layer lies deeper than some wanted one."""
    order = list(spec.layers)
    if not want or any(l not in order for l in list(have) + list(want)):
        return None
    lo = min(order.index(l) for l in want)
    before = [l for l in have if order.index(l) <= lo]
    return max(before, key=order.index) if before else None


def truncated(backbone: Backbone, layer: str) -> nn.Sequential:
    """The backbone up to and including ``layer``, as one module mapping images to ``[B, d]`` features."""
    check_layers(backbone.spec, [layer])
    mods = []
    for name, stage in backbone.stages():
        mods.append(stage)
        if name == layer:
            break
    return nn.Sequential(*mods)


def feature_dim(spec: BackboneSpec, layer: str) -> int:
    return int(spec.dims[layer])


def dataset_stats_to_preprocess(pre: Preprocess, mean: np.ndarray, std: np.ndarray) -> Preprocess:
    """The same preprocessing with per-channel statistics measured on the data (``--normalize dataset``)."""
    return Preprocess(pre.resize, pre.crop, pre.interpolation, pre.antialias,
                      tuple(float(x) for x in mean), tuple(float(x) for x in std), pre.views)
