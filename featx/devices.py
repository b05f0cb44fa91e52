"""Device choice shared by every stage.

:func:`resolve_device` returns a ``torch.device`` (for the stages that run torch); :func:`resolve_device_type`
answers the same question as a string without importing torch unless a GPU may be present, so that the numpy
heads (``featx fit svm|logreg``, ``featx search svm|logreg``) start without torch's 2-4 s of imports.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import sys
from typing import TYPE_CHECKING

from featx.errors import UsageError

if TYPE_CHECKING:
    import torch


def _check_name(device: str) -> None:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device {device!r}: use auto, cpu or cuda")


def _torch_built_with_cuda() -> bool:
    """Whether the installed torch is a CUDA build, read from ``torch/version.py`` without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return False
    try:
        with open(os.path.join(os.path.dirname(spec.origin), "version.py"), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return True  # cannot tell: let torch answer
    m = re.search(r"^cuda\s*(?::[^=]*)?=\s*(.+)$", text, re.MULTILINE)
    return m is None or m.group(1).strip() != "None"


def _driver_sees_a_gpu() -> bool:
    """Whether the CUDA driver (``libcuda``) loads and reports at least one device (honours CUDA_VISIBLE_DEVICES)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    try:
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except AttributeError:
        return False


def cuda_available() -> bool:
    """``torch.cuda.is_available()``, answered without importing torch when there is plainly no GPU.

    A CPU-only torch build, or no CUDA driver with a device, means no; otherwise torch itself is asked.
    """
    if "torch" not in sys.modules and not (_torch_built_with_cuda() and _driver_sees_a_gpu()):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device_type(device: str) -> str:
    """``auto`` (``cuda`` when available, else ``cpu``), ``cpu``, ``cuda`` or ``cuda:N`` as ``"cpu"``/``"cuda"``.

    Imports torch only when a GPU may be there.  Raises :class:`UsageError` for an unknown name or an absent GPU.
    """
    _check_name(device)
    if device == "cpu":
        return "cpu"
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if not cuda_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return "cuda"


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; CUDA absent is a UsageError."""
    import torch

    _check_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return torch.device(device)
