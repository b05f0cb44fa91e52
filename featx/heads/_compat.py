"""scikit-learn's estimator protocol for the heads, without importing scikit-learn on the way.

Importing anything from scikit-learn runs ``sklearn/__init__`` (``sklearn.base``, ``sklearn.utils``, scipy.stats...):
1.2-2.4 s of every ``featx fit``/``evaluate`` process, for classes whose data are plain float arrays.  So the heads
derive from :class:`ClassifierBase` instead of ``ClassifierMixin, BaseEstimator``:

* ``get_params`` / ``set_params`` / ``_get_param_names`` are scikit-learn's (same rules, same errors), so
  ``clone``, ``Pipeline``, ``GridSearchCV`` and ``cross_val_score`` treat the heads as before;
* ``__sklearn_tags__`` (what ``is_classifier`` and the estimator checks read) and ``score`` import scikit-learn
  when they are called, which is only ever from code that already uses scikit-learn;
* :func:`validate_data`, :func:`check_is_fitted`, :func:`check_classification_targets` and
  :func:`check_random_state` answer the common case themselves (a 2-D float32/float64 ``numpy.ndarray`` of finite
  values, integer labels, a fitted head) exactly as scikit-learn's functions of the same names would, and hand
  everything else (lists, data frames, sparse or integer matrices, NaN, a wrong width, an unfitted head...) to
  them, so every message, warning and conversion stays scikit-learn's own.

Not provided: metadata routing (``set_fit_request``, ``get_metadata_routing``) and the HTML representation.
"""
from __future__ import annotations

import inspect
import numbers
from collections import defaultdict
from typing import Any

import numpy as np

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class ClassifierBase:
    """What ``ClassifierMixin, BaseEstimator`` gave the heads, scikit-learn imported only when it is asked for."""

    @classmethod
    def _get_param_names(cls) -> list[str]:
        """The constructor's parameter names, sorted (as ``BaseEstimator._get_param_names``)."""
        init = cls.__init__
        if init is object.__init__:
            return []
        parameters = [p for p in inspect.signature(init).parameters.values()
                      if p.name != "self" and p.kind != p.VAR_KEYWORD]
        for p in parameters:
            if p.kind == p.VAR_POSITIONAL:
                raise RuntimeError(f"scikit-learn estimators should always specify their parameters in the signature "
                                   f"of their __init__ (no varargs). {cls} doesn't follow this convention.")
        return sorted(p.name for p in parameters)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Parameters of this estimator (and, ``deep``, of contained estimators as ``name__param``)."""
        out: dict[str, Any] = {}
        for key in self._get_param_names():
            value = getattr(self, key)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((key + "__" + k, v) for k, v in value.get_params().items())
            out[key] = value
        return out

    def set_params(self, **params: Any) -> Any:
        """Set parameters (``name__param`` for contained estimators); returns ``self``."""
        if not params:
            return self
        valid = self.get_params(deep=True)
        nested: dict[str, dict[str, Any]] = defaultdict(dict)
        for key, value in params.items():
            key, delim, sub_key = key.partition("__")
            if key not in valid:
                raise ValueError(f"Invalid parameter {key!r} for estimator {self}. "
                                 f"Valid parameters are: {self._get_param_names()!r}.")
            if delim:
                nested[key][sub_key] = value
            else:
                setattr(self, key, value)
                valid[key] = value
        for key, sub in nested.items():
            valid[key].set_params(**sub)
        return self

    def __repr__(self) -> str:
        """``Name(param=value, ...)`` listing the parameters that differ from the defaults, as scikit-learn prints."""
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = []
        for key, value in self.get_params(deep=False).items():
            default = defaults.get(key, inspect.Parameter.empty)
            same = value is default or (type(value) is type(default) and _equal(value, default))
            if not same:
                changed.append(f"{key}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"

    def __sklearn_tags__(self) -> Any:
        """``ClassifierMixin``'s tags: a classifier that needs ``y``."""
        from sklearn.utils import ClassifierTags, Tags, TargetTags

        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True), transformer_tags=None,
                    regressor_tags=None, classifier_tags=ClassifierTags())

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Mean accuracy of ``self.predict(X)`` against ``y`` (``ClassifierMixin.score``)."""
        from sklearn.metrics import accuracy_score

        return accuracy_score(y, self.predict(X), sample_weight=sample_weight)  # type: ignore[attr-defined]


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) or (isinstance(a, float) and a != a and b != b)
    except Exception:  # arrays and other objects without a plain truth value
        return False


def _plain_rows(est: Any, X: Any, reset: bool) -> bool:
    """True when scikit-learn's ``validate_data(est, X, reset=reset, dtype=(float64, float32))`` would return ``X``
    itself and only record (``reset``) or check its width."""
    if type(X) is not np.ndarray or X.ndim != 2 or X.dtype not in _FLOATS or X.shape[0] < 1 or X.shape[1] < 1:
        return False
    if not reset and (hasattr(est, "feature_names_in_") or X.shape[1] != getattr(est, "n_features_in_", X.shape[1])):
        return False
    # scikit-learn's own first test of finiteness: a float64 sum (an overflowing sum is sent to it to decide)
    return bool(np.isfinite(np.sum(X, dtype=np.float64)))


def validate_data(est: Any, X: Any, y: Any = "no_validation", *, reset: bool = True, dtype: Any = None) -> Any:
    """``sklearn.utils.validation.validate_data(est, X[, y], reset=reset, dtype=dtype)``.

    ``dtype`` must list float64 and float32 (what the heads ask for).  A finite 2-D float ``numpy.ndarray`` ``X``
    (and, with ``y``, a 1-D integer ``numpy.ndarray`` of the same length) is returned as it is, after recording
    ``n_features_in_`` (``reset``) as scikit-learn does; anything else goes to scikit-learn's function.
    """
    no_y = isinstance(y, str) and y == "no_validation"
    plain = _plain_rows(est, X, reset) and (
        no_y or (type(y) is np.ndarray and y.ndim == 1 and y.dtype.kind in "iu" and len(y) == X.shape[0]))
    if not plain:
        from sklearn.utils.validation import validate_data as sk_validate_data

        return sk_validate_data(est, X, y, reset=reset, dtype=dtype)
    if reset:
        if hasattr(est, "feature_names_in_"):  # fitted on a data frame before: forget its column names
            delattr(est, "feature_names_in_")
        est.n_features_in_ = X.shape[1]
    return X if no_y else (X, y)


def check_is_fitted(est: Any) -> None:
    """``sklearn.utils.validation.check_is_fitted(est)``: scikit-learn raises when no attribute ends in ``_``."""
    if any(v.endswith("_") and not v.startswith("__") for v in vars(est)) and hasattr(est, "fit"):
        return
    from sklearn.utils.validation import check_is_fitted as sk_check_is_fitted

    sk_check_is_fitted(est)


def check_classification_targets(y: np.ndarray) -> None:
    """``sklearn.utils.multiclass.check_classification_targets``: 1-D integer labels always pass."""
    if type(y) is np.ndarray and y.ndim == 1 and y.dtype.kind in "iu":
        return
    from sklearn.utils.multiclass import check_classification_targets as sk_check

    sk_check(y)


def check_random_state(seed: Any) -> np.random.RandomState:
    """``sklearn.utils.check_random_state``."""
    if seed is None or seed is np.random:
        return np.random.mtrand._rand
    if isinstance(seed, numbers.Integral):
        return np.random.RandomState(int(seed))
    if isinstance(seed, np.random.RandomState):
        return seed
    raise ValueError(f"{seed!r} cannot be used to seed a numpy.random.RandomState instance")


def convergence_warning() -> type[Warning]:
    """``sklearn.exceptions.ConvergenceWarning`` (imported when a solver has something to warn about)."""
    from sklearn.exceptions import ConvergenceWarning

    return ConvergenceWarning
