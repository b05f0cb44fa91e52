"""Synthetic stand-ins for AlexNet ``pool5`` features, for benchmarks and tests.

Real pool5 activations (256 channels x 6 x 6 = 9,216 values per image) are non-negative (they come out of a
ReLU and a max-pool), mostly zero, heavy-tailed, and strongly correlated: a few hundred directions carry most
of the variance and the channels at neighbouring positions move together.  Class information is real but
weak for a linear classifier trained on a few thousand images.  :func:`make_pool5_like` imitates those
properties so that solver speed and accuracy measured on it say something about real feature sets:

* a latent code per image = class centre + within-class variation, over ``rank`` factors whose variances
  decay like a power law (the spectrum of real CNN features decays roughly that way);
* the code is mapped to channels, then spread over the spatial grid with a smooth per-image "where is the
  object" map, plus independent noise;
* a per-channel negative threshold and a ReLU make ~70% of the values exactly zero.

:func:`write_h5` stores such a set as the HDF5 layout featx reads (``pool5``, ``label``, ``split``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["make_pool5_like", "stratified_split", "write_h5"]


def make_pool5_like(
    n: int = 4000,
    d: int = 9216,
    k: int = 20,
    seed: int = 0,
    *,
    rank: int = 256,
    class_sep: float = 0.5,
    noise: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(X, y)``: ``n`` rows of ``d`` non-negative float32 "pool5-like" features in ``k`` balanced classes.

    ``class_sep`` scales the distance between class centres in latent space (relative to the within-class
    spread); the default makes a linear SVM on 85% of 4,000 rows score roughly 70-90% on the rest.  ``d`` need
    not be a multiple of 36; when it is, the features are laid out as ``d // 36`` channels x 6 x 6 positions
    like AlexNet's pool5.
    """
    if n < k or k < 2 or d < 1:
        raise ValueError(f"need n >= k >= 2 and d >= 1, got n={n}, k={k}, d={d}")
    rng = np.random.default_rng(seed)
    # Balanced labels in random order.
    y = np.resize(np.arange(k, dtype=np.int64), n)
    rng.shuffle(y)

    rank = max(1, min(rank, d))
    # Power-law factor scales: factor j has standard deviation (j+1)^-0.5, so the spectrum decays ~ 1/j.
    scales = (np.arange(1, rank + 1, dtype=np.float64) ** -0.5).astype(np.float32)
    centres = rng.standard_normal((k, rank)).astype(np.float32) * class_sep
    codes = (centres[y] + rng.standard_normal((n, rank)).astype(np.float32)) * scales

    if d % 36 == 0:
        channels, positions = d // 36, 36
    else:
        channels, positions = d, 1
    loadings = rng.standard_normal((rank, channels)).astype(np.float32) / np.sqrt(np.float32(rank))
    per_channel = codes @ loadings  # (n, channels)
    per_channel /= per_channel.std(axis=0, keepdims=True) + 1e-6

    if positions > 1:
        # A smooth 6x6 "saliency" map per image: a Gaussian bump at a random centre, so channels at nearby
        # positions are correlated and an image's activations share one spatial layout.
        grid = np.stack(np.meshgrid(np.arange(6), np.arange(6), indexing="ij"), -1).reshape(1, 36, 2)
        centre = rng.uniform(0, 5, size=(n, 1, 2))
        width = rng.uniform(1.5, 3.0, size=(n, 1))
        spatial = np.exp(-((grid - centre) ** 2).sum(-1) / (2 * width**2)).astype(np.float32)  # (n, 36)
        pre = per_channel[:, :, None] * (0.5 + spatial[:, None, :])  # (n, channels, 36)
        pre = pre.reshape(n, d)
    else:
        pre = per_channel
    pre += noise * rng.standard_normal((n, d), dtype=np.float32)
    # Channel-specific thresholds and gains, then ReLU: most values become exactly zero and the positive
    # ones are heavy-tailed, as in real pool5.
    thresh = rng.uniform(0.5, 1.5, size=d).astype(np.float32)
    gain = rng.lognormal(0.0, 0.5, size=d).astype(np.float32)
    pre -= thresh
    np.maximum(pre, 0.0, out=pre)
    pre *= gain
    X = np.ascontiguousarray(pre, dtype=np.float32)
    logger.debug("make_pool5_like: n=%d d=%d k=%d zeros=%.2f", n, d, k, float((X == 0).mean()))
    return X, y


def stratified_split(y: np.ndarray, test_fraction: float = 0.15, seed: int = 0) -> np.ndarray:
    """Return an array of ``"train"``/``"test"`` strings, ``test_fraction`` of every class in ``"test"``."""
    rng = np.random.default_rng(seed)
    split = np.full(len(y), "train", dtype=object)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(test_fraction * len(idx)))
        split[idx[:n_test]] = "test"
    return split.astype(str)


def write_h5(path: str | Path, X: np.ndarray, y: np.ndarray, split: np.ndarray | None = None, seed: int = 0) -> None:
    """Write ``X``/``y`` as HDF5 datasets ``pool5`` float32 [n, d], ``label`` int64 [n], ``split`` UTF-8 [n].

    When ``split`` is None a stratified 85/15 train/test split is drawn with ``seed``.
    """
    import h5py  # imported here so that generating arrays does not need h5py

    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if split is None:
        split = stratified_split(y, 0.15, seed)
    split = np.asarray(split).astype(str)
    if not (len(X) == len(y) == len(split)):
        raise ValueError(f"X, y and split disagree in length: {len(X)}, {len(y)}, {len(split)}")
    with h5py.File(path, "w") as f:
        f.create_dataset("pool5", data=X)
        f.create_dataset("label", data=y)
        f.create_dataset("split", data=split.astype(object), dtype=h5py.string_dtype("utf-8"))
