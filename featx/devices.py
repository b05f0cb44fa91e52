"""Device choice and CPU share, the same for every stage.

``--device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.  :func:`resolve_device_name` is the one rule that
turns it into a device name (``"cpu"``, ``"cuda"`` or ``"cuda:N"``: an index given is kept), without importing
torch unless a GPU may be present, so that the numpy heads (``featx fit svm|logreg``, ``featx search
svm|logreg``) start without torch's 2-4 s of imports; :func:`resolve_device` is the same answer as a
``torch.device``, for the stages that run torch.  :func:`default_workers` is how many decode workers a stage
starts by default, from :func:`cores`, this process's share of the machine's cores.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from featx.errors import UsageError

if TYPE_CHECKING:
    import torch

DEVICES_HELP = "auto, cpu or cuda (cuda:N for the device of index N)"


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


def cuda_device_count() -> int:
    """How many CUDA devices this process may use (0 without a GPU, answered without importing torch then)."""
    if not cuda_available():
        return 0
    import torch

    return int(torch.cuda.device_count())


def resolve_device_name(device: str, *, gpus: Callable[[], int] = cuda_device_count) -> str:
    """``--device`` as the name of the device to use: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    ``auto`` is ``cuda`` when a GPU is present, else ``cpu``; ``cuda`` is the current CUDA device; ``cuda:N`` stays
    ``cuda:N`` (the device of that index, never another).

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        gpus: how many CUDA devices there are (default: :func:`cuda_device_count`, asked only when needed).

    Raises:
        UsageError: an unknown name, no CUDA device, or an index past the last one.

    Example:
        >>> resolve_device_name("cpu")
        'cpu'
    """
    name = str(device).strip().lower()
    m = re.fullmatch(r"cuda:(\d+)", name)
    if name not in ("auto", "cpu", "cuda") and m is None:
        raise UsageError(f"--device {device!r}: use {DEVICES_HELP}")
    if name == "cpu":
        return "cpu"
    n = gpus()
    if name == "auto":
        return "cuda" if n > 0 else "cpu"
    if n < 1:
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    if m is not None and int(m.group(1)) >= n:
        raise UsageError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return f"cuda:{int(m.group(1))}" if m is not None else "cuda"


# the name fit and search call (it returns the device's full name, ``cuda:N`` included, not only its type)
resolve_device_type = resolve_device_name


def resolve_device(device: str, *, gpus: Callable[[], int] = cuda_device_count) -> torch.device:
    """:func:`resolve_device_name`'s answer as a ``torch.device`` (imports torch)."""
    import torch

    return torch.device(resolve_device_name(device, gpus=gpus))


def cuda_rng_devices(dev: torch.device) -> list[int]:
    """The CUDA device indices whose random generator a computation on ``dev`` draws from (none on the CPU)."""
    if dev.type != "cuda":
        return []
    if dev.index is not None:
        return [dev.index]
    import torch

    return [torch.cuda.current_device()]


def cores() -> int:
    """CPU cores for this process: its affinity set, shared out between the ranks torchrun started on the node."""
    from featx.distributed import cores_per_process

    return cores_per_process()


def default_workers(device: str = "cpu") -> int:
    """CPU: lanes (threads that each decode a batch and run the network on it), one per core up to 4, each with
    ``cores // lanes`` intra-op threads (measured on 2 cores: 2 lanes of one thread beat one forward pass on
    two threads fed by 2 decode processes, benchmarks/bench_extract.py).  CUDA: decode processes, one per core
    up to 8."""
    return max(1, min(4 if device == "cpu" else 8, cores()))
