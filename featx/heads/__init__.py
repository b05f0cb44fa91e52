"""Classifier heads fitted on extracted (and already standardized) CNN features.

Three scikit-learn classifiers, all following the estimator contract (``__init__`` stores parameters, ``fit``
validates and returns ``self``, learned attributes end in ``_``) and passing ``check_estimator``.  They implement
that protocol themselves (:mod:`featx.heads._compat`) rather than deriving from ``sklearn.base.BaseEstimator``, so
that fitting, predicting, saving and loading them never imports scikit-learn (1-2 s of every process); scikit-learn's
``clone``, ``Pipeline``, grid searches and cross-validation use them as before:

* :class:`SVMHead` - a linear SVM solving exactly ``sklearn.svm.LinearSVC(C=C)``'s problem (L2-regularized
  squared hinge, one-vs-rest, intercept as a regularized constant feature), by default with ``C`` chosen on
  held-out rows; on 3,400 x 9,216 pool5-like rows
  in 20 classes it fits ~25-30x faster than LinearSVC (``benchmarks/bench_svm_solver.py``) through a
  Gram-space finite Newton method (see :mod:`featx.heads.problem`); or, with
  ``kernel="rbf"``, a plain ``sklearn.svm.SVC``.
* :class:`LogisticHead` - ``LogisticRegression(C=C)``'s problem (softmax for 3+ classes, binomial for 2,
  intercept unpenalized) by L-BFGS with float32 matrix products.
* :class:`MLPHead` - a one-hidden-layer torch network with dropout, mini-batches and early stopping.

Every head can also be fitted on data larger than memory with ``fit_stream(batches, classes=...,
n_features=...)``, saved without pickles with :func:`save_head` / :func:`load_head`, and exported to torch
with ``to_torch()`` for fine-tuning.

Heads do no scaling of their own: the caller standardizes the features.
"""
from __future__ import annotations

from .logreg import LogisticHead
from .mlp import MLPHead
from .problem import LinearProblem, rows_where
from .saving import HEAD_CLASSES, load_head, save_head
from .svm import SVMHead

__all__ = [
    "SVMHead",
    "LogisticHead",
    "MLPHead",
    "LinearProblem",
    "rows_where",
    "save_head",
    "load_head",
    "HEAD_CLASSES",
]
