"""Which head a fine-tune starts from: one rule, used by ``featx run`` and by its ``--dry-run``.

The rule: among the cases the fine-tune may start from (those its ``from`` names that finished, in the file's
order), the one with the highest validation score; of equal scores, the first in the file's order.  A case's
validation score is its head's accuracy on the val split or, for a searched head on data without one, the search's
cross-validation accuracy; the test rows never choose.  A lone case needs no score; among several, one without a
score is never chosen, and when none has one the fine-tune fails with a line naming them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from featx.errors import FeatxError

__all__ = ["NoStart", "start_score", "choose_start"]


class NoStart(FeatxError, ValueError):
    """A fine-tune has no head to start from: every candidate failed, or none of several has a validation score."""


def start_score(metrics: dict[str, Any]) -> float | None:
    """A head's validation score, from its ``metrics.json``: the val split's accuracy, else (a searched head on
    data without a val split) the search's best cross-validation accuracy; None when it has neither, or when the
    value is not a finite number."""
    val = metrics.get("val_accuracy")
    if val is None:
        val = (metrics.get("search") or {}).get("best_value")
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
        return None
    return float(val)


def choose_start(candidates: Sequence[tuple[str, float | None]], *, failed: Sequence[str] = ()) -> str:
    """The case a fine-tune starts from (the module's docstring states the rule).

    Args:
        candidates: ``(case, validation score or None)`` of each case it may start from, in the file's order.
        failed: the cases it names that did not finish (for the message when no candidate is left).

    Returns:
        The chosen case's name.

    Raises:
        NoStart: no candidate (every case failed), or several and none has a validation score.

    Example:
        >>> choose_start([("pool5-svm", 0.91), ("pool5-logreg", 0.93), ("fc7-logreg", 0.93)])
        'pool5-logreg'
    """
    if not candidates:
        names = ", ".join(failed) or "(none)"
        raise NoStart(f"no head to start from: {names} {'all ' if len(failed) > 1 else ''}failed")
    if len(candidates) == 1:
        return candidates[0][0]
    best: tuple[str, float] | None = None
    for case, score in candidates:
        if score is not None and (best is None or score > best[1]):  # strictly higher: the first of equals stays
            best = (case, score)
    if best is None:
        raise NoStart(f"cannot choose among {', '.join(c for c, _ in candidates)}: none has a validation accuracy "
                      f"(give the data a val split, e.g. data.split = \"test=0.15,val=0.1\", or name one case in from)")
    return best[0]
