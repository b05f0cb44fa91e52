"""Any layer of any backbone: torchvision's feature-extraction graph, and how a tapped tensor becomes a row.

A layer is a named stage (``pool5``, ``fc7``; :mod:`featx.backbones.registry`), ``penultimate`` (the input of the
network's final classifier layer), ``logits`` (the network's output) or any node name of the graph that
``torchvision.models.feature_extraction.get_graph_node_names`` lists for the network in eval mode.  A node's output
becomes one row of features per image by a *reduction* chosen from its shape (``REDUCTIONS``) and recorded in the
feature set, so that the rows say how they were made:

* ``[B, d]``: kept as it is (``none``);
* ``[B, C, H, W]`` maps: the mean over the spatial positions (``mean-hw``, global average pooling); Swin keeps its
  maps channels-last, ``[B, H, W, C]`` (told apart by its two equal spatial sizes, the crops being square): the
  mean over ``H, W`` (``mean-hw-channels-last``);
* ``[B, N, D]`` token sequences: ViT's class token, the first one (``class-token``); any other network's tokens
  are averaged (``mean-tokens``);
* any other shape: flattened (``flatten``).

Shapes are found without computing anything: the network is built with its parameters on PyTorch's ``meta``
device and run on a meta tensor of the weights' crop size.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from featx.backbones.registry import BackboneSpec, closest
from featx.errors import UsageError

VIRTUAL = ("penultimate", "logits")
REDUCTIONS = ("none", "mean-hw", "mean-hw-channels-last", "class-token", "mean-tokens", "flatten")

_local = threading.local()
_cache_lock = threading.Lock()
_infos: dict[str, GraphInfo] = {}


# --------------------------------------------------------------------------------------------- meta networks

def _param_to_meta(module: nn.Module, name: str, param):
    if getattr(_local, "meta", False) and param is not None and param.device.type != "meta":
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    return None


def _buffer_to_meta(module: nn.Module, name: str, buf):
    if getattr(_local, "meta", False) and buf is not None and buf.device.type != "meta":
        return buf.to("meta")
    return None


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built in this thread inside the block get their parameters and buffers on the ``meta`` device as
    they are registered, so that initializing them costs nothing (other threads are not affected)."""
    from torch.nn.modules import module as M

    h1 = M.register_module_parameter_registration_hook(_param_to_meta)
    h2 = M.register_module_buffer_registration_hook(_buffer_to_meta)
    _local.meta = True
    try:
        yield
    finally:
        _local.meta = False
        h1.remove()
        h2.remove()


# ---------------------------------------------------------------------------------------------- reductions

def reduction_for(family: str, shape: Sequence[int]) -> str:
    """The rule that makes one row of a node's output of ``shape`` (without the batch dimension)."""
    if len(shape) == 1:
        return "none"
    if len(shape) == 2:
        return "class-token" if family == "vision_transformer" else "mean-tokens"
    if len(shape) == 3:
        if family == "swin_transformer" and shape[0] == shape[1] != shape[2]:
            return "mean-hw-channels-last"
        return "mean-hw"
    return "flatten"


def reduce(x: torch.Tensor, rule: str) -> torch.Tensor:
    """``x`` ``[B, ...]`` -> ``[B, d]`` by ``rule`` (one of :data:`REDUCTIONS`)."""
    if rule == "none":
        return x
    if rule == "mean-hw":
        return x.mean(dim=(2, 3))
    if rule == "mean-hw-channels-last":
        return x.mean(dim=(1, 2))
    if rule == "class-token":
        return x[:, 0].contiguous()
    if rule == "mean-tokens":
        return x.mean(dim=1)
    if rule == "flatten":
        return x.flatten(1)
    raise ValueError(f"unknown reduction {rule!r}")


def reduced_width(shape: Sequence[int], rule: str) -> int:
    if rule in ("none", "mean-hw", "mean-tokens", "class-token"):
        return int(shape[0]) if rule in ("none", "mean-hw") else int(shape[-1])
    if rule == "mean-hw-channels-last":
        return int(shape[2])
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass(frozen=True)
class Tap:
    """Where a layer is read (a graph node), the node's output shape per image, and the rule making it a row."""

    layer: str
    node: str
    shape: tuple[int, ...]
    reduce: str

    @property
    def dim(self) -> int:
        return reduced_width(self.shape, self.reduce)

    def to_json(self) -> dict:
        return {"node": self.node, "shape": list(self.shape), "reduce": self.reduce}


# ------------------------------------------------------------------------------------------------- the graph

@dataclass
class GraphInfo:
    """A backbone's graph on the meta device: node names in execution order, the final classifier, node shapes."""

    spec: BackboneSpec
    model: nn.Module = field(repr=False)
    crop: int
    classifier: str                   # module path of the final classifier layer (the last Linear or Conv2d run)
    classifier_in: int                # its input width (in_features, in_channels)
    _nodes: list[str] | None = field(default=None, repr=False)
    _train_nodes: set[str] = field(default_factory=set, repr=False)
    _shapes: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def nodes(self) -> list[str]:
        """The node names of the eval-mode graph, in execution order (``get_graph_node_names``)."""
        if self._nodes is None:
            train, self._nodes = get_graph_node_names(self.model, suppress_diff_warning=True)
            self._train_nodes = set(train)
            self.model.eval()
        return self._nodes

    def extractor(self, model: nn.Module, nodes: Sequence[str]) -> nn.Module:
        """``create_feature_extractor`` returning ``nodes`` (as named) in eval mode; in train mode (fine-tuning) those
        of them that the train-mode graph also has."""
        self.nodes  # noqa: B018 - traces the graph once
        train = [n for n in nodes if n in self._train_nodes] or [self.nodes[-1]]
        return create_feature_extractor(model, train_return_nodes={n: n for n in train},
                                        eval_return_nodes={n: n for n in nodes})

    def shapes(self, nodes: Sequence[str]) -> None:
        """Find the output shapes of ``nodes`` (for two images) in one meta-device pass."""
        todo = [n for n in dict.fromkeys(nodes) if n not in self._shapes]
        if not todo:
            return
        fx = self.extractor(self.model, todo).eval()
        with torch.no_grad():
            out = fx(torch.empty(2, 3, self.crop, self.crop, device="meta"))
        for n in todo:
            v = out[n]
            self._shapes[n] = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__

    def node_of(self, layer: str) -> str | None:
        if layer in self.spec.nodes:
            return self.spec.nodes[layer]
        if layer == "logits":
            return self.nodes[-1]
        if layer == "penultimate":
            i = self.nodes.index(self.classifier) if self.classifier in self.nodes else 0
            return self.nodes[i - 1] if i > 0 else None
        return layer if layer in self.nodes else None

    def output_of(self, node: str) -> tuple[int, ...] | str:
        """What ``node`` gives for two images: its shape, or the name of its type when it is not a tensor."""
        self.shapes([node])
        return self._shapes[node]

    def shape(self, node: str) -> tuple[int, ...]:
        """The output shape of ``node`` per image; a node that is not a tensor of one row per image is refused."""
        self.shapes([node])
        got = self._shapes[node]
        if isinstance(got, str):
            raise UsageError(f"node {node!r} of {self.spec.name} gives a {got}, not a tensor: choose another node")
        if len(got) < 1 or got[0] != 2:
            raise UsageError(f"node {node!r} of {self.spec.name} does not give one row per image (its output is "
                             f"{list(got)} for 2 images): choose another node")
        return tuple(int(s) for s in got[1:])

    def tap(self, layer: str) -> Tap:
        node = self.node_of(layer)
        if node is None:
            raise unknown_layer(self.spec, layer, self)
        shape = self.shape(node)
        tap = Tap(layer, node, shape, reduction_for(self.spec.family, shape))
        if layer == "penultimate" and tap.dim != self.classifier_in:
            raise UsageError(f"cannot find the input of {self.spec.name}'s classifier {self.classifier!r} in its graph "
                             f"(node {node!r} gives {tap.dim} features, the classifier takes {self.classifier_in}): "
                             f"give a node name instead")
        return tap

    def valid(self, layer: str) -> bool:
        return layer in self.spec.named or layer in VIRTUAL or layer in self.nodes

    def position(self, layer: str) -> int:
        node = self.node_of(layer)
        return self.nodes.index(node) if node in self.nodes else len(self.nodes)


def graph_info(spec: BackboneSpec) -> GraphInfo:
    """The (cached) meta-device graph of ``spec``: built once per process, in well under a second for most."""
    with _cache_lock:
        if spec.name not in _infos:
            _infos[spec.name] = _build_info(spec)
        return _infos[spec.name]


def _build_info(spec: BackboneSpec) -> GraphInfo:
    with params_on_meta():
        model = spec.build().eval()
    crop = int(spec.weights_enum().transforms().crop_size[0])
    ran: list[tuple[str, nn.Module]] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, q=q: ran.append((q, mod)))
             for q, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            model(torch.empty(2, 3, crop, crop, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    if not ran:
        raise UsageError(f"{spec.name} has no Linear or Conv2d layer: featx cannot find its classifier")
    q, cls = ran[-1]
    width = int(cls.in_features if isinstance(cls, nn.Linear) else cls.in_channels)  # type: ignore[arg-type]
    return GraphInfo(spec, model, crop, q, width)


def unknown_layer(spec: BackboneSpec, layer: str, info: GraphInfo | None = None) -> UsageError:
    """The one-line error for a layer ``spec`` does not have, naming the nearest valid names."""
    names = list(spec.named) + [v for v in VIRTUAL if v not in spec.named]
    near = closest(layer, names + (info.nodes if info is not None else []))
    hint = f"; closest: {', '.join(near)}" if near else ""
    return UsageError(f"unknown layer {layer!r} for {spec.name}: valid layers are {', '.join(names)} or any node of "
                      f"its graph (`featx backbones {spec.name} --nodes` lists them){hint}")


class LayerDims(Mapping):
    """The feature width of every layer of a backbone: iterates its named layers (in forward order) and answers for
    any valid layer (``penultimate``, ``logits``, a graph node), computing graph shapes on the meta device."""

    def __init__(self, spec: BackboneSpec):
        self.spec = spec

    def __getitem__(self, layer: str) -> int:
        if layer in self.spec.named:
            return self.spec.named[layer]
        info = graph_info(self.spec)
        if layer == "penultimate":
            return info.classifier_in  # what the classifier takes (GraphInfo.tap checks that its node gives it)
        if not info.valid(layer):
            raise KeyError(layer)
        return info.tap(layer).dim

    def __contains__(self, layer: object) -> bool:
        if not isinstance(layer, str):
            return False
        return layer in self.spec.named or graph_info(self.spec).valid(layer)

    def __iter__(self) -> Iterator[str]:
        return iter(self.spec.named)

    def __len__(self) -> int:
        return len(self.spec.named)


class GraphTaps(nn.Module):
    """Images -> ``{layer: [B, d]}`` through torchvision's feature extractor: the graph cut after the deepest
    requested node, each output reduced by its recorded rule.  ``single``: return the one layer's tensor."""

    def __init__(self, model: nn.Module, spec: BackboneSpec, layers: Sequence[str], *, single: bool = False):
        super().__init__()
        info = graph_info(spec)
        self.taps = [info.tap(layer) for layer in layers]
        self.extractor = info.extractor(model, [t.node for t in self.taps])
        self.single = single

    def forward(self, x: torch.Tensor):
        feats = self.extractor(x)
        out = {t.layer: reduce(feats[t.node], t.reduce) for t in self.taps if t.node in feats}
        return out[self.taps[0].layer] if self.single else out
