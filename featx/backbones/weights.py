"""Weights: torchvision's published ones through its own cache, seeded random ones, or a state-dict file.

Every kind is named by an identity (``weights_id``) that feature sets record and cache keys hash: what made the
features, without the bytes.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import socket
from pathlib import Path

import torch

from featx.backbones.registry import BackboneSpec, get_spec
from featx.cache import sha256_file
from featx.errors import WeightsError

logger = logging.getLogger(__name__)

# DenseNet's published checkpoints still name their layers ``norm.1``, ``conv.2`` (torchvision renames them on load)
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")  # GoogLeNet's and Inception's auxiliary classifiers (not built)


def torch_hub_checkpoint(url: str) -> Path:
    """Where torchvision keeps a downloaded checkpoint (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _imagenet_identity(spec: BackboneSpec, url: str) -> dict:
    # torchvision's file names carry the sha256 prefix that check_hash=True verifies
    return {"kind": "imagenet", "enum": spec.weights, "file": os.path.basename(url),
            "sha256_prefix": os.path.basename(url).rsplit("-", 1)[-1].split(".")[0]}


def imagenet_state(spec: BackboneSpec, *, download_timeout: float = 30.0) -> tuple[dict, dict]:
    """The published state dict of ``spec``'s weights (downloaded into torchvision's cache if need be)."""
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
            f"ImageNet weights for {spec.name} are not in torchvision's cache and cannot be downloaded "
            f"({type(e).__name__}): "
            f"put {os.path.basename(enum.url)} (from {enum.url}) at {target} (TORCH_HOME is honoured), "
            f"or use --weights random or --weights PATH") from None
    finally:
        socket.setdefaulttimeout(old)
    return state, _imagenet_identity(spec, enum.url)


def file_state(path: Path) -> tuple[dict, dict]:
    """A plain state dict read with ``torch.load(weights_only=True)`` (common wrappers unwrapped)."""
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
        first = str(e).splitlines()[0] if str(e) else ""
        raise WeightsError(f"cannot read --weights {str(path)!r}: {type(e).__name__}: {first}") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"--weights {str(path)!r} is not a state dict (a mapping of parameter names to tensors)")
    return state, {"kind": "file", "file": str(path), "sha256": sha256_file(path)}


def adapt_state(spec: BackboneSpec, state: dict) -> dict:
    """What torchvision's builders do to a published state dict before loading it: DenseNet's old layer names
    renamed; the auxiliary classifiers of GoogLeNet and Inception v3, which featx does not build, left out."""
    family = spec.family
    if family == "densenet":
        state = {(m.group(1) + m.group(2) if (m := _DENSENET_OLD_KEY.match(k)) else k): v for k, v in state.items()}
    elif family in ("googlenet", "inception"):
        state = {k: v for k, v in state.items() if not k.startswith(_AUX_PREFIXES)}
    return state


def random_identity(seed: int) -> dict:
    return {"kind": "random", "seed": int(seed), "torch": torch.__version__.split("+")[0]}


def weights_identity(name: str = "alexnet", weights: str = "imagenet", *, seed: int = 0) -> dict:
    """The ``weights_id`` that :func:`~featx.backbones.load_backbone` records for these weights, without building the
    network or reading the weights (a file is hashed): what a cache key needs to be known in advance
    (``featx run --dry-run``).

    Raises:
        UsageError: unknown backbone.  WeightsError: a weights file that does not exist.
    """
    spec = get_spec(name)
    if weights == "random":
        return random_identity(seed)
    if weights == "imagenet":
        return _imagenet_identity(spec, spec.weights_enum().url)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"--weights {str(path)!r}: no such file (use imagenet, random, or a state-dict file)")
    return {"kind": "file", "file": str(path), "sha256": sha256_file(path)}
