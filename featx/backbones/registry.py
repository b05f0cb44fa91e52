"""The registry: every torchvision classification network by name, how to build it, which weights it ships with.

``alexnet``, ``vgg16``, ``resnet18`` and ``resnet50`` also carry named *stages* (AlexNet: ``pool5`` -> ``fc6`` ->
``fc7`` -> ``logits``), consecutive pieces of the network that featx runs one after the other; every other model of
``torchvision.models.list_models(module=torchvision.models)`` is registered from torchvision's own builder and its
default weights, and is tapped through its feature-extraction graph (:mod:`featx.backbones.graph`).
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torch import nn

from featx.errors import UsageError

StageFn = Callable[[nn.Module], list[tuple[str, nn.Module]]]


def _alexnet_stages(m: Any) -> list[tuple[str, nn.Module]]:
    c = m.classifier
    return [("pool5", nn.Sequential(m.features, m.avgpool, nn.Flatten(1))),
            ("fc6", c[0:3]),   # dropout (identity in eval), Linear 9216->4096, ReLU
            ("fc7", c[3:6]),   # dropout, Linear 4096->4096, ReLU
            ("logits", c[6:7])]


def _vgg_stages(m: Any) -> list[tuple[str, nn.Module]]:
    c = m.classifier
    return [("pool5", nn.Sequential(m.features, m.avgpool, nn.Flatten(1))),
            ("fc6", c[0:2]),   # Linear 25088->4096, ReLU
            ("fc7", c[2:5]),   # dropout, Linear, ReLU
            ("logits", c[5:7])]


def _resnet_stages(m: Any) -> list[tuple[str, nn.Module]]:
    trunk = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3, m.layer4,
                          m.avgpool, nn.Flatten(1))
    return [("pool", trunk), ("logits", m.fc)]


# What torchvision's builders change in the architecture when they load published weights (and featx therefore
# builds for every kind of weights, so that random, published and file weights all fit one network): GoogLeNet and
# Inception v3 normalize their input again inside the network and drop the auxiliary classifiers after loading;
# the ViTs and MaxViT are built for the weights' input size.
def _build_kwargs(name: str, weights_enum) -> dict[str, Any]:
    family = family_of(name)
    if family in ("googlenet", "inception"):
        return {"transform_input": True, "aux_logits": False, "init_weights": False}
    if family == "vision_transformer":
        return {"image_size": int(weights_enum.meta["min_size"][0])}
    if family == "maxvit":
        return {"input_size": tuple(int(s) for s in weights_enum.meta["min_size"])}
    return {}


def family_of(name: str) -> str:
    """torchvision's module of the builder: ``resnet``, ``vision_transformer``, ``swin_transformer``, ..."""
    return torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: how to build it, which weights it ships with, where its named layers are.

    ``named``: the widths of the named stage layers, in forward order (empty for a network tapped through its
    graph only).  ``dims`` answers for every layer the backbone has (named, ``penultimate``, ``logits`` or a node
    of its graph), ``layers`` lists the named ones.
    """

    name: str
    builder: str                      # torchvision.models builder name
    weights: str                      # "<WeightsEnum>.<member>"
    stages: StageFn | None = field(default=None, repr=False, compare=False)
    named: dict[str, int] = field(default_factory=dict)
    default_layer: str = "penultimate"
    # create_feature_extractor node of each named layer: the reference the tests compare against, and where a named
    # layer is read when it is extracted together with graph nodes
    nodes: dict[str, str] = field(default_factory=dict)
    build_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.named)

    @property
    def dims(self):
        """Feature width per layer: a mapping that iterates the named layers and answers for any valid layer."""
        from featx.backbones.graph import LayerDims

        return LayerDims(self)

    @property
    def family(self) -> str:
        return family_of(self.builder)

    def weights_enum(self):
        enum_name, member = self.weights.split(".")
        return torchvision.models.get_model_weights(self.builder)[member]

    def build(self) -> nn.Module:
        """The network with freshly initialized parameters (torch's global RNG decides them)."""
        fn = torchvision.models.get_model_builder(self.builder)
        try:
            return fn(weights=None, **self.build_kwargs)
        except NotImplementedError:
            # RegNet computes its widths with torch at build time, which a meta-device context cannot run
            if torch.get_default_device().type != "meta":
                raise
        from featx.backbones.graph import params_on_meta

        with torch.device("cpu"), params_on_meta():
            return fn(weights=None, **self.build_kwargs)


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


def _register_torchvision() -> None:
    """Every other classification model of torchvision, with its default (best published) weights."""
    for name in torchvision.models.list_models(module=torchvision.models):
        if name in BACKBONES:
            continue
        w = torchvision.models.get_model_weights(name).DEFAULT
        register(BackboneSpec(name, name, f"{type(w).__name__}.{w.name}", build_kwargs=_build_kwargs(name, w)))


_register_torchvision()


def closest(name: str, valid: list[str], n: int = 5) -> list[str]:
    """The valid names nearest to ``name`` (difflib's ratio), best first."""
    return difflib.get_close_matches(name, valid, n=n, cutoff=0.5)


def get_spec(name: str) -> BackboneSpec:
    """The registered backbone ``name``; an unknown one is a one-line UsageError naming the nearest valid names."""
    try:
        return BACKBONES[name]
    except KeyError:
        near = closest(str(name), list(BACKBONES))
        hint = f"closest: {', '.join(near)}; " if near else ""
        raise UsageError(f"unknown backbone {name!r}: {hint}valid backbones are {', '.join(sorted(BACKBONES))} "
                         f"(`featx backbones` lists them with their layers and widths)") from None
