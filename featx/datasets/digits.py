"""scikit-learn's 1,797 handwritten digits written as an image folder: real data that needs no download.

``featx demo`` and the pipelines whose ``data.path`` is ``sklearn:digits`` read them from this folder as from
any other class-folder dataset.
"""
from __future__ import annotations

import os
from pathlib import Path


def write_digits(root: str | os.PathLike, *, limit: int | None = None) -> Path:
    """Write scikit-learn's digits as ``root/<digit>/digit-<index>.png`` (grey, 8x8, intensities scaled to 0-255).

    Idempotent: an existing complete folder (marked by ``root/.complete-<n>``) is left as it is.

    Args:
        root: the folder to write.
        limit: write only the first ``limit`` digits (tests); default all 1,797.

    Returns:
        ``root``, as a :class:`~pathlib.Path`.

    Example:
        >>> write_digits("/tmp/digits", limit=30)  # doctest: +SKIP
        PosixPath('/tmp/digits')
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    digits = load_digits()
    n = len(digits.images) if limit is None else min(limit, len(digits.images))
    marker = root / f".complete-{n}"
    if marker.exists():
        return root
    for i in range(n):
        p = root / str(int(digits.target[i])) / f"digit-{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8), "L").save(p)
    marker.touch()
    return root
