"""``featx search``: Optuna searches over a head's hyperparameters, resumable, parallel, shareable.

The objective is validation accuracy (the val split when the feature set has one, else stratified K-fold on the
train rows); test rows are never loaded by a trial.  Each worker process loads and scales the data once and
keeps it for all its trials (per scaling choice and fold); the linear SVM reuses its Gram matrix across C values.
When the trials are done, the best parameters are refit on all train rows and saved as a head exactly as
``featx fit`` does, with a ``search`` section in ``metrics.json`` and plots of the search.
"""
from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import featx
from featx import interrupt, memory
from featx.errors import DataError, FeatxError, UsageError
from featx.fit import HEAD_KINDS, FitResult, Rows, Scaler, fit_head, make_head, open_rows, source_identity
from featx.folds import FoldLayout, Kept
from featx.studies import HEARTBEAT, default_storage, fail_dead_trials, hold_for_tests, open_storage

__all__ = ["search", "SearchResult", "Objective", "suggest", "open_storage", "default_storage", "study_name_for"]

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random")

# The search spaces (documented in docs/search.md).
SVM_C = (1e-5, 1e2)
LOGREG_C = (1e-4, 1e3)
MLP_SPACE: dict[str, Any] = {"hidden": [64, 128, 256, 512, 1024], "dropout": (0.0, 0.7), "lr": (1e-4, 3e-2),
             "weight_decay": (1e-6, 1e-2), "batch_size": [32, 64, 128, 256], "epochs": 40}


def suggest(trial, kind: str, *, scales: tuple[str, ...] = ("standard", "l2", "none")) -> tuple[str, dict]:
    """Sample (scale, head params) for ``kind`` from its search space."""
    scale = trial.suggest_categorical("scale", list(scales))
    if kind == "svm":
        return scale, {"C": trial.suggest_float("C", *SVM_C, log=True)}
    if kind == "logreg":
        return scale, {"C": trial.suggest_float("C", *LOGREG_C, log=True)}
    if kind == "mlp":
        return scale, {
            "hidden": trial.suggest_categorical("hidden", MLP_SPACE["hidden"]),
            "dropout": trial.suggest_float("dropout", *MLP_SPACE["dropout"]),
            "lr": trial.suggest_float("lr", *MLP_SPACE["lr"], log=True),
            "weight_decay": trial.suggest_float("weight_decay", *MLP_SPACE["weight_decay"], log=True),
            "batch_size": trial.suggest_categorical("batch_size", MLP_SPACE["batch_size"]),
            "epochs": MLP_SPACE["epochs"],
        }
    raise UsageError(f"unknown head {kind!r}: use one of {', '.join(HEAD_KINDS)}")


# ------------------------------------------------------------------------------------------------ storage

def study_name_for(rows: Rows, kind: str) -> str:
    src = rows.fs.key or source_identity(rows).get("sha256", "")[:20]
    return f"featx-{kind}-{rows.layer}-{src[:12]}"


def _open_study(storage_url: str, name: str, *, attrs: dict, sampler: str, seed: int, kind: str, create: bool,
                heartbeat: int = HEARTBEAT):
    import optuna

    storage = open_storage(storage_url, heartbeat=heartbeat)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # featx logs each trial itself, on its own logger
    smp = optuna.samplers.TPESampler(seed=seed, multivariate=True) if sampler == "tpe" \
        else optuna.samplers.RandomSampler(seed=seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=3) if kind == "mlp" \
        else optuna.pruners.NopPruner()
    try:
        if create:
            study = optuna.create_study(study_name=name, storage=storage, sampler=smp, pruner=pruner,
                                        direction="maximize", load_if_exists=True)
        else:
            study = optuna.load_study(study_name=name, storage=storage, sampler=smp, pruner=pruner)
    except FeatxError:
        raise
    except Exception as e:
        raise UsageError(f"cannot open study {name!r} in {storage_url!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}") from None
    have = study.user_attrs
    if have:
        for k in ("featx_source", "kind", "layer"):
            if k in have and have[k] != attrs[k]:
                raise UsageError(f"study {name!r} in {storage_url} was made for another {k.replace('featx_', '')} "
                                 f"({have[k]!r}, not {attrs[k]!r}); pick another --study name")
    elif create:
        for k, v in attrs.items():
            study.set_user_attr(k, v)
    # no zombies: trials left RUNNING by dead processes of this node, or (databases) silent past their grace
    # period, become FAIL and are queued again
    fail_dead_trials(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return study


# ------------------------------------------------------------------------------------------------ objective

@dataclass(frozen=True)
class SearchPlan:
    """How a search's trials fit in memory: in ``memory`` (the scaled rows of one scaling, with solver states kept
    while ``limit`` allows) or ``stream`` (every fold fitted chunk by chunk from disk); ``path`` is the path of one
    fit, ``data`` the bytes of one scaling's rows, ``state`` those of one fold's fit beside them."""

    mode: str
    path: str
    data: int
    state: int
    limit: int
    loading: int = 0  # the rows as read, beside their layout, while a scaling is laid out

    def describe(self) -> str:
        return (f"search in {self.mode} ({self.path} path per fold): rows {memory.gb(self.data)} per scaling, "
                f"{memory.gb(self.state)} per fold's fit, budget {memory.gb(self.limit)}")


def plan_search(rows: Rows, kind: str, *, folds: int | None, max_memory: str | int | None = None) -> SearchPlan:
    """The memory plan of a search: the rows of one scaling as one matrix (:class:`FoldLayout` for ``folds``
    folds; ``None``: the val split), plus one fold's fit, when they fit ``max_memory``, else every fit streamed.

    Raises:
        NotEnoughMemory: not even the streamed fits fit.
    """
    limit = memory.budget(max_memory)
    d = rows.fs.dim(rows.layer)
    n = int(rows.mask("train").sum())
    k = len(np.unique(rows.labels[rows.mask("train")]))
    if folds is None:
        n_fit, n_val = n, int(rows.mask("val").sum())
        data, loading = (n + n_val) * d * 4, 0
    else:
        n_fit, n_val = n - n // folds, n // folds + 1
        data, loading = ((2 * folds - 2) * n // folds + folds) * d * 4, n * d * 4  # the rows read, then laid out
    try:
        fit = memory.plan_fit(kind, n_fit, d, k, budget=max(1, limit - data - loading), data_in_memory=False)
        if fit.path != "stream":
            return SearchPlan("memory", fit.path, data, fit.peak, limit, loading)
    except memory.NotEnoughMemory:
        pass
    held = n_val * d * 4 if kind == "mlp" else 0  # the MLP watches its fold's validation rows as it trains
    fit = memory.plan_fit(kind, n_fit, d, k, budget=max(1, limit - held), path="stream")
    return SearchPlan("stream", "stream", held, fit.peak, limit)


class Objective:
    """Validation accuracy of one trial.

    In memory (:func:`plan_search`), the scaled train rows of a scaling are read once into one matrix whose row
    ranges are the folds (:class:`FoldLayout`); the SVM keeps the rows of several scalings and its solver state
    (its Gram matrix) per scaling and fold, all while ``max_memory`` allows, least recently used released first
    (the other heads keep one scaling's rows: see :meth:`data`); streamed, every fold is fitted chunk by chunk
    from disk.
    """

    def __init__(self, rows: Rows, kind: str, *, cv: int, seed: int, device: str,
                 max_memory: str | int | None = None):
        self.rows, self.kind, self.cv, self.seed, self.device = rows, kind, cv, seed, device
        self.has_val = bool(rows.mask("val").any())
        y = rows.labels[rows.mask("train")]
        self.y_train = y
        self.layout: FoldLayout | None = None
        if self.has_val:
            self.y_val = rows.labels[rows.mask("val")]
        else:
            from sklearn.model_selection import StratifiedKFold

            counts = np.bincount(y)
            k = max(2, min(cv, int(counts[counts > 0].min()))) if counts.size else 2
            if k != cv:
                logger.info("using %d folds: the smallest class has %d train rows", k, int(counts[counts > 0].min()))
            self.folds = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
            self.layout = FoldLayout.of(self.folds)
        self.plan = plan_search(rows, kind, folds=None if self.has_val else len(self.folds), max_memory=max_memory)
        # the SVM's fits keep their state in the cache; the other heads' need room beside it while they run
        self._kept = Kept(self.plan.limit - max(self.plan.loading, self.plan.state if kind != "svm" else 0))
        self._scalers: dict[str, Scaler] = {}

    def data(self, scale: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(scaled train rows, scaled val rows or None), read once per scaling choice while memory allows.

        Only the SVM keeps the rows of several scalings: its solver states (Gram matrices, cross-products and
        their factors, minutes of work at scale) are built on them.  The other heads keep one scaling's rows,
        released before another's are read: reading and scaling them again costs seconds, against the tens of
        seconds of a trial's fits, and holding three scalings would triple the search's memory.

        With folds, the train rows come laid out as :class:`FoldLayout` says (``self.layout.order``)."""
        if self.kind != "svm":
            for key in [k for k in self._kept.items if k[0] == "data" and k[1] != scale]:
                self._kept.drop(key)
        return self._kept.get(("data", scale), lambda: self._load(scale), self.plan.data)

    def _load(self, scale: str) -> tuple[np.ndarray, np.ndarray | None]:
        scaler = self.scaler(scale)
        X = self.rows.load("train", scaler)
        if self.layout is not None:
            X = np.take(X, self.layout.order, axis=0)  # the loaded rows are released as soon as they are laid out
        return X, self.rows.load("val", scaler) if self.has_val else None

    def scaler(self, scale: str) -> Scaler:
        if scale not in self._scalers:
            self._scalers[scale] = Scaler(scale).fit_chunks(X for X, _ in self.rows.chunks("train")())
        return self._scalers[scale]

    def fold(self, scale: str, f: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(X_fit, y_fit, X_val, y_val) of fold ``f`` (None: the val split): views of one matrix per scaling, so
        that consecutive trials see the very same arrays and the SVM can reuse their Gram matrix."""
        X, Xv = self.data(scale)
        if f is None or self.layout is None:
            assert Xv is not None
            return X, self.y_train, Xv, self.y_val
        y = self.y_train[self.layout.order]
        tr, va = self.layout.train[f], self.layout.val[f]
        return X[tr], y[tr], X[va], y[va]

    def _head(self, params: dict):
        dev = {"device": self.device} if "device" in make_head(self.kind, {}).get_params() else {}
        return make_head(self.kind, {**params, "random_state": self.seed, **dev})

    def _fit(self, params: dict, X, y, *, problem_key=None, **fit_kw):
        est = self._head(params)
        if problem_key is not None and self.kind == "svm":
            from featx.heads import LinearProblem

            problem = self._kept.get(("state", *problem_key),  # the Gram matrix: once per fold, for every C
                                     lambda: LinearProblem(X, device=self.device, space=self.plan.path),
                                     self.plan.state, keep=(("data", problem_key[0]),))
            return est.fit(X, y, problem=problem)
        return est.fit(X, y, **fit_kw)

    def _streamed(self, scale: str, f: int | None, params: dict) -> float:
        """Fit fold ``f`` (None: the val split) chunk by chunk and return its validation accuracy."""
        scaler, classes, d = self.scaler(scale), np.arange(len(self.rows.classes)), self.rows.fs.dim(self.rows.layer)
        if f is None:
            fit_chunks, val_chunks = self.rows.chunks("train", scaler), self.rows.chunks("val", scaler)
        else:
            from featx.heads import rows_where

            in_val = np.zeros(len(self.y_train), dtype=bool)
            in_val[self.folds[f][1]] = True
            fit_chunks, val_chunks = rows_where(self.rows.chunks("train", scaler), ~in_val), \
                rows_where(self.rows.chunks("train", scaler), in_val)
        val = None
        if self.kind == "mlp":
            parts = list(val_chunks())
            val = (np.concatenate([X for X, _ in parts]), np.concatenate([y for _, y in parts]))
        est = self._head(params).fit_stream(fit_chunks, classes=classes, n_features=d, val=val)
        hits = total = 0
        for X, y in ([val] if val is not None else val_chunks()):
            hits += int(np.sum(est.predict(X) == y))
            total += len(y)
        return hits / max(total, 1)

    def __call__(self, trial) -> float:
        import optuna

        scale, params = suggest(trial, self.kind)
        hold_for_tests(trial)  # FEATX_TRIAL_HOLD only: a test kills the process here
        if self.kind == "mlp":
            def report(epoch: int, val_accuracy: float) -> None:
                interrupt.check("search.epoch")  # between MLP epochs: the trial is abandoned, never half-told
                trial.report(val_accuracy, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch} (validation accuracy {val_accuracy:.4f})")

            params = {**params, "epoch_callback": report}
            if self.plan.mode == "stream":
                acc = self._streamed(scale, None if self.has_val else 0, params)
            else:
                Xtr, ytr, Xva, yva = self.fold(scale, None if self.has_val else 0)
                est = self._fit(params, Xtr, ytr, X_val=Xva, y_val=yva)
                acc = float(np.mean(est.predict(Xva) == yva))
        else:
            accs = []
            for f in ([None] if self.has_val else range(len(self.folds))):
                interrupt.check("search.fold")
                if self.plan.mode == "stream":
                    accs.append(self._streamed(scale, f, params))
                    continue
                Xtr, ytr, Xva, yva = self.fold(scale, f)
                est = self._fit(params, Xtr, ytr, problem_key=(scale, f))
                accs.append(float(np.mean(est.predict(Xva) == yva)))
            acc = float(np.mean(accs))
        if not math.isfinite(acc):
            raise RuntimeError("validation accuracy is not finite (the fit diverged)")
        return acc


# ------------------------------------------------------------------------------------------------ workers

@dataclass
class _WorkerArgs:
    features: str
    layer: str | None
    kind: str
    split: str | None
    seed: int
    device: str
    cv: int
    storage: str
    study: str
    attrs: dict
    sampler: str
    n_trials: int
    timeout: float | None
    threads: int
    worker: int
    heartbeat: int = HEARTBEAT
    max_memory: int | None = None


def _log_trial(study, trial) -> None:
    state = trial.state.name.lower()
    best = None
    try:
        best = study.best_value
    except ValueError:
        pass
    if trial.state.name == "COMPLETE":
        logger.info("trial %d: %.4f %s (best %.4f)", trial.number, trial.value, _fmt(trial.params), best)
    else:
        reason = trial.user_attrs.get("fail_reason") or trial.system_attrs.get("fail_reason", "")
        logger.info("trial %d %s %s %s", trial.number, state, _fmt(trial.params), reason)


def _fmt(params: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items()))


def _run_worker(a: _WorkerArgs) -> None:
    """One search worker: open the rows once, run its share of trials on the shared study."""
    import optuna

    if a.threads:
        if a.kind == "mlp":
            import torch

            torch.set_num_threads(a.threads)
        else:  # the linear heads compute with numpy's BLAS, not torch
            from threadpoolctl import threadpool_limits

            threadpool_limits(a.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = open_rows(a.features, a.layer, split=a.split, seed=a.seed)
    study = _open_study(a.storage, a.study, attrs=a.attrs, sampler=a.sampler, seed=a.seed + a.worker,
                        kind=a.kind, create=False, heartbeat=a.heartbeat)
    objective = Objective(rows, a.kind, cv=a.cv, seed=a.seed, device=a.device, max_memory=a.max_memory)
    started: list = []  # this worker's trials, to fail any a forced stop leaves RUNNING

    def guarded(trial):
        started.append(trial)
        fail_dead_trials(study)  # a sibling worker killed meanwhile: its trial fails and is queued again
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except interrupt.Interrupted:  # abandoned between folds or epochs: FAIL "interrupted", no trial after it
            quiet.numbers.add(trial.number)
            trial.set_user_attr("fail_reason", "interrupted")
            study.stop()
            raise
        except KeyboardInterrupt:  # a second signal: Optuna fails the trial and raises it again
            quiet.numbers.add(trial.number)
            with contextlib.suppress(Exception):
                trial.set_user_attr("fail_reason", "interrupted")
            raise
        except (FeatxError, Exception) as e:  # a failed trial is recorded with its reason; the search goes on
            trial.set_user_attr("fail_reason", f"{type(e).__name__}: {str(e)[:300]}")
            raise

    def between_trials(study, trial) -> None:
        _log_trial(study, trial)
        try:
            interrupt.check("search.trial")
        except interrupt.Interrupted:
            study.stop()  # Optuna ends its loop before asking for another trial; raised again below

    # No KeyboardInterrupt may reach Optuna's trial loop (optuna/optuna#3336, #5280): the first signal only asks
    # for a stop, which the objective notices between folds and epochs and the callback between trials.
    quiet = _quiet_interrupted_trials()
    quiet.numbers.clear()  # trial numbers are per study
    interrupt.raise_if_requested("search.trial")  # stopped while loading: no trial to abandon
    try:
        study.optimize(guarded, n_trials=a.n_trials, timeout=a.timeout, catch=(Exception,),
                       callbacks=[between_trials], gc_after_trial=False)
    except BaseException:
        if interrupt.stop_requested():  # a second signal landed anywhere, Optuna's bookkeeping included
            _abandon(study, started)
        raise
    interrupt.raise_if_requested("search.trial")


def _abandon(study, trials: list) -> None:
    """Fail (reason "interrupted") those of ``trials`` still RUNNING: an immediate stop leaves none behind."""
    import optuna

    S = optuna.trial.TrialState
    try:
        running = {t.number for t in study.get_trials(deepcopy=False, states=(S.RUNNING,))}
        for trial in trials:
            if trial.number in running:
                trial.set_user_attr("fail_reason", "interrupted")
                study.tell(trial, state=S.FAIL, skip_if_finished=True)
                logger.info("trial %d fail (interrupted)", trial.number)
    except Exception as e:  # the storage itself may be what the stop cut short; the rerun still works
        logger.warning("could not mark the interrupted trial as failed: %s: %s", type(e).__name__, e)


class _DropInterruptedTrials:
    """A logging filter: Optuna's warnings (one with a traceback) about trials the stop failed, which featx
    reports in one line instead.  ``numbers``: those trials."""

    def __init__(self) -> None:
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (interrupt.Interrupted, KeyboardInterrupt)):
            return False
        msg = record.getMessage()
        return not any(msg.startswith(f"Trial {n} failed") for n in self.numbers)


def _quiet_interrupted_trials() -> _DropInterruptedTrials:
    log = logging.getLogger("optuna.study._optimize")  # where Optuna logs "Trial N failed ..."
    for f in log.filters:
        if isinstance(f, _DropInterruptedTrials):
            return f
    f = _DropInterruptedTrials()
    log.addFilter(f)
    return f


def _child(a: _WorkerArgs, level: int, stop_flag=None) -> None:  # pragma: no cover - runs in a spawned process
    import sys

    # SIGINT and SIGTERM are blocked until handling() takes them (the parent held them while starting us); the
    # exit code tells the parent how this worker ended: 130/143 when a stop ended it
    code = 0
    try:
        with interrupt.handling(parent=stop_flag):
            logging.basicConfig(level=level, stream=sys.stderr, format=f"featx[w{a.worker}]: %(message)s")
            try:
                _run_worker(a)
            except interrupt.Interrupted as e:
                code = e.exit_code
            except Exception:
                name = interrupt.stop_requested()
                if name is None:
                    raise
                code = interrupt.exit_code_of(name)  # what a second signal broke is the stop, not a bug
    except KeyboardInterrupt as e:  # a second signal (raised by featx.interrupt with the signal's name)
        code = interrupt.exit_code_of(str(e.args[0]) if e.args else "SIGINT")
    if code:
        sys.exit(code)


@dataclass
class SearchResult:
    path: Path
    study: str
    storage: str
    search: dict
    metrics: dict


def search(features: str | os.PathLike, kind: str, *, layer: str | None = None, trials: int = 20,
           timeout: float | None = None, storage: str | None = None, study: str | None = None, jobs: int = 1,
           cv: int = 3, sampler: str = "tpe", seed: int = 0, split: str | None = None, device: str = "auto",
           cache: str | os.PathLike | None = None, heartbeat: int = HEARTBEAT,
           max_memory: str | int | None = None) -> SearchResult:
    """Search ``kind``'s hyperparameters on ``features``, then refit the best and save it as a head.

    Args:
        trials: trials to add (a rerun adds that many more to the same study).
        timeout: stop adding trials after this many seconds.
        storage: Optuna storage URL or journal file (default: ``<cache>/studies/featx.journal``).
        study: study name (default: derived from the feature set, head kind and layer).
        jobs: worker processes sharing the study. cv: folds when the feature set has no val split.
        sampler: ``tpe`` or ``random``.
        heartbeat: seconds between a running trial's heartbeats on a database storage; a trial silent for 3
            heartbeats (its worker or machine died) is marked failed and queued again.
        max_memory: memory budget of the search, bytes or a size such as ``24G`` (default: 70% of available
            memory), shared out between the ``jobs`` workers; see :func:`plan_search`.

    Returns:
        :class:`SearchResult` with the best head's directory.

    Raises:
        UsageError: unknown head or sampler, an unreachable storage, a study made for other features or head.
        DataError: as :func:`featx.fit.fit_head`.  NotEnoughMemory: not even streamed fits fit the budget.
    """
    if kind not in HEAD_KINDS:
        raise UsageError(f"unknown head {kind!r}: use one of {', '.join(HEAD_KINDS)}")
    if sampler not in SAMPLERS:
        raise UsageError(f"--sampler {sampler!r}: use tpe or random")
    if trials < 0 or jobs < 1 or cv < 2:
        raise UsageError("--trials must be >= 0, --jobs >= 1 and --cv >= 2")
    from featx.devices import resolve_device_type

    dev = resolve_device_type(device)
    rows = open_rows(features, layer, split=split, seed=seed)
    rows.fs.verify([rows.layer])  # damage stops the search here, not as a failed trial in each worker
    share = max(1, memory.budget(max_memory) // jobs)  # each worker holds its own rows
    if trials:  # refused here, in one line, rather than as a failed trial in each worker
        logger.info("%s", plan_search(rows, kind, folds=None if rows.mask("val").any() else cv,
                                      max_memory=share).describe())
    storage_url = storage or default_storage(cache)
    name = study or study_name_for(rows, kind)
    attrs: dict[str, Any] = {"featx_source": rows.fs.key or source_identity(rows).get("sha256", ""), "kind": kind,
             "layer": rows.layer, "featx_version": featx.__version__, "cv": cv,
             "objective": "validation accuracy (val split)" if rows.mask("val").any()
             else f"{cv}-fold CV accuracy on train rows"}
    st = _open_study(storage_url, name, attrs=attrs, sampler=sampler, seed=seed, kind=kind, create=True,
                     heartbeat=heartbeat)
    before = len(st.trials)
    logger.info("study %s in %s: %d trial(s) so far, adding %d with %d worker(s)", name, storage_url, before, trials,
                jobs)
    t0 = time.perf_counter()
    base = dict(features=str(features), layer=rows.layer, kind=kind, split=split, seed=seed, device=dev, cv=cv,
                storage=storage_url, study=name, attrs=attrs, sampler=sampler, timeout=timeout, heartbeat=heartbeat,
                max_memory=share)
    _run_workers(base, trials, jobs)
    st = _open_study(storage_url, name, attrs=attrs, sampler=sampler, seed=seed, kind=kind, create=False,
                     heartbeat=heartbeat)
    summary = _summary(st, name=name, storage=storage_url, sampler=sampler, objective=attrs["objective"],
                       before=before, elapsed=time.perf_counter() - t0)
    best = st.best_trial
    logger.info("best trial %d: validation accuracy %.4f with %s; refitting on all train rows",
                best.number, best.value, _fmt(best.params))
    params = dict(best.params)
    scale = params.pop("scale", "standard")
    if kind == "mlp":
        params["epochs"] = MLP_SPACE["epochs"]

    def plots(tmp: Path) -> None:
        _search_plots(st, tmp)

    res = fit_head(features, kind, layer=rows.layer, params=params, scale=scale, split=split, seed=seed,
                   device=device, cache=cache, rows=rows, extra_meta={"search": summary}, extra_files=plots,
                   max_memory=max_memory)
    assert isinstance(res, FitResult)
    return SearchResult(res.path, name, storage_url, summary, res.metrics)


def _run_workers(base: dict, trials: int, jobs: int) -> None:
    """Run ``trials`` trials: here (one job) or in ``jobs`` spawned worker processes sharing the study."""
    if jobs == 1:
        if trials:
            _run_worker(_WorkerArgs(**base, n_trials=trials, threads=0, worker=0))
        return
    cores = os.cpu_count() or 1
    shares = [trials // jobs + (1 if i < trials % jobs else 0) for i in range(jobs)]
    ctx = mp.get_context("spawn")  # never fork a process that holds torch's thread pools
    flag = interrupt.share_with_workers(ctx)  # our stop request reaches the workers through it
    procs = [ctx.Process(target=_child, args=(_WorkerArgs(**base, n_trials=n, threads=max(1, cores // jobs), worker=i),
                                              logging.getLogger("featx").getEffectiveLevel(), flag))
             for i, n in enumerate(shares) if n]
    try:
        for p in procs:
            with interrupt.workers_starting():
                p.start()
        interrupt.mark("search.workers")
        for p in procs:
            p.join()
    except KeyboardInterrupt:  # a second signal: the workers stop at once too, failing their RUNNING trials
        interrupt.stop_workers_now(procs)
        for p in procs:
            p.join(timeout=60)
        raise
    finally:
        interrupt.release_workers(flag)
    interrupt.raise_if_requested("search.trial")
    codes = [p.exitcode for p in procs]
    stopped = [c for c in codes if c in (interrupt.exit_code_of("SIGINT"), interrupt.exit_code_of("SIGTERM"))]
    if stopped:  # a worker alone was sent a signal (by a scheduler, say): the search as a whole stops
        raise interrupt.Interrupted("SIGTERM" if stopped[0] == interrupt.exit_code_of("SIGTERM") else "SIGINT",
                                    "search.trial")


def _summary(st, *, name: str, storage: str, sampler: str, objective: str, before: int, elapsed: float) -> dict:
    """The study's counts and best trial, as ``metrics.json``'s ``search`` section; refuses a study with none
    finished."""
    import optuna

    states = [t.state for t in st.trials]
    S = optuna.trial.TrialState
    summary = {"study": name, "storage": storage, "sampler": sampler, "objective": objective,
               "trials": len(states), "added": len(states) - before,
               "finished": states.count(S.COMPLETE), "pruned": states.count(S.PRUNED),
               "failed": states.count(S.FAIL), "running": states.count(S.RUNNING),
               "waiting": states.count(S.WAITING), "seconds": round(elapsed, 2)}
    if summary["running"] or summary["waiting"]:  # other workers (other machines) still at work on the study
        logger.info("%d trial(s) of the study still running and %d waiting (other workers)",
                    summary["running"], summary["waiting"])
    complete = [t for t in st.trials if t.state == S.COMPLETE]
    if not complete:
        reasons = [t.user_attrs.get("fail_reason", "") for t in st.trials if t.state == S.FAIL][:1]
        raise DataError(f"no trial of study {name!r} finished ({summary['failed']} failed"
                        f"{': ' + reasons[0] if reasons and reasons[0] else ''}); nothing to refit")
    best = st.best_trial
    summary.update({"best_value": best.value, "best_params": best.params, "best_trial": best.number})
    return summary


def _search_plots(study, out: Path) -> None:
    """optimization_history.png and param_importances.png (skipped, with a log line, when Optuna cannot draw)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import warnings

    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    for name, fn in (("optimization_history.png", ovm.plot_optimization_history),
                     ("param_importances.png", ovm.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax: Any = fn(study)
            fig: Any = ax.figure if hasattr(ax, "figure") else ax[0].figure
            fig.savefig(out / name, dpi=100, bbox_inches="tight")
            plt.close(fig)
        except Exception as e:  # e.g. importances need two finished trials with varying parameters
            logger.info("no %s: %s", name, str(e).splitlines()[0][:120] if str(e) else type(e).__name__)


# ------------------------------------------------------------------------------------------------ studies by name

def finished_trials(storage: str, study: str) -> tuple[int, int] | None:
    """How far the study named ``study`` in ``storage`` got: ``(finished, total)`` trials, or None when there is no
    such study.

    A finished trial is complete, pruned, or failed for a reason of its own; a trial failed by an interruption
    (``fail_reason`` ``interrupted``) is not finished: a rerun would evaluate it again.

    Example:
        >>> finished_trials(default_storage("cache"), "featx-logreg-pool5-0123456789ab")  # doctest: +SKIP
        (8, 8)
    """
    import optuna

    try:
        st = optuna.load_study(study_name=study, storage=open_storage(storage))
    except KeyError:  # no study of that name
        return None
    S = optuna.trial.TrialState
    done = sum(t.state in (S.COMPLETE, S.PRUNED)
               or (t.state == S.FAIL and t.user_attrs.get("fail_reason") != "interrupted") for t in st.trials)
    return done, len(st.trials)


def delete_study(storage: str, study: str) -> None:
    """Delete the study named ``study`` and its trials from ``storage``, so that a search of that name starts
    afresh; nothing when there is no such study."""
    import optuna

    try:
        optuna.delete_study(study_name=study, storage=open_storage(storage))
    except KeyError:  # no study of that name
        pass


__all__ += ["finished_trials", "delete_study"]
