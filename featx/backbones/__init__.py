"""Backbones: every torchvision classification network by name, its layer taps, weights and preprocessing.

* :mod:`~featx.backbones.registry` - the networks (``BACKBONES``), how each is built, its published weights;
* :mod:`~featx.backbones.preprocess` - the pixels a network is fed, read off its weights' ``transforms()``;
* :mod:`~featx.backbones.weights` - published, seeded random or state-dict weights, and their identity;
* :mod:`~featx.backbones.graph` - any node of a network's graph as a row of features, by a recorded reduction;
* :mod:`~featx.backbones.taps` - a built backbone and the forward pass that taps its layers;
* :mod:`~featx.backbones.listing` - the table of backbones (``featx backbones``).
"""
from __future__ import annotations

from featx.backbones.graph import REDUCTIONS, GraphTaps, Tap, graph_info, reduce, reduction_for
from featx.backbones.preprocess import VIEW_SETS, Preprocess, dataset_stats_to_preprocess
from featx.backbones.registry import BACKBONES, BackboneSpec, get_spec, register
from featx.backbones.taps import (
    Backbone,
    Tapped,
    check_layers,
    load_backbone,
    start_layer,
    tapped,
    taps_config,
    truncated,
)
from featx.backbones.weights import torch_hub_checkpoint, weights_identity

__all__ = [
    "BACKBONES", "REDUCTIONS", "VIEW_SETS", "Backbone", "BackboneSpec", "GraphTaps", "Preprocess", "Tap", "Tapped",
    "check_layers", "dataset_stats_to_preprocess", "get_spec", "graph_info", "load_backbone", "reduce",
    "reduction_for", "register", "start_layer", "taps_config", "tapped", "torch_hub_checkpoint", "truncated",
    "weights_identity",
]
