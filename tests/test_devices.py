"""featx.devices: the one rule that turns --device into a device (cuda:N keeps its index), and the CPU share."""
from __future__ import annotations

import pytest
import torch

from featx.devices import (
    cuda_rng_devices,
    default_workers,
    resolve_device,
    resolve_device_name,
    resolve_device_type,
)
from featx.errors import UsageError


def two_gpus() -> int:
    return 2


def no_gpu() -> int:
    return 0


def never_asked() -> int:
    raise AssertionError("the CPU needs no GPU count")


@pytest.mark.parametrize("asked, name", [("auto", "cuda"), ("cuda", "cuda"), ("cuda:0", "cuda:0"), ("cuda:1", "cuda:1"),
                                         ("CUDA:1", "cuda:1"), ("cpu", "cpu")])
def test_with_two_gpus_an_index_given_is_kept(asked, name):
    assert resolve_device_name(asked, gpus=two_gpus) == name
    assert resolve_device(asked, gpus=two_gpus) == torch.device(name)


def test_cuda_1_is_cuda_1_as_a_torch_device_and_for_its_random_generator():
    dev = resolve_device("cuda:1", gpus=two_gpus)
    assert dev.type == "cuda" and dev.index == 1
    assert cuda_rng_devices(dev) == [1]  # dropout's generator is device 1's, not the current device's
    assert cuda_rng_devices(torch.device("cpu")) == []


def test_the_name_fit_and_search_call_keeps_the_index_too():
    assert resolve_device_type is resolve_device_name


def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_refused():
    assert resolve_device_name("auto", gpus=no_gpu) == "cpu"
    assert resolve_device_name("cpu", gpus=never_asked) == "cpu"
    for asked in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(UsageError, match=f"--device {asked}: no CUDA device is available here"):
            resolve_device_name(asked, gpus=no_gpu)


def test_an_index_past_the_last_gpu_is_refused_not_replaced():
    with pytest.raises(UsageError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device_name("cuda:2", gpus=two_gpus)


@pytest.mark.parametrize("asked", ["tpu", "cuda:", "cuda:x", "cuda:-1", "gpu:1", ""])
def test_unknown_names_are_usage_errors(asked):
    with pytest.raises(UsageError, match="use auto, cpu or cuda"):
        resolve_device_name(asked, gpus=two_gpus)


def test_this_machine_answers_consistently_with_torch():
    assert resolve_device_name("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_default_workers_stay_within_the_bounds():
    assert 1 <= default_workers("cpu") <= 4
    assert 1 <= default_workers("cuda") <= 8
