"""Splits: parsing ``--split`` and making a reproducible stratified split when the data has none of its own."""
from __future__ import annotations

import numpy as np

from featx.errors import UsageError


def parse_split(spec: str | None) -> dict[str, float]:
    """Parse ``--split`` (``"test=0.15"`` or ``"test=0.15,val=0.1"``) into fractions.

    Raises:
        UsageError: on unknown or repeated names, fractions outside (0, 1), or fractions summing to 1 or more.
    """
    if spec is None or not str(spec).strip():
        return {"test": 0.15}
    out: dict[str, float] = {}
    for part in str(spec).split(","):
        name, sep, value = part.strip().partition("=")
        name = name.strip()
        if not sep or name not in ("test", "val"):
            raise UsageError(f"bad --split {spec!r}: expected test=FRACTION[,val=FRACTION], e.g. test=0.15,val=0.1")
        try:
            frac = float(value)
        except ValueError:
            raise UsageError(f"bad --split {spec!r}: {value!r} is not a number") from None
        if not 0.0 < frac < 1.0:
            raise UsageError(f"bad --split {spec!r}: each fraction must be between 0 and 1 (exclusive)")
        if name in out:  # "test=0.1,test=0.3" is a typo, not a request for 0.3
            raise UsageError(f"bad --split {spec!r}: {name} is given twice")
        out[name] = frac
    if sum(out.values()) >= 1.0:
        raise UsageError(f"bad --split {spec!r}: the fractions leave no training rows")
    return out


def stratified(labels: list[int], fractions: dict[str, float], seed: int) -> list[str]:
    """Assign each row a split, per class, reproducibly: the same labels and seed give the same split.

    Each class gives ``round(fraction * n)`` rows to each requested split, but at least one as long as it keeps
    one training row: otherwise small classes (5 images at ``test=0.1``) would give the split none at all, and
    a requested split could come out empty.
    """
    out = ["train"] * len(labels)
    by_class: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    # SeedSequence takes only non-negative integers; map a negative --seed onto one (its 64-bit two's
    # complement) rather than crash, leaving every non-negative seed's split as it was.
    seed = seed % (1 << 64) if seed < 0 else seed
    for lab, idx in sorted(by_class.items()):
        rng = np.random.default_rng([seed, lab])
        order = [idx[j] for j in rng.permutation(len(idx))]
        n = len(order)
        start = 0
        for name in ("test", "val"):
            if fractions.get(name, 0.0) <= 0.0:
                continue
            k = max(1, int(round(fractions[name] * n)))
            k = min(k, n - start - 1)  # every class keeps at least one training row
            for j in order[start:start + max(k, 0)]:
                out[j] = name
            start += max(k, 0)
    return out
