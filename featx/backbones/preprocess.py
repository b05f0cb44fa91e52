"""The pixels a backbone is fed: torchvision's ``ImageClassification`` preset read off the weights, and its views.

Preprocessing travels with the weights, as in torchvision: :meth:`Preprocess.from_weights` reads the weights enum's
published ``transforms()`` (resize, crop, interpolation, mean/std), and the pixels featx feeds the network are
exactly those.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from featx.errors import UsageError

VIEW_SETS: dict[int, tuple[str, ...]] = {
    1: ("center",),
    2: ("center", "center_flip"),
    5: ("center", "top_left", "top_right", "bottom_left", "bottom_right"),
    10: ("center", "top_left", "top_right", "bottom_left", "bottom_right",
         "center_flip", "top_left_flip", "top_right_flip", "bottom_left_flip", "bottom_right_flip"),
}


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side, crop, scale to [0, 1], normalize: torchvision's ``ImageClassification`` preset.

    The work is split in two so that it can be spread over processes without changing a single value:
    :meth:`pixels` (decode-side, per image: resize + crop(s) -> uint8) and :meth:`normalize` (batch-side:
    ``/255``, ``-mean``, ``/std``, the very operations ``ImageClassification`` applies).
    """

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    antialias: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    views: int = 1

    def __post_init__(self) -> None:
        if self.views not in VIEW_SETS:
            raise UsageError(f"--views {self.views} is not supported: use one of {sorted(VIEW_SETS)}")

    @classmethod
    def from_weights(cls, weights_enum, **overrides) -> Preprocess:
        t = weights_enum.transforms()
        return cls(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), interpolation=t.interpolation.value,
                   antialias=bool(t.antialias), mean=_rgb(t.mean), std=_rgb(t.std), **overrides)

    def to_json(self) -> dict:
        d = asdict(self)
        d["view_names"] = list(self.view_names)
        return d

    @property
    def view_names(self) -> tuple[str, ...]:
        return VIEW_SETS[self.views]

    def pixels(self, img) -> torch.Tensor:
        """uint8 ``[V, 3, crop, crop]`` for a Pillow RGB image: one row per view."""
        img = TF.resize(img, [self.resize], interpolation=InterpolationMode(self.interpolation),
                        antialias=self.antialias)
        if self.views == 1:
            crops = [TF.center_crop(img, [self.crop])]
        else:
            tl, tr, bl, br, center = TF.five_crop(img, [self.crop])
            crops = [center] if self.views == 2 else [center, tl, tr, bl, br]
            if self.views in (2, 10):
                crops = crops + [TF.hflip(c) for c in crops]
        return torch.stack([TF.pil_to_tensor(c) for c in crops])

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """float32 network input from a uint8 ``[B, 3, H, W]`` batch (on any device)."""
        x = TF.convert_image_dtype(batch, torch.float32)
        return TF.normalize(x, mean=list(self.mean), std=list(self.std), inplace=True)

    def transform(self, img) -> torch.Tensor:
        """The whole preprocessing for one image and the first view, as ``weights.transforms()`` would do it."""
        return self.normalize(self.pixels(img)[:1])[0]


def dataset_stats_to_preprocess(pre: Preprocess, mean: np.ndarray, std: np.ndarray) -> Preprocess:
    """The same preprocessing with per-channel statistics measured on the data (``--normalize dataset``)."""
    return Preprocess(pre.resize, pre.crop, pre.interpolation, pre.antialias, _rgb(mean), _rgb(std), pre.views)


def _rgb(values) -> tuple[float, float, float]:
    r, g, b = (float(x) for x in values)
    return r, g, b
