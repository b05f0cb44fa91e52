"""The linear (or RBF) support vector classifier head: :class:`SVMHead`."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
from . import _choose_c
from ._compat import check_is_fitted, validate_data
from ._lbfgs import lbfgs_linear
from ._rbf import RBFModel
from .base import _FLOAT_DTYPES, ValRows, _encode_targets, _float32_rows, _LinearHead, _StreamLabels
from .problem import Batches, LinearProblem, SolveInfo, labels_to_pm1, rows_where

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class SVMHead(_LinearHead):
    """Linear (or RBF) support vector classifier.

    ``kernel="linear"`` minimizes, for each class ``c`` against the rest (one problem for two classes,
    positive class ``classes_[1]``)::

        0.5 * ||w_c||^2 + 0.5 * b_c^2 + C * sum_i max(0, 1 - y_ic * (w_c . x_i + b_c))^2

    which is exactly ``sklearn.svm.LinearSVC(C=C)`` with its defaults (squared hinge, L2 penalty,
    ``intercept_scaling=1``), so a number ``C`` means the same; the solution differs from LinearSVC's only by
    solver tolerance.

    ``C="auto"`` (the default) chooses ``C`` on a seeded 20% of the rows held out, walking a grid anchored at
    SVMlight's default ``1 / mean K(x, x)`` upwards until held-out accuracy falls, then refits on every row
    (:mod:`featx.heads._choose_c`); ``C_`` is the value used and ``C_path_`` every ``(C, held-out accuracy)``
    tried.  Below 10 rows per class nothing is held out and ``C_`` is the anchor.  LinearSVC's own default,
    ``C=1``, leaves standardized CNN features of a few thousand dimensions almost unregularized: slow to
    solve with many classes and seldom the most accurate.

    Solver: a finite Newton method in the Gram space when ``n <= d + 1``, in feature space otherwise
    (:mod:`featx.heads.problem` explains both); it stops when the relative duality gap is ``<= tol``, a
    certificate that the objective is within ``tol`` (relative) of the optimum.  ``max_iter`` bounds the Newton
    steps (or the L-BFGS iterations of :meth:`fit_stream`).

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
    C_: float  # the C used: C itself, or the one C="auto" chose
    C_path_: list  # C="auto": every (C, held-out accuracy) tried, in order; else empty

    def __init__(
        self,
        C: float | str = "auto",
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

    @property
    def chooses_c(self) -> bool:
        """Whether :meth:`fit` chooses ``C`` on held-out rows (``C="auto"``)."""
        return _choose_c.is_auto(self.C)

    def _check_c(self) -> None:
        if _choose_c.is_auto(self.C):
            return
        try:
            super()._check_c()
        except UsageError:
            raise UsageError(f"C must be 'auto' or a positive number, got {self.C!r}") from None

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
            C = self._choose_c_rbf(X, y_idx) if _choose_c.is_auto(self.C) else self._fixed_c()
            svc = SVC(C=C, kernel="rbf", gamma=self.gamma, random_state=self.random_state).fit(X, y_idx)
            self._set_rbf(RBFModel.from_svc(svc))
            self.n_iter_ = np.asarray(svc.n_iter_, dtype=np.int64)
            return self
        if problem is None:
            problem = LinearProblem(_float32_rows(X), device=self.device, space=self.space, max_memory=self.max_memory)
        elif not isinstance(problem, LinearProblem) or not problem.matches(X):
            raise UsageError("problem= was built from different rows than the X given to fit")
        C = self._choose_c_linear(X, y_idx, problem) if _choose_c.is_auto(self.C) else self._fixed_c()
        Y = labels_to_pm1(y_idx, len(self.classes_))
        coef, intercept, info = problem.solve_svm(Y, C, tol=float(self.tol), max_iter=int(self.max_iter))
        self._set_solution(coef, intercept, info)
        return self

    def _fixed_c(self) -> float:
        self.C_, self.C_path_ = float(self.C), []
        return self.C_

    def _chosen(self, anchor: float, score: Any) -> tuple[float, Any]:
        """Walk the grid from ``anchor`` with ``score(C)`` (held-out accuracy, what to keep); keep the choice and
        return it with what its fit kept."""
        self.C_, self.C_path_, kept = _choose_c.walk(anchor, score)
        return self.C_, kept

    def _anchored(self, anchor: float) -> float:
        """Too few rows to hold some out: the anchor itself."""
        logger.info("C=%.3g (1 / mean K(x, x): too few rows per class to hold some out)", anchor)
        self.C_, self.C_path_ = float(anchor), []
        return self.C_

    def _split(self, y_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Row indices fitted on and held out for C="auto", or None when too few rows (or classes) to split."""
        mask = _choose_c.held_out_mask(len(y_idx), len(self.classes_), self.random_state)
        if mask is None or len(np.unique(y_idx[~mask])) < 2:
            return None
        return np.flatnonzero(~mask), np.flatnonzero(mask)

    def _choose_c_linear(self, X: np.ndarray, y_idx: np.ndarray, problem: LinearProblem) -> float:
        anchor = 1.0 / (_choose_c.mean_sq_norm(X) + 1.0)
        split = self._split(y_idx)
        if split is None:
            return self._anchored(anchor)
        fit_rows, val_rows = split
        sub = problem.on_rows(_float32_rows(X[fit_rows]))
        Y = labels_to_pm1(y_idx[fit_rows], len(self.classes_))

        def score(C: float) -> tuple[float, None]:
            coef, intercept, _ = sub.solve_svm(Y, C, tol=float(self.tol), max_iter=int(self.max_iter))
            return _choose_c.linear_accuracy(X, val_rows, y_idx[val_rows], coef, intercept), None

        return self._chosen(anchor, score)[0]

    def _choose_c_rbf(self, X: np.ndarray, y_idx: np.ndarray) -> float:
        from sklearn.svm import SVC

        split = self._split(y_idx)
        if split is None:
            return self._anchored(1.0)  # K(x, x) = 1 for the RBF kernel
        fit_rows, val_rows = split

        def score(C: float) -> tuple[float, None]:
            svc = SVC(C=C, kernel="rbf", gamma=self.gamma, random_state=self.random_state)
            svc.fit(X[fit_rows], y_idx[fit_rows])
            return float(np.mean(svc.predict(X[val_rows]) == y_idx[val_rows])), None

        return self._chosen(1.0, score)[0]

    def fit_stream(self, batches: Batches, *, classes: Any, n_features: int, val: ValRows = None) -> SVMHead:
        """Fit the same objective as :meth:`fit` on data seen one chunk at a time.

        ``batches()`` must return a fresh iterator of ``(X_chunk float32 (m, n_features), y_chunk labels)``
        over all training rows.  One validating pass, then L-BFGS where every objective/gradient evaluation is
        one pass (float32 products per chunk, float64 sums and parameters); memory does not grow with the
        number of rows.  ``val`` is accepted for symmetry with :class:`MLPHead` and not used: the problem is
        convex and solved to ``tol``.  ``C="auto"`` masks its held-out rows out of the passes (no copy), starts
        each ``C`` of the walk from the previous one's solution and the final fit from the chosen one's.  Only
        ``kernel="linear"``.
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
        rows = labels.indexed(batches)

        def solve(part: Batches, n_rows: int, C: float, W0: np.ndarray | None = None) -> tuple:
            return lbfgs_linear(part, "squared_hinge", n_out, labels.n_features, C, n_rows=n_rows,
                                tol=float(self.tol), max_iter=int(self.max_iter), device=self.device,
                                encode=lambda idx: labels_to_pm1(idx, k), W0=W0)

        if not _choose_c.is_auto(self.C):
            coef, intercept, info = solve(rows, n, self._fixed_c())
        else:
            start = self._choose_c_stream(rows, n, solve)
            coef, intercept, info = solve(rows, n, self.C_, start)
        self._set_solution(coef, intercept, info)
        return self

    def _choose_c_stream(self, rows: Batches, n: int, solve: Any) -> np.ndarray | None:
        """C="auto" over streamed rows: the held-out rows masked out of every pass, each C warm-started from the
        previous one; returns the chosen C's solution, the final fit's starting point (None: the anchor)."""
        anchor = 1.0 / (sum(_choose_c.mean_sq_norm(Xc) * len(Xc) for Xc, _ in rows()) / n + 1.0)
        mask = _choose_c.held_out_mask(n, len(self.classes_), self.random_state)
        if mask is None:
            self._anchored(anchor)
            return None
        fit_part, held_out = rows_where(rows, ~mask), rows_where(rows, mask)
        previous: list[np.ndarray] = []  # the last solution, each C's starting point

        def score(C: float) -> tuple[float, np.ndarray]:
            coef, intercept, _ = solve(fit_part, int((~mask).sum()), C, previous.pop() if previous else None)
            previous.append(np.vstack([coef.T, intercept[None, :]]))
            return _choose_c.stream_accuracy(held_out, coef, intercept), previous[-1]

        return self._chosen(anchor, score)[1]

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
        chosen = {"C_": float(self.C_), "C_path_": [list(p) for p in self.C_path_]} if hasattr(self, "C_") else {}
        if self._rbf() is None:
            return {**super()._saved_state(), **chosen}
        return {"n_features_in_": int(self.n_features_in_), "gamma_": float(self.gamma_), **chosen}

    def to_torch(self) -> torch.nn.Module:
        """See :meth:`_LinearHead.to_torch`; an RBF head raises :class:`UsageError`."""
        check_is_fitted(self)
        if self.kernel == "rbf":
            raise UsageError(
                "an RBF SVM head cannot be turned into torch layers; fit a linear svm, logreg or mlp head to fine-tune"
            )
        return super().to_torch()
