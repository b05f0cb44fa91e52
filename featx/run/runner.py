"""The run of a pipeline's cases: each case once, in the file's order, through the stage executors of
:mod:`featx.run.stages`; a failed case recorded with its reason while the others run on; the results written after
every case.  The dry run walks the same cases through the same executors' ``plan``."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import featx
from featx import interrupt
from featx.cache import atomic_write_json, cache_root, hash_key, is_disk_full
from featx.datasets.digits import write_digits
from featx.errors import DataError, DiskFullError, FeatxError
from featx.locks import hold
from featx.pipeline import Case, Pipeline, Variant, load
from featx.run import report
from featx.run.stages import EXECUTORS, STAGES, Planned, StageFailed

if TYPE_CHECKING:
    from featx.extract import ExtractResult

__all__ = ["run_pipeline", "RunResult", "RunPlan", "Runner"]

logger = logging.getLogger(__name__)

R = TypeVar("R")

# what stops the run rather than failing a case: recorded as "interrupted", the finished results written, re-raised
# (featx.interrupt.Interrupted first: it is also a FeatxError, which would otherwise fail the case)
_STOPS: tuple[type[BaseException], ...] = (interrupt.Interrupted, KeyboardInterrupt, SystemExit)


@dataclass
class RunResult:
    """What :func:`run_pipeline` did: the results directory, a row per case, and per stage how many outputs
    were computed now and how many came from the cache."""

    path: Path
    rows: list[dict[str, Any]]
    computed: dict[str, int]
    cached: dict[str, int]
    no_space: list[str] = field(default_factory=list)  # the failed cases that found the disk full

    @property
    def failed(self) -> list[str]:
        return [r["case"] for r in self.rows if r["status"] == "failed"]


@dataclass
class RunPlan:
    """What ``--dry-run`` found: per feature set and per case, each stage ``cached`` or ``to compute``."""

    path: Path
    pipeline: Pipeline
    features: dict[Variant, dict[str, Any]] = field(default_factory=dict)
    cases: dict[str, dict[str, str]] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)


def run_pipeline(pipeline: str | os.PathLike | Pipeline, *, data: str | os.PathLike | None = None,
                 weights: str | None = None, sets: list[str] | tuple[str, ...] = (), only: str | None = None,
                 dry_run: bool = False, cache: str | os.PathLike | None = None, device: str = "auto",
                 progress: bool | None = None,
                 on_stage: Callable[[str, str, str], None] | None = None) -> RunResult | RunPlan:
    """Run (or, with ``dry_run``, plan) the cases of a pipeline file.

    Args:
        pipeline: a pipeline file (see docs/pipelines.md), or one already loaded by :func:`featx.pipeline.load`.
        data, weights, sets: replace the file's data path, every backbone's weights, and any value (dotted
            ``KEY=VALUE``), as :func:`featx.pipeline.load` does.
        only: a glob (or comma-separated globs) of case names to run; the stages they depend on run too.
        dry_run: compute nothing: read the data, and say per case whether each stage is cached or to compute.
        cache: cache root. device: ``auto``, ``cpu`` or ``cuda`` (as :mod:`featx.devices` reads it), passed to
            every stage as it is.
        progress: tqdm bars inside stages (default: when stderr is a terminal).
        on_stage: called with ``(event, case, stage)``, ``event`` being ``start`` or ``done``, around every stage
            (tests use it to stop a run at a named point).

    Returns:
        :class:`RunResult` (``dry_run``: :class:`RunPlan`).  A failed case does not raise: it is a row with
        ``status = failed`` and its ``error``; the CLI exits non-zero when there is one.

    Raises:
        PipelineError: an invalid file (one line naming the key).  UsageError: ``--only`` matches no case.
        DataError: the data path does not exist.
        KeyboardInterrupt (and featx's interruption): after recording the running case as ``interrupted`` and
        writing the results of the finished ones.

    Example:
        >>> res = run_pipeline("pipelines/digits.toml", weights="random")  # doctest: +SKIP
        >>> res.path, res.failed  # doctest: +SKIP
        (PosixPath('.../cache/runs/...'), [])
    """
    p = pipeline if isinstance(pipeline, Pipeline) else load(pipeline, data=data, weights=weights, sets=sets)
    chosen = p.select(only)
    root = cache_root(cache)
    key = hash_key({"pipeline": p.config, "cases": [c.name for c in chosen], "featx": featx.__version__.split(".")[0]})
    out = root / "runs" / key
    runner = Runner(p, root, device=device, progress=progress, on_stage=on_stage)
    if dry_run:
        return runner.plan(chosen, out)
    return runner.run(chosen, out)


class Runner:
    """One run (or dry run) of a pipeline: what the stage executors share.  Each feature set is extracted, and each
    case run, at most once (a fine-tune runs its candidates first when they have not run yet); the same holds for
    their plans."""

    def __init__(self, p: Pipeline, root: Path, *, device: str, progress: bool | None,
                 on_stage: Callable[[str, str, str], None] | None):
        self.p, self.root, self.device, self.progress, self.on_stage = p, root, device, progress, on_stage
        stages = [s for s in STAGES if s == "extract" or any(c.stage == s for c in p.cases)]  # the file's stages
        self.computed = dict.fromkeys(stages, 0)
        self.cached = dict.fromkeys(stages, 0)
        self.outcomes: dict[str, dict[str, Any]] = {}   # case name -> its row
        self._features: dict[Variant, ExtractResult | StageFailed] = {}
        self._plans: dict[str | Variant, Planned] = {}  # case name or feature set -> its plan
        self._running: list[str] = []                   # the cases being run, innermost last
        self._data: Path | None = None
        self._full: set[Variant] = set()                # feature sets whose extraction found the disk full
        self.no_space: list[str] = []                   # the cases that failed for want of space

    def data_path(self) -> Path:
        """The data folder or CSV; ``sklearn:digits`` is written once under the cache (as ``featx demo`` does)."""
        if self._data is None:
            path = self.p.data["path"]
            if path == "sklearn:digits":
                digits = self.root / "demo" / "digits"
                if any(digits.glob(".complete-*")):  # written: reading it needs no lock (a read-only cache)
                    self._data = digits
                else:
                    with hold(self.root / "locks" / "demo-digits.lock", what="the digits images"):
                        self._data = write_digits(digits)
            else:
                self._data = Path(path).expanduser()
                if not self._data.exists():  # every case would fail the same way: say it once
                    raise DataError(f"pipeline {self.p.name}: data.path {path!r} does not exist: download the data "
                                    f"there (the file's header says from where), or give --data PATH")
        return self._data

    # ---------------------------------------------------------------------------------------- running

    def timed(self, stage: str, fn: Callable[[], tuple[R, bool]], what: Callable[[R], str] | None = None) -> R:
        """Run one stage of the case being run: ``fn`` returns (its result, whether it was computed now); a line
        on stderr, the counters, the ``on_stage`` hooks."""
        case = self._running[-1]
        if self.on_stage is not None:
            self.on_stage("start", case, stage)
        t0 = time.perf_counter()
        result, computed = fn()
        dt = time.perf_counter() - t0
        (self.computed if computed else self.cached)[stage] += 1
        try:
            detail = f", {what(result)}" if what is not None else ""
        except (KeyError, TypeError, ValueError):  # a summary that cannot be said is no reason to stop
            detail = ""
        logger.info("[%s] %s: %s%s", case, stage, f"computed in {dt:.1f}s" if computed else "cached", detail)
        if self.on_stage is not None:
            self.on_stage("done", case, stage)
        return result

    def features(self, v: Variant) -> ExtractResult:
        """The feature set ``v``, extracted once for every case that needs it.

        Raises:
            StageFailed: its extraction failed (now or for an earlier case).
        """
        got = self._features.get(v)
        if got is None:
            try:
                got = EXECUTORS["extract"].run(self, v)
            except _STOPS:
                raise
            except FeatxError as e:
                got = StageFailed(f"extract: {e}")
                if isinstance(e, DiskFullError):
                    self._full.add(v)
            except Exception as e:
                got = StageFailed(f"extract: {type(e).__name__}: {e}")
                if is_disk_full(e):
                    self._full.add(v)
            self._features[v] = got
        if isinstance(got, StageFailed):
            raise got
        return got

    def case_row(self, c: Case) -> dict[str, Any]:
        """Run ``c`` (once) and return its row; a failure is a row with its reason."""
        if c.name in self.outcomes:
            return self.outcomes[c.name]
        row: dict[str, Any] = {"case": c.name, "status": "ok"}
        self.outcomes[c.name] = row  # placed first: a case is never run twice, even from inside itself
        self._running.append(c.name)
        try:
            # another run of a case with the same content (another pipeline file, the same cache) waits for this
            # one, then finds its stages cached
            with hold(self.root / "locks" / f"case-{self.case_key(c)}.lock", what=f"case {c.name}"):
                row.update(EXECUTORS[c.stage].run(self, c))
        except _STOPS:
            row.update(status="interrupted", error=f"{c.stage}: interrupted")
            raise
        except StageFailed as e:
            row.update(status="failed", error=str(e))
            if c.variant is not None and c.variant in self._full:
                self.no_space.append(c.name)
        except FeatxError as e:
            row.update(status="failed", error=f"{c.stage}: {e}")
            if isinstance(e, DiskFullError):
                self.no_space.append(c.name)
        except Exception as e:  # a head that cannot fit is this case's failure, not the run's
            if is_disk_full(e):  # a library's own word for it (a study's database that is full)
                row.update(status="failed", error=f"{c.stage}: no space left ({type(e).__name__}); free space and "
                                                  f"run the same command: finished work is kept")
                self.no_space.append(c.name)
            else:
                first = str(e).splitlines()[0] if str(e) else ""
                row.update(status="failed", error=f"{c.stage}: {type(e).__name__}: {first}")
        finally:
            self._running.pop()
        if row["status"] == "failed":
            logger.warning("[%s] failed: %s", c.name, row["error"])
        return row

    def case_key(self, c: Case) -> str:
        """What a case computes, whatever its pipeline file: the key of its lock."""
        return hash_key({"case": c.describe(), "variant": c.variant, "layer": c.layer, "kind": c.kind,
                         "params": c.params, "scale": c.scale, "candidates": c.candidates, "data": self.p.data,
                         "start": self.p.config.get("finetune") if c.stage == "finetune" else None})

    def run(self, chosen: list[Case], out: Path) -> RunResult:
        """Run the chosen cases in order, writing the results after each one (and when interrupted).

        Two runs of the same pipeline on one cache take turns: the second waits for the first, then finds every
        stage cached and writes the same results."""
        self.data_path()
        with hold(out, what=f"the results of pipeline {self.p.name}"):
            return self._run(chosen, out)

    def _run(self, chosen: list[Case], out: Path) -> RunResult:
        logger.info("pipeline %s: %d case(s), results in %s", self.p.name, len(chosen), out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "pipeline.json", {"name": self.p.name, "file": str(self.p.file or ""),
                                                  "config": self.p.config, "cases": [c.name for c in chosen]})
        try:
            for c in chosen:
                interrupt.check("run.case")  # between cases; each stage also stops between its own units
                self.case_row(c)
                try:
                    self._write(chosen, out, final=False)
                except DiskFullError as e:  # written again after the next case, and at the end
                    logger.warning("results not written yet: %s", e)
        except BaseException:
            self._write(chosen, out, final=True)
            raise
        rows = self._write(chosen, out, final=True)
        res = RunResult(out, rows, dict(self.computed), dict(self.cached), list(self.no_space))
        n_ok = sum(r["status"] == "ok" for r in rows)
        logger.info("pipeline %s: %d ok, %d failed; computed %s; cached %s", self.p.name, n_ok, len(res.failed),
                    _counts(self.computed), _counts(self.cached))
        return res

    def _write(self, chosen: list[Case], out: Path, *, final: bool) -> list[dict]:
        rows, columns = report.table(self.p, chosen, self.outcomes)
        report.write_results(out, self.p, rows, columns, computed=self.computed, cached=self.cached)
        if final:
            report.write_report(self.p, rows, out)
        return rows

    # ---------------------------------------------------------------------------------------- dry run

    def planned_features(self, v: Variant) -> Planned:
        """The dry run's view of the feature set ``v`` (planned once)."""
        if v not in self._plans:
            self._plans[v] = EXECUTORS["extract"].plan(self, v)
        return self._plans[v]

    def plan_case(self, c: Case) -> Planned:
        """The dry run's view of the case ``c`` (planned once)."""
        if c.name not in self._plans:
            self._plans[c.name] = EXECUTORS[c.stage].plan(self, c)
        return self._plans[c.name]

    def plan(self, chosen: list[Case], out: Path) -> RunPlan:
        """Plan the chosen cases and those their fine-tunes start from: each stage cached or to compute."""
        plan = RunPlan(out, self.p)
        say = plan.lines.append
        say(f"pipeline {self.p.name} ({self.p.file}): {len(chosen)} of {len(self.p.cases)} case(s)")
        data = self.data_path()
        names = {c.name for c in chosen} | {n for c in chosen for n in c.candidates}
        needed = [c for c in self.p.cases if c.name in names]
        for v in [v for v in self.p.variants if any(c.variant == v for c in needed)]:
            fi = self.planned_features(v)
            plan.features[v] = {"status": fi.status} if fi.path is None else {"status": fi.status, "path": fi.path,
                                                                               **fi.info}
            say(f"features {_variant(v)}: {fi.status}{' ' + str(fi.path) if fi.path is not None else ''}")
            if fi.path is not None:
                counts = ", ".join(f"{k} {n}" for k, n in fi.info["counts"].items())
                say(f"  data {data}: layout {fi.info['layout']}, {len(fi.info['classes'])} classes, "
                    f"{fi.info['n_images']} images ({counts})")
        for c in needed:
            plan.cases[c.name] = self.plan_case(c).shown
            if c in chosen:
                say(f"  {c.name}: " + "; ".join(f"{k} {v}" for k, v in plan.cases[c.name].items()))
        say(f"results would go to {out}")
        return plan


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in d.items() if n) or "nothing"


def _variant(v: Variant) -> str:
    return f"{v.backbone} {v.weights} weights, views={v.views}, normalize={v.normalize}"
