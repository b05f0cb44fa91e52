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
from featx import interrupt
from featx.errors import DataError, FeatxError, UsageError
from featx.fit import HEAD_KINDS, Rows, Scaler, fit_head, make_head, open_rows, source_identity
from featx.studies import HEARTBEAT, default_storage, fail_dead_trials, hold_for_tests, open_storage

__all__ = ["search", "SearchResult", "Objective", "suggest", "open_storage", "default_storage", "study_name_for"]

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random")

# The search spaces (documented in docs/search.md).
SVM_C = (1e-5, 1e2)
LOGREG_C = (1e-4, 1e3)
MLP_SPACE = {"hidden": [64, 128, 256, 512, 1024], "dropout": (0.0, 0.7), "lr": (1e-4, 3e-2),
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

class Objective:
    """Validation accuracy of one trial; data loaded once and kept across trials (per scaling and fold)."""

    def __init__(self, rows: Rows, kind: str, *, cv: int, seed: int, device: str):
        self.rows, self.kind, self.cv, self.seed, self.device = rows, kind, cv, seed, device
        self.has_val = bool(rows.mask("val").any())
        self._raw: np.ndarray | None = None
        self._scaled: dict[str, np.ndarray] = {}
        self._problems: dict[Any, Any] = {}
        self._folds: dict[Any, tuple] = {}
        y = rows.labels[rows.mask("train")]
        self.y_train = y
        if self.has_val:
            self.y_val = rows.labels[rows.mask("val")]
        else:
            from sklearn.model_selection import StratifiedKFold

            counts = np.bincount(y)
            k = max(2, min(cv, int(counts[counts > 0].min()))) if counts.size else 2
            if k != cv:
                logger.info("using %d folds: the smallest class has %d train rows", k, int(counts[counts > 0].min()))
            self.folds = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))

    def data(self, scale: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(scaled train rows, scaled val rows or None), computed once per scaling choice."""
        if scale not in self._scaled:
            scaler = Scaler(scale)
            scaler.fit_chunks(X for X, _ in self.rows.chunks("train")())
            self._scaled[scale] = self.rows.load("train", scaler)
            if self.has_val:
                self._scaled[scale + ":val"] = self.rows.load("val", scaler)
        return self._scaled[scale], self._scaled.get(scale + ":val")

    def fold(self, scale: str, f: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(X_fit, y_fit, X_val, y_val) of fold ``f`` (None: the val split), kept for every later trial, so that
        consecutive trials see the very same arrays and the SVM can reuse their Gram matrix."""
        key = (scale, f)
        if key not in self._folds:
            X, Xv = self.data(scale)
            if f is None:
                self._folds[key] = (X, self.y_train, Xv, self.y_val)
            else:
                tr, va = self.folds[f]
                self._folds[key] = (X[tr], self.y_train[tr], X[va], self.y_train[va])
        return self._folds[key]

    def _fit(self, params: dict, X, y, *, problem_key=None, **fit_kw):
        dev = {"device": self.device} if "device" in make_head(self.kind, {}).get_params() else {}
        est = make_head(self.kind, {**params, "random_state": self.seed, **dev})
        if problem_key is not None and self.kind == "svm":
            from featx.heads import LinearProblem

            if problem_key not in self._problems:  # the Gram matrix: once per fold, for every C that follows
                self._problems[problem_key] = LinearProblem(X, device=self.device)
            return est.fit(X, y, problem=self._problems[problem_key])
        return est.fit(X, y, **fit_kw)

    def __call__(self, trial) -> float:
        import optuna

        scale, params = suggest(trial, self.kind)
        hold_for_tests(trial)  # FEATX_TRIAL_HOLD only: a test kills the process here
        if self.kind == "mlp":
            Xtr, ytr, Xva, yva = self.fold(scale, None if self.has_val else 0)

            def report(epoch: int, val_accuracy: float) -> None:
                interrupt.check("search.epoch")  # between MLP epochs: the trial is abandoned, never half-told
                trial.report(val_accuracy, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch} (validation accuracy {val_accuracy:.4f})")

            est = self._fit({**params, "epoch_callback": report}, Xtr, ytr, X_val=Xva, y_val=yva)
            acc = float(np.mean(est.predict(Xva) == yva))
        else:
            accs = []
            for f in ([None] if self.has_val else range(len(self.folds))):
                interrupt.check("search.fold")
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
    objective = Objective(rows, a.kind, cv=a.cv, seed=a.seed, device=a.device)
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
           cache: str | os.PathLike | None = None, heartbeat: int = HEARTBEAT) -> SearchResult:
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

    Returns:
        :class:`SearchResult` with the best head's directory.

    Raises:
        UsageError: unknown head or sampler, an unreachable storage, a study made for other features or head.
        DataError: as :func:`featx.fit.fit_head`.
    """
    import optuna

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
    storage_url = storage or default_storage(cache)
    name = study or study_name_for(rows, kind)
    attrs = {"featx_source": rows.fs.key or source_identity(rows).get("sha256", ""), "kind": kind,
             "layer": rows.layer, "featx_version": featx.__version__, "cv": cv,
             "objective": "validation accuracy (val split)" if rows.mask("val").any() else f"{cv}-fold CV accuracy on train rows"}
    st = _open_study(storage_url, name, attrs=attrs, sampler=sampler, seed=seed, kind=kind, create=True,
                     heartbeat=heartbeat)
    before = len(st.trials)
    logger.info("study %s in %s: %d trial(s) so far, adding %d with %d worker(s)", name, storage_url, before, trials, jobs)
    t0 = time.perf_counter()
    cores = os.cpu_count() or 1
    shares = [trials // jobs + (1 if i < trials % jobs else 0) for i in range(jobs)]
    base = dict(features=str(features), layer=rows.layer, kind=kind, split=split, seed=seed, device=dev, cv=cv,
                storage=storage_url, study=name, attrs=attrs, sampler=sampler, timeout=timeout, heartbeat=heartbeat)
    if jobs == 1:
        if trials:
            _run_worker(_WorkerArgs(**base, n_trials=trials, threads=0, worker=0))
    else:
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
    elapsed = time.perf_counter() - t0
    st = _open_study(storage_url, name, attrs=attrs, sampler=sampler, seed=seed, kind=kind, create=False,
                     heartbeat=heartbeat)
    states = [t.state for t in st.trials]
    S = optuna.trial.TrialState
    summary = {"study": name, "storage": storage_url, "sampler": sampler, "objective": attrs["objective"],
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
    logger.info("best trial %d: validation accuracy %.4f with %s; refitting on all train rows",
                best.number, best.value, _fmt(best.params))
    params = dict(best.params)
    scale = params.pop("scale", "standard")
    if kind == "mlp":
        params["epochs"] = MLP_SPACE["epochs"]

    def plots(tmp: Path) -> None:
        _search_plots(st, tmp)

    res = fit_head(features, kind, layer=rows.layer, params=params, scale=scale, split=split, seed=seed,
                   device=device, cache=cache, rows=rows, extra_meta={"search": summary}, extra_files=plots)
    return SearchResult(res.path, name, storage_url, summary, res.metrics)


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
                ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
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
