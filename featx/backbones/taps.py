"""A built backbone and its forward passes: the layers asked for, from one pass, as ``{layer: [B, d]}``.

A backbone with named stages (AlexNet: ``pool5`` -> ``fc6`` -> ``fc7`` -> ``logits``) runs them in order up to the
deepest layer asked for and keeps the output of each requested one (:class:`Tapped`), so all layers come from one
pass and nothing past the deepest is computed; :func:`truncated` gives the same stages as one module, which is what
fine-tuning trains.  Any other layer (``penultimate``, a graph node) is read through torchvision's feature
extractor and reduced by its recorded rule (:class:`~featx.backbones.graph.GraphTaps`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from featx.backbones.graph import GraphTaps, graph_info, unknown_layer
from featx.backbones.preprocess import Preprocess
from featx.backbones.registry import BackboneSpec, get_spec
from featx.backbones.weights import adapt_state, file_state, imagenet_state, random_identity
from featx.errors import WeightsError


@dataclass
class Backbone:
    """A built backbone: the torch module in eval mode, its stages, weights identity and preprocessing."""

    spec: BackboneSpec
    model: nn.Module
    weights_id: dict
    preprocess: Preprocess

    def stages(self) -> list[tuple[str, nn.Module]]:
        if self.spec.stages is None:
            raise ValueError(f"{self.spec.name} has no named stages: tap it with tapped()")
        return self.spec.stages(self.model)


def load_backbone(name: str = "alexnet", weights: str = "imagenet", *, seed: int = 0,
                  preprocess: Preprocess | None = None) -> Backbone:
    """Build a registered backbone with its weights.

    Args:
        name: registry name: ``alexnet``, ``vgg16``, ``resnet18``, ``resnet50`` or any torchvision classification
            model (``torchvision.models.list_models(module=torchvision.models)``).
        weights: ``imagenet`` (torchvision's published weights through its cache, ``TORCH_HOME`` honoured),
            ``random`` (initialized from ``seed``), or the path of a state-dict file.
        seed: seed of random weights.
        preprocess: override of the weights' published preprocessing (views, dataset normalization).

    Raises:
        UsageError: unknown backbone.  WeightsError: weights that cannot be had or do not fit.

    Example:
        >>> bb = load_backbone("convnext_tiny", "random", seed=0)  # doctest: +SKIP
    """
    spec = get_spec(name)
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.build()
        ident = random_identity(seed)
    else:
        state, ident = imagenet_state(spec) if weights == "imagenet" else file_state(Path(weights).expanduser())
        state = adapt_state(spec, state)
        built = _built_with(spec, state)
        if built is None:
            built = spec.build()
            try:
                built.load_state_dict(state, strict=True)
            except RuntimeError as e:
                first = [l.strip() for l in str(e).splitlines() if l.strip()][1:3]
                raise WeightsError(f"weights {ident.get('file', weights)!r} do not fit {spec.name}: "
                                   f"{' '.join(first)[:300]}") from None
        model = built
    model.eval()
    pre = preprocess or Preprocess.from_weights(spec.weights_enum())
    return Backbone(spec, model, ident, pre)


def _built_with(spec: BackboneSpec, state: dict) -> nn.Module | None:
    """The network holding ``state`` as its parameters and buffers, built on the meta device so that the random
    initialization the state replaces is never drawn (a start-up cost that grows with the network), or None when
    the state does not match the network name for name, shape for shape and dtype for dtype, or leaves a tensor
    unset (the caller then builds it the usual way, which also words the mismatch)."""
    with torch.device("meta"):
        model = spec.build()
    expected = model.state_dict()
    if set(expected) != set(state) or any(
            not isinstance(state[k], torch.Tensor) or state[k].shape != v.shape or state[k].dtype != v.dtype
            for k, v in expected.items()):
        return None
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a buffer kept out of the state dict
        return None
    return model


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


def _staged(spec: BackboneSpec, layers: Sequence[str]) -> bool:
    """Whether ``layers`` are all named stages of ``spec`` (computed by :class:`Tapped`, as featx always has)."""
    return spec.stages is not None and all(l in spec.named for l in layers)


def tapped(backbone: Backbone, layers: Sequence[str], *, start: str | None = None) -> nn.Module:
    """The module computing ``{layer: [B, d]}`` for ``layers`` (from images, or from the rows of ``start``, a
    named stage, when given): :class:`Tapped` over the named stages, else the graph's
    :class:`~featx.backbones.graph.GraphTaps`."""
    if start is not None or _staged(backbone.spec, layers):
        return Tapped(backbone.stages(), layers, start=start)
    return GraphTaps(backbone.model, backbone.spec, layers)


def check_layers(spec: BackboneSpec, layers: Sequence[str]) -> list[str]:
    """The requested layers, de-duplicated, in forward order; an unknown one is a UsageError naming the closest
    valid names.  Named stages need nothing built; any other layer is checked against the network's graph (on the
    meta device: shapes, not values), so that a node that is not a row per image is refused here too."""
    if not layers:
        return [spec.default_layer]
    if all(l in spec.named for l in layers):
        return [l for l in spec.layers if l in set(layers)]
    info = graph_info(spec)
    for l in layers:
        if not info.valid(l):
            raise unknown_layer(spec, l, info)
        info.tap(l)
    return sorted(set(layers), key=lambda l: (info.position(l), l))


def taps_config(spec: BackboneSpec, layers: Sequence[str]) -> dict | None:
    """Where each layer is read and how it becomes a row (``{layer: {"node", "shape", "reduce"}}``), for the
    feature set's config; None when every layer is a named stage (whose rows and keys are as featx always made
    them)."""
    if _staged(spec, layers):
        return None
    info = graph_info(spec)
    return {l: info.tap(l).to_json() for l in layers}


def start_layer(spec: BackboneSpec, have: Sequence[str], want: Sequence[str]) -> str | None:
    """The layer of ``have`` (cached) from which every layer of ``want`` can be computed: the deepest one at or
    before the shallowest wanted layer; None when every cached layer lies deeper than some wanted one, or when a
    layer is not a named stage (only the stages of a sequential backbone can be run from a tap onwards)."""
    order = list(spec.layers)
    if spec.stages is None or not want or any(l not in order for l in list(have) + list(want)):
        return None
    lo = min(order.index(l) for l in want)
    before = [l for l in have if order.index(l) <= lo]
    return max(before, key=order.index) if before else None


def truncated(backbone: Backbone, layer: str) -> nn.Sequential:
    """The backbone up to and including ``layer``, as one module mapping images to ``[B, d]`` features."""
    layer = check_layers(backbone.spec, [layer])[0]
    if not _staged(backbone.spec, [layer]):
        return nn.Sequential(GraphTaps(backbone.model, backbone.spec, [layer], single=True))
    mods = []
    for name, stage in backbone.stages():
        mods.append(stage)
        if name == layer:
            break
    return nn.Sequential(*mods)
