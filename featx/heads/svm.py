"""The linear (or RBF) support vector classifier head: :class:`SVMHead`."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
from ._compat import check_is_fitted, validate_data
from ._lbfgs import lbfgs_linear
from ._rbf import RBFModel
from .base import _FLOAT_DTYPES, ValRows, _encode_targets, _float32_rows, _LinearHead, _StreamLabels
from .problem import Batches, LinearProblem, SolveInfo, labels_to_pm1

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class SVMHead(_LinearHead):
    """Linear (or RBF) support vector classifier.

    ``kernel="linear"`` minimizes, for each class ``c`` against the rest (one problem for two classes,
    positive class ``classes_[1]``)::

        0.5 * ||w_c||^2 + 0.5 * b_c^2 + C * sum_i max(0, 1 - y_ic * (w_c . x_i + b_c))^2

    which is exactly ``sklearn.svm.LinearSVC(C=C)`` with its defaults (squared hinge, L2 penalty,
    ``intercept_scaling=1``), so ``C`` means the same; the solution differs from LinearSVC's only by solver
    tolerance.  Solver: a finite Newton method in the Gram space when ``n <= d + 1``, in feature space
    otherwise (:mod:`featx.heads.problem` explains both); it stops when the relative duality gap is ``<= tol``,
    a certificate that the objective is within ``tol`` (relative) of the optimum.  ``max_iter`` bounds the
    Newton steps (or the L-BFGS iterations of :meth:`fit_stream`).

    For many values of ``C`` on the same rows, build a :class:`LinearProblem` once and pass it to every
    ``fit(X, y, problem=p)``: the Gram matrix is then computed once and each ``C`` warm-starts from the
    previous solution for the same labels.

    ``kernel="rbf"`` fits ``sklearn.svm.SVC(C=C, kernel="rbf", gamma=gamma)`` and keeps its arrays
    (``support_vectors_``, ``dual_coef_``, ``rbf_intercept_``, ``n_support_``, ``gamma_``): predictions are
    libsvm's, computed in numpy, and the head saves as arrays like the others; it cannot be streamed or
    exported to torch.

    ``space`` picks the linear solver (``"auto"``: by shape; ``"gram"``, ``"feature"``); an explicit space is
    refused with :class:`~featx.memory.NotEnoughMemory` when its estimated arrays exceed ``max_memory`` (bytes
    or a size such as ``"8G"``; default: :func:`featx.memory.budget`).  ``problem=`` given to :meth:`fit` is
    used as built.  ``device`` (``"cpu"`` or ``"cuda"``...) is where the linear solver's matrix products run.
    ``random_state`` is accepted for interface symmetry; the linear solver is deterministic.
    """

    n_iter_: Any  # Newton steps (linear), or SVC's iterations per pair of classes (rbf)

    def __init__(
        self,
        C: float = 1.0,
        *,
        kernel: str = "linear",
        gamma: str | float = "scale",
        tol: float = 1e-4,
        max_iter: int = 1000,
        device: str = "cpu",
        random_state: int | None = None,
        space: str = "auto",
        max_memory: str | int | None = None,
    ) -> None:
        super().__init__(C, tol=tol, max_iter=max_iter, device=device, random_state=random_state)
        self.kernel = kernel
        self.gamma = gamma
        self.space = space
        self.max_memory = max_memory

    def _check_params(self) -> None:
        super()._check_params()
        if self.kernel not in ("linear", "rbf"):
            raise UsageError(f"kernel must be 'linear' or 'rbf', got {self.kernel!r}")
        if self.space not in ("auto", "gram", "feature"):
            raise UsageError(f"space must be 'auto', 'gram' or 'feature', got {self.space!r}")

    def fit(self, X: Any, y: Any, *, problem: LinearProblem | None = None) -> SVMHead:
        """Fit on rows ``X`` (n, d) and labels ``y``.

        ``problem`` reuses a :class:`LinearProblem` built on the same ``X`` (checked; a different ``X`` raises
        :class:`UsageError`); it is ignored by ``kernel="rbf"``.
        """
        self._check_params()
        X, y = validate_data(self, X, y, dtype=_FLOAT_DTYPES)
        y_idx = _encode_targets(self, y)
        if self.kernel == "rbf":
            from sklearn.svm import SVC

            if problem is not None:
                # A search may hand every trial the same problem; it only serves the linear solver.
                logger.debug("SVMHead(kernel='rbf') ignores problem=")
            svc = SVC(C=float(self.C), kernel="rbf", gamma=self.gamma, random_state=self.random_state).fit(X, y_idx)
            self._set_rbf(RBFModel.from_svc(svc))
            self.n_iter_ = np.asarray(svc.n_iter_, dtype=np.int64)
            return self
        if problem is None:
            problem = LinearProblem(_float32_rows(X), device=self.device, space=self.space, max_memory=self.max_memory)
        elif not isinstance(problem, LinearProblem) or not problem.matches(X):
            raise UsageError("problem= was built from different rows than the X given to fit")
        Y = labels_to_pm1(y_idx, len(self.classes_))
        coef, intercept, info = problem.solve_svm(Y, float(self.C), tol=float(self.tol), max_iter=int(self.max_iter))
        self._set_solution(coef, intercept, info)
        return self

    def fit_stream(self, batches: Batches, *, classes: Any, n_features: int, val: ValRows = None) -> SVMHead:
        """Fit the same objective as :meth:`fit` on data seen one chunk at a time.

        ``batches()`` must return a fresh iterator of ``(X_chunk float32 (m, n_features), y_chunk labels)``
        over all training rows.  One validating pass, then L-BFGS where every objective/gradient evaluation is
        one pass (float32 products per chunk, float64 sums and parameters); memory does not grow with the
        number of rows.  ``val`` is accepted for symmetry with :class:`MLPHead` and not used: the problem is
        convex and solved to ``tol``.  Only ``kernel="linear"``.
        """
        self._check_params()
        if self.kernel != "linear":
            raise UsageError("fit_stream needs kernel='linear'; an RBF SVM needs all rows in memory")
        labels = _StreamLabels(classes, n_features)
        n, _ = labels.scan(batches)
        self.classes_ = labels.classes
        self.n_features_in_ = labels.n_features
        k = len(self.classes_)
        n_out = 1 if k == 2 else k
        coef, intercept, info = lbfgs_linear(
            labels.indexed(batches),
            "squared_hinge",
            n_out,
            labels.n_features,
            float(self.C),
            n_rows=n,
            tol=float(self.tol),
            max_iter=int(self.max_iter),
            device=self.device,
            encode=lambda idx: labels_to_pm1(idx, k),
        )
        self._set_solution(coef, intercept, info)
        return self

    def _unconverged(self, info: SolveInfo) -> str:
        return f"SVMHead did not reach tol={self.tol} in max_iter={self.max_iter} iterations ({info.detail})"

    def _set_rbf(self, model: RBFModel) -> None:
        self.support_vectors_ = model.support_vectors
        self.dual_coef_ = model.dual_coef
        self.rbf_intercept_ = model.intercept
        self.n_support_ = model.n_support
        self.gamma_ = model.gamma

    def _rbf(self) -> RBFModel | None:
        """The RBF model of a head fitted (or loaded) with ``kernel="rbf"``, else None."""
        if self.kernel != "rbf" or not hasattr(self, "support_vectors_"):
            return None
        return RBFModel(self.support_vectors_, self.dual_coef_, self.rbf_intercept_, self.n_support_,
                        float(self.gamma_))

    def decision_function(self, X: Any) -> np.ndarray:
        """Signed distances to the class hyperplanes; shape (n,) for two classes, else (n, n_classes).  With
        ``kernel="rbf"``, ``SVC.decision_function``'s one-vs-rest values."""
        check_is_fitted(self)
        model = self._rbf()
        if model is not None:
            return model.decision_function(validate_data(self, X, reset=False, dtype=_FLOAT_DTYPES))
        return super().decision_function(X)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class labels (with ``kernel="rbf"``, libsvm's one-vs-one vote)."""
        check_is_fitted(self)
        model = self._rbf()
        if model is not None:
            return self.classes_[model.predict_index(validate_data(self, X, reset=False, dtype=_FLOAT_DTYPES))]
        return super().predict(X)

    def _saved_arrays(self) -> dict[str, np.ndarray]:
        if self._rbf() is None:
            return super()._saved_arrays()
        names = ("support_vectors_", "dual_coef_", "rbf_intercept_", "n_support_", "n_iter_")
        return {k: np.asarray(getattr(self, k)) for k in names}

    def _saved_state(self) -> dict[str, Any]:
        if self._rbf() is None:
            return super()._saved_state()
        return {"n_features_in_": int(self.n_features_in_), "gamma_": float(self.gamma_)}

    def to_torch(self) -> torch.nn.Module:
        """See :meth:`_LinearHead.to_torch`; an RBF head raises :class:`UsageError`."""
        check_is_fitted(self)
        if self.kernel == "rbf":
            raise UsageError(
                "an RBF SVM head cannot be turned into torch layers; fit a linear svm, logreg or mlp head to fine-tune"
            )
        return super().to_torch()
