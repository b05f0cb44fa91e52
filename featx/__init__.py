"""featx: pretrained-CNN features off the shelf.

The stages, one module each: :mod:`featx.datasets` (find images) -> :mod:`featx.backbones` (networks and their
layer taps) -> :mod:`featx.extract` (batch extraction) -> :mod:`featx.store` (feature sets on disk) ->
:mod:`featx.heads` (classifiers) -> :mod:`featx.fit` -> :mod:`featx.search` -> :mod:`featx.finetune` ->
:mod:`featx.run` (the cases of a pipeline file, read by :mod:`featx.pipeline`, through those stages); the CLI
(:mod:`featx.cli`) is a thin layer on top.
"""
from __future__ import annotations

__version__ = "0.1.0"

from featx.errors import DataError, FeatxError, IntegrityError, UsageError, WeightsError

__all__ = [
    "__version__",
    "FeatxError",
    "UsageError",
    "DataError",
    "WeightsError",
    "IntegrityError",
]
