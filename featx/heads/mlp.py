"""The one-hidden-layer network head: :class:`MLPHead`, trained with torch, predicting in numpy."""
from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .. import interrupt
from ..errors import DataError, UsageError
from ._backend import resolve_device
from ._compat import ClassifierBase, check_is_fitted, check_random_state, validate_data
from .base import (
    _FLOAT_DTYPES,
    ValRows,
    _check_int,
    _check_positive,
    _encode_targets,
    _float32_rows,
    _predict_rows,
    _StreamLabels,
)
from .problem import Batches

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@functools.cache
def _mlp_net_class() -> type:
    """The network's class, defined on first use: importing this module must not import torch."""
    import torch

    class _MLPNet(torch.nn.Module):
        """Linear -> ReLU -> Dropout -> Linear; dropout masks come from an explicit generator (determinism)."""

        def __init__(self, d: int, hidden: int, k: int, dropout: float) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(d, hidden)
            self.out = torch.nn.Linear(hidden, k)
            self.dropout = dropout

        def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
            h = torch.relu(self.hidden(x))
            if self.training and self.dropout > 0:
                keep = torch.rand(h.shape, generator=generator, device=h.device) >= self.dropout
                h = h * keep / (1.0 - self.dropout)
            return self.out(h)

    return _MLPNet


class MLPHead(ClassifierBase):
    """One-hidden-layer network on features: ``Linear(d, hidden) -> ReLU -> Dropout -> Linear(hidden, k)``.

    Trained with cross-entropy on shuffled mini-batches by Adam (``optimizer="adam"``) or SGD with momentum
    (``"sgd"``), ``weight_decay`` as an L2 term in the gradient.  Early stopping (``early_stopping=True``)
    watches the validation cross-entropy - on ``X_val``/``y_val`` when given to :meth:`fit`, else on a
    stratified ``validation_fraction`` of the training rows - stops after ``patience`` epochs without
    improvement and restores the best epoch's weights (``best_epoch_``, 1-based).  When the rows are too few
    to hold out one of each class, it trains on all rows for ``epochs`` epochs.

    After each epoch ``epoch_callback(epoch, val_accuracy)`` is called (NaN accuracy when there is no
    validation data); an exception it raises (e.g. ``optuna.TrialPruned``) propagates out of ``fit``.
    ``history_`` lists one dict per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy``,
    ``seconds``.  Results are deterministic for an integer ``random_state`` on a given device and thread
    count.  Prediction runs in float64 numpy on the learned weights.
    """

    def __init__(
        self,
        hidden: int = 256,
        *,
        dropout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: str = "adam",
        momentum: float = 0.9,
        batch_size: int = 128,
        epochs: int = 50,
        early_stopping: bool = True,
        validation_fraction: float = 0.1,
        patience: int = 5,
        device: str = "cpu",
        random_state: int | None = None,
        epoch_callback: Callable[[int, float], None] | None = None,
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer = optimizer
        self.momentum = momentum
        self.batch_size = batch_size
        self.epochs = epochs
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.device = device
        self.random_state = random_state
        self.epoch_callback = epoch_callback

    def _check_params(self) -> None:
        _check_int("hidden", self.hidden, 1)
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout!r}")
        _check_positive("lr", self.lr)
        _check_positive("weight_decay", self.weight_decay, allow_zero=True)
        if self.optimizer not in ("adam", "sgd"):
            raise UsageError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        _check_positive("momentum", self.momentum, allow_zero=True)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("epochs", self.epochs, 1)
        _check_int("patience", self.patience, 1)
        if not (isinstance(self.validation_fraction, (int, float)) and 0 <= self.validation_fraction < 1):
            raise UsageError(f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}")
        if self.epoch_callback is not None and not callable(self.epoch_callback):
            raise UsageError("epoch_callback must be callable or None")

    # -- training -----------------------------------------------------------------------------------------
    def _setup(
        self, d: int, k: int
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Generator, torch.Generator, torch.device]:
        import torch

        device = resolve_device(self.device)
        seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
        # Our own generators (init and shuffling on CPU, dropout on the training device): deterministic
        # for a given random_state without touching torch's global RNG.
        gen = torch.Generator(device="cpu").manual_seed(seed)
        drop_gen = torch.Generator(device=device).manual_seed(seed + 1)
        net = _mlp_net_class()(d, int(self.hidden), k, float(self.dropout))
        with torch.no_grad():
            # nn.Linear's default init (uniform +-1/sqrt(fan_in)), drawn from our generator, not the global one.
            for layer in (net.hidden, net.out):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=gen) * 2 * bound - bound)
                layer.bias.copy_(torch.rand(layer.bias.shape, generator=gen) * 2 * bound - bound)
        net.to(device)
        if self.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(
                net.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay)
            )
        else:
            opt = torch.optim.SGD(
                net.parameters(),
                lr=float(self.lr),
                momentum=float(self.momentum),
                weight_decay=float(self.weight_decay),
            )
        return net, opt, gen, drop_gen, device

    def _split(self, y_idx: np.ndarray, seed_rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray] | None:
        """Stratified train/validation indices, or None when a class is too small to hold one row out."""
        k = int(y_idx.max()) + 1
        counts = np.bincount(y_idx, minlength=k)
        n_val = int(math.ceil(self.validation_fraction * len(y_idx)))
        if self.validation_fraction <= 0 or counts.min() < 2 or n_val < k or len(y_idx) - n_val < k:
            logger.debug("MLPHead: too few rows for a stratified validation split; training on all rows")
            return None
        from sklearn.model_selection import train_test_split

        tr, va = train_test_split(
            np.arange(len(y_idx)), test_size=n_val, stratify=y_idx, random_state=seed_rng.randint(0, 2**31 - 1)
        )
        return np.sort(tr), np.sort(va)

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> MLPHead:
        """Train on ``X``/``y``; ``X_val``/``y_val`` (both or neither) replace the internal validation split."""
        self._check_params()
        X, y = validate_data(self, X, y, dtype=_FLOAT_DTYPES)
        y_idx = _encode_targets(self, y)
        X32 = _float32_rows(X)
        if (X_val is None) != (y_val is None):
            raise UsageError("give both X_val and y_val, or neither")
        val: tuple[np.ndarray, np.ndarray] | None = None
        train_rows: np.ndarray | None = None
        if X_val is not None:
            Xv = validate_data(self, X_val, reset=False, dtype=_FLOAT_DTYPES)
            val = (_float32_rows(Xv), self._label_indices(np.asarray(y_val).ravel()))
        elif self.early_stopping:
            split = self._split(y_idx, check_random_state(self.random_state))
            if split is not None:
                train_rows, va = split
                val = (X32[va], y_idx[va])
        if train_rows is not None:
            Xtr, ytr = X32[train_rows], y_idx[train_rows]
        else:
            Xtr, ytr = X32, y_idx

        def batches() -> Iterable[tuple[np.ndarray, np.ndarray]]:
            yield Xtr, ytr

        self._train(batches, len(self.classes_), X32.shape[1], val)
        return self

    def fit_stream(self, batches: Batches, *, classes: Any, n_features: int, val: ValRows = None) -> MLPHead:
        """Train epoch by epoch over ``batches()`` (a fresh iterator of ``(X_chunk, y_chunk)`` per epoch).

        Rows are shuffled within each chunk (the chunk order is the caller's).  Early stopping needs ``val``
        = ``(X_val, y_val)``; without it the network trains for ``epochs`` epochs.
        """
        self._check_params()
        labels = _StreamLabels(classes, n_features)
        self.classes_ = labels.classes
        self.n_features_in_ = labels.n_features
        v = None
        if val is not None:
            Xv, yv = val
            v = (_float32_rows(np.asarray(Xv)), labels.indices(Xv, yv))
        indexed = labels.indexed(batches)

        def batches32() -> Iterable[tuple[np.ndarray, np.ndarray]]:
            for Xc, yc in indexed():
                yield _float32_rows(Xc), yc

        self._train(batches32, len(self.classes_), labels.n_features, v)
        return self

    def _label_indices(self, y: np.ndarray) -> np.ndarray:
        idx = np.clip(np.searchsorted(self.classes_, y), 0, len(self.classes_) - 1)
        if (self.classes_[idx] != y).any():
            raise DataError("y_val has labels that are not in the training labels")
        return idx.astype(np.int64)

    def _train(
        self,
        batches: Batches,
        k: int,
        d: int,
        val: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        import torch

        net, opt, gen, drop_gen, device = self._setup(d, k)
        loss_fn = torch.nn.CrossEntropyLoss()
        Xv_t = torch.from_numpy(val[0]).to(device) if val is not None else None
        yv_t = torch.from_numpy(val[1]).to(device) if val is not None else None
        use_es = bool(self.early_stopping) and val is not None
        best_loss = math.inf
        best_state: dict[str, torch.Tensor] | None = None
        best_epoch = 0
        since_best = 0
        history: list[dict[str, float]] = []
        bs = int(self.batch_size)
        seen_rows = 0
        for epoch in range(1, int(self.epochs) + 1):
            t0 = time.perf_counter()
            net.train()
            total, count = 0.0, 0
            for Xc, yc in batches():
                m = len(yc)
                if m == 0:
                    continue
                Xc_t = torch.from_numpy(Xc).to(device)
                yc_t = torch.from_numpy(yc).to(device)
                perm = torch.randperm(m, generator=gen).to(device)
                for s in range(0, m, bs):
                    interrupt.raise_if_requested()
                    idx = perm[s : s + bs]
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(net(Xc_t[idx], drop_gen), yc_t[idx])
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                    count += len(idx)
            if count == 0:
                raise DataError("the training batches produced no rows")
            seen_rows = count
            train_loss = total / count
            val_loss, val_acc = math.nan, math.nan
            if Xv_t is not None and yv_t is not None and len(yv_t) > 0:
                net.eval()
                with torch.no_grad():
                    logits = net(Xv_t)
                    val_loss = float(loss_fn(logits, yv_t))
                    val_acc = float((logits.argmax(1) == yv_t).double().mean())
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_accuracy": val_acc,
                    "seconds": time.perf_counter() - t0,
                }
            )
            logger.debug("MLPHead epoch %d: %s", epoch, history[-1])
            improved = use_es and val_loss < best_loss
            if improved:
                best_loss, best_epoch, since_best = val_loss, epoch, 0
                best_state = {name: t.detach().clone() for name, t in net.state_dict().items()}
            elif use_es:
                since_best += 1
            if self.epoch_callback is not None:
                # May raise (an Optuna pruner stopping the trial); deliberately not caught.
                self.epoch_callback(epoch, val_acc)
            if use_es and since_best >= int(self.patience):
                break
        if use_es and best_state is not None:
            net.load_state_dict(best_state)
        else:
            best_epoch = len(history)
        self.history_ = history
        self.best_epoch_ = best_epoch
        self.n_iter_ = len(history)
        self.n_train_rows_ = seen_rows
        hidden, out = cast(torch.nn.Linear, net.hidden), cast(torch.nn.Linear, net.out)
        self.hidden_weight_ = hidden.weight.detach().cpu().numpy().astype(np.float32)
        self.hidden_bias_ = hidden.bias.detach().cpu().numpy().astype(np.float32)
        self.output_weight_ = out.weight.detach().cpu().numpy().astype(np.float32)
        self.output_bias_ = out.bias.detach().cpu().numpy().astype(np.float32)

    # -- inference ----------------------------------------------------------------------------------------
    def _logits(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=_FLOAT_DTYPES)
        W1 = self.hidden_weight_.astype(np.float64)
        b1 = self.hidden_bias_.astype(np.float64)
        W2 = self.output_weight_.astype(np.float64)
        b2 = self.output_bias_.astype(np.float64)
        out = np.empty((X.shape[0], W2.shape[0]), dtype=np.float64)
        step = _predict_rows(X.shape[1])
        for s in range(0, X.shape[0], step):
            h = np.maximum(np.asarray(X[s : s + step], dtype=np.float64) @ W1.T + b1, 0.0)
            out[s : s + step] = h @ W2.T + b2
        return out

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities (n, n_classes), columns in ``classes_`` order."""
        z = self._logits(X)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Logarithm of :meth:`predict_proba`, computed stably."""
        z = self._logits(X)
        m = z.max(axis=1, keepdims=True)
        return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class labels."""
        logits = self._logits(X)  # checks fitted before classes_ is touched
        return self.classes_[np.argmax(logits, axis=1)]

    def to_torch(self) -> torch.nn.Module:
        """``nn.Sequential(Linear, ReLU, Dropout, Linear)`` with the learned weights, in eval mode."""
        import torch

        check_is_fitted(self)
        d, h, k = self.hidden_weight_.shape[1], self.hidden_weight_.shape[0], self.output_weight_.shape[0]
        hidden, out = torch.nn.Linear(d, h), torch.nn.Linear(h, k)
        seq = torch.nn.Sequential(hidden, torch.nn.ReLU(), torch.nn.Dropout(float(self.dropout)), out)
        with torch.no_grad():
            hidden.weight.copy_(torch.from_numpy(self.hidden_weight_))
            hidden.bias.copy_(torch.from_numpy(self.hidden_bias_))
            out.weight.copy_(torch.from_numpy(self.output_weight_))
            out.bias.copy_(torch.from_numpy(self.output_bias_))
        return seq.eval()

    def _saved_arrays(self) -> dict[str, np.ndarray]:
        return {
            "hidden_weight_": self.hidden_weight_,
            "hidden_bias_": self.hidden_bias_,
            "output_weight_": self.output_weight_,
            "output_bias_": self.output_bias_,
        }

    def _saved_state(self) -> dict[str, Any]:
        return {
            "n_features_in_": int(self.n_features_in_),
            "n_iter_": int(self.n_iter_),
            "best_epoch_": int(self.best_epoch_),
            "history_": self.history_,
            "n_train_rows_": int(self.n_train_rows_),
        }
