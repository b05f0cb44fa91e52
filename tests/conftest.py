"""Shared fixtures: tiny real image folders (scikit-learn's digits and sample photos), fixed seeds."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helpers such as imagezoo import by name

# two cores: keep torch from oversubscribing them when pytest-xdist runs two workers
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeds_fixed(monkeypatch, tmp_path):
    np.random.seed(0)
    torch.manual_seed(0)
    # no test may fall back on a developer's cache or ImageNet weights
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """60 real handwritten digits (10 classes), as an image folder."""
    from featx.datasets.digits import write_digits

    return write_digits(tmp_path_factory.mktemp("digits") / "digits", limit=60)


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """Crops of scikit-learn's two real photos (china, flower) as JPEGs in two classes, 500x375 and smaller."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("photos") / "photos"
    rng = np.random.default_rng(0)
    for name, img in zip(("china", "flower"), load_sample_images().images):
        (root / name).mkdir(parents=True)
        h, w = img.shape[:2]
        for i in range(6):
            ch, cw = int(rng.integers(120, h)), int(rng.integers(160, w))
            y, x = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
            Image.fromarray(img[y:y + ch, x:x + cw]).save(root / name / f"{name} {i}.jpg", quality=90)
    return root


def run_cli(*args: str, env: dict | None = None, timeout: float = 300):
    """Run ``python -m featx`` as a real process; returns CompletedProcess (text)."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "featx", *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
