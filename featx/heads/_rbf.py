"""The RBF SVM's predictions from its arrays, in numpy: what ``sklearn.svm.SVC`` (libsvm) computes, no pickle.

A fitted ``SVC(kernel="rbf")`` is fully described by a few arrays: the support vectors (grouped by class), libsvm's
dual coefficients (``k - 1`` rows: for the pair of classes ``i < j``, a support vector of class ``i`` uses row
``j - 1`` and one of class ``j`` row ``i``), one intercept per pair, the number of support vectors per class and
``gamma``.  The pair ``(i, j)``'s decision value is ``sum_sv coef * exp(-gamma ||x - sv||^2) + intercept``;
positive votes for ``i``, otherwise for ``j``; the prediction is the class with the most votes (the first on a
tie), as libsvm's.  The decision function is scikit-learn's one-vs-rest transform of the pairwise values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from featx import interrupt

# Rows of X per kernel block: bounds the (rows x support vectors) float64 block.
_BLOCK_ROWS = 2048


@dataclass
class RBFModel:
    """An RBF SVC's arrays (see the module's docstring); class indices are ``0 .. n_classes - 1``."""

    support_vectors: np.ndarray  # (n_sv, d) float64, grouped by class
    dual_coef: np.ndarray  # (n_classes - 1, n_sv) float64, libsvm's signs
    intercept: np.ndarray  # (n_classes * (n_classes - 1) / 2,) float64, libsvm's signs (-rho)
    n_support: np.ndarray  # (n_classes,) int
    gamma: float

    @classmethod
    def from_svc(cls, svc: Any) -> RBFModel:
        """The arrays of a fitted ``sklearn.svm.SVC``, in libsvm's own signs."""
        return cls(
            np.asarray(svc.support_vectors_, dtype=np.float64),
            np.asarray(svc._dual_coef_, dtype=np.float64),
            np.asarray(svc._intercept_, dtype=np.float64),
            np.asarray(svc._n_support, dtype=np.int64),
            float(svc._gamma),
        )

    @property
    def n_classes(self) -> int:
        return len(self.n_support)

    def pairwise(self, X: np.ndarray) -> np.ndarray:
        """libsvm's decision values (n, n_pairs) for the pairs ``(0,1), (0,2) .. (k-2,k-1)``."""
        X = np.asarray(X, dtype=np.float64)
        sv = self.support_vectors
        sv_sq = np.einsum("ij,ij->i", sv, sv)
        starts = np.concatenate([[0], np.cumsum(self.n_support)])
        k = self.n_classes
        out = np.empty((X.shape[0], k * (k - 1) // 2))
        for a in range(0, X.shape[0], _BLOCK_ROWS):
            interrupt.raise_if_requested()
            Xb = X[a : a + _BLOCK_ROWS]
            sq = np.einsum("ij,ij->i", Xb, Xb)[:, None] + sv_sq[None, :] - 2.0 * (Xb @ sv.T)
            Kb = np.exp(-self.gamma * np.maximum(sq, 0.0))
            p = 0
            for i in range(k):
                si = slice(starts[i], starts[i + 1])
                for j in range(i + 1, k):
                    sj = slice(starts[j], starts[j + 1])
                    out[a : a + len(Xb), p] = (
                        Kb[:, si] @ self.dual_coef[j - 1, si] + Kb[:, sj] @ self.dual_coef[i, sj] + self.intercept[p]
                    )
                    p += 1
        return out

    def predict_index(self, X: np.ndarray) -> np.ndarray:
        """The class index libsvm's vote picks for each row."""
        dec = self.pairwise(X)
        k = self.n_classes
        votes = np.zeros((dec.shape[0], k), dtype=np.int64)
        p = 0
        for i in range(k):
            for j in range(i + 1, k):
                pos = dec[:, p] > 0
                votes[pos, i] += 1
                votes[~pos, j] += 1
                p += 1
        return np.argmax(votes, axis=1)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """scikit-learn's ``SVC.decision_function`` (``decision_function_shape="ovr"``): (n,) for two classes
        (positive: the second class), else votes plus bounded summed confidences (n, n_classes)."""
        dec = self.pairwise(X)
        k = self.n_classes
        if k == 2:
            return -dec[:, 0]
        votes = np.zeros((dec.shape[0], k))
        conf = np.zeros((dec.shape[0], k))
        p = 0
        for i in range(k):
            for j in range(i + 1, k):
                conf[:, i] += dec[:, p]
                conf[:, j] -= dec[:, p]
                votes[dec[:, p] >= 0, i] += 1
                votes[dec[:, p] < 0, j] += 1
                p += 1
        return votes + conf / (3 * (np.abs(conf) + 1))
