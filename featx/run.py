"""``featx run``: every case of a pipeline file through the stages' public functions, ending in a results table.

This is the one module that composes stages.  It calls :func:`featx.extract.extract`, :func:`featx.fit.fit_head`,
:func:`featx.search.search` and :func:`featx.finetune.finetune` in this process and shares their outputs between
cases: one extraction serves every head of its feature set, one search every fine-tune that starts from it.
Every stage keeps its own content-addressed cache, so a second run computes nothing, a run killed at any moment
redoes only the stage it was in (extraction resumes by shard, fine-tuning by epoch; a search, whose seeded
sampler cannot resume where it stopped, starts its study again), and changing one value reruns only what
depends on it.  A case that fails is recorded with its reason and the others run on.

The results go to ``<cache>/runs/<key>/`` (``key``: the hash of the resolved pipeline and the chosen cases):
``results.csv``, ``results.json``, ``report.md``, ``results.png``, and the resolved ``pipeline.json``.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import featx
from featx import interrupt
from featx.cache import atomic_write_bytes, atomic_write_json, cache_root, hash_key, read_json
from featx.errors import DataError, FeatxError
from featx.pipeline import Case, Pipeline, Variant, load

logger = logging.getLogger(__name__)

STAGES = ("extract", "fit", "search", "finetune")
# results.csv's columns, in this order; the parameters that differ between cases come after `status`
LEAD = ("case", "status")
METRICS = ("backbone", "weights", "layer", "head", "test_accuracy", "macro_f1", "top5_accuracy", "val_accuracy",
           "seconds", "images_per_s", "reference", "vs_reference", "reference_source", "features", "head_dir",
           "model_dir", "error")


# what stops the run rather than failing a case: recorded as "interrupted", the finished results written, re-raised
# (featx.interrupt.Interrupted first: it is also a FeatxError, which would otherwise fail the case)
_STOPS: tuple[type[BaseException], ...] = (interrupt.Interrupted, KeyboardInterrupt, SystemExit)


class StageFailed(Exception):
    """A stage of a case could not run; the message is the reason recorded in the results."""


@dataclass
class RunResult:
    """What :func:`run_pipeline` did: the results directory, a row per case, and per stage how many outputs
    were computed now and how many came from the cache."""

    path: Path
    rows: list[dict[str, Any]]
    computed: dict[str, int]
    cached: dict[str, int]

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
        cache: cache root. device: ``auto``, ``cpu`` or ``cuda``, for every stage.
        progress: tqdm bars inside stages (default: when stderr is a terminal).
        on_stage: called with ``(event, case, stage)``, ``event`` being ``start`` or ``done``, around every stage
            (tests use it to stop a run at a named point).

    Returns:
        :class:`RunResult` (``dry_run``: :class:`RunPlan`).  A failed case does not raise: it is a row with
        ``status = failed`` and its ``error``; the CLI exits non-zero when there is one.

    Raises:
        PipelineError: an invalid file (one line naming the key).  UsageError: ``--only`` matches no case.
        KeyboardInterrupt (and featx's interruption): after recording the running case as ``interrupted`` and
        writing the results of the finished ones.
    """
    p = pipeline if isinstance(pipeline, Pipeline) else load(pipeline, data=data, weights=weights, sets=sets)
    chosen = p.select(only)
    root = cache_root(cache)
    key = hash_key({"pipeline": p.config, "cases": [c.name for c in chosen], "featx": featx.__version__.split(".")[0]})
    out = root / "runs" / key
    runner = _Runner(p, root, device=device, progress=progress, on_stage=on_stage)
    if dry_run:
        return runner.plan(chosen, out)
    return runner.run(chosen, out)


# ============================================================================================== running

class _Runner:
    def __init__(self, p: Pipeline, root: Path, *, device: str, progress: bool | None,
                 on_stage: Callable[[str, str, str], None] | None):
        self.p, self.root, self.device, self.progress, self.on_stage = p, root, device, progress, on_stage
        self.features: dict[Variant, Any] = {}      # variant -> ExtractResult, or StageFailed
        self.outcomes: dict[str, dict] = {}          # case name -> its row (fit and search cases feed fine-tunes)
        self.computed = dict.fromkeys(STAGES, 0)
        self.cached = dict.fromkeys(STAGES, 0)
        self._data: Path | None = None

    # ---------------------------------------------------------------------------------------- data

    def data_path(self) -> Path:
        """The data folder or CSV; ``sklearn:digits`` is written once under the cache (as ``featx demo`` does)."""
        if self._data is None:
            path = self.p.data["path"]
            if path == "sklearn:digits":
                from featx.demo import write_digits

                self._data = write_digits(self.root / "demo" / "digits")
            else:
                self._data = Path(path).expanduser()
                if not self._data.exists():  # every case would fail the same way: say it once
                    raise DataError(f"pipeline {self.p.name}: data.path {path!r} does not exist: download the data "
                                    f"there (the file's header says from where), or give --data PATH")
        return self._data

    def _extract_kwargs(self, v: Variant) -> dict[str, Any]:
        kw = dict(layers=list(self.p.layers), backbone=v.backbone, weights=v.weights, split=self.p.data["split"],
                  seed=self.p.data["seed"], views=v.views, normalize=v.normalize,
                  batch_size=self.p.extract["batch_size"], amp=self.p.extract["amp"], device=self.device,
                  cache=self.root)
        if self.p.data["layout"] not in ("auto", ""):
            kw["layout"] = self.p.data["layout"]
        return kw

    # ---------------------------------------------------------------------------------------- stages

    def _stage(self, case: str, stage: str, fn: Callable[[], tuple[Any, bool]],
               what: Callable[[Any], str] | None = None) -> Any:
        """Run one stage of ``case``: a progress line on stderr, the counters, the hooks."""
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

    def features_for(self, v: Variant, case: str):
        """The variant's feature set, extracted once for every case that needs it."""
        got = self.features.get(v)
        if got is None:
            from featx.extract import extract

            try:
                got = self._stage(case, "extract", lambda: _pair(extract(self.data_path(), **self._extract_kwargs(v),
                                                                         progress=self.progress)),
                                  lambda r: f"{r.manifest.get('n_rows', 0)} rows {r.manifest.get('counts', {})}")
            except _STOPS:
                raise
            except FeatxError as e:
                got = StageFailed(f"extract: {e}")
            except Exception as e:
                got = StageFailed(f"extract: {type(e).__name__}: {e}")
            self.features[v] = got
        if isinstance(got, StageFailed):
            raise got
        return got

    def _fit(self, c: Case) -> dict:
        from featx.fit import fit_head

        feats = self.features_for(c.variant, c.name)
        res = self._stage(c.name, "fit", lambda: _pair(fit_head(
            feats.path, c.kind, layer=c.layer, params=dict(c.params), scale=c.scale, seed=self.p.data["seed"],
            device=self.device, cache=self.root)), lambda r: f"test accuracy {r.metrics['test_accuracy']:.4f}")
        m = res.metrics
        return _row_metrics(m, seconds=m.get("fit_seconds"), features=feats, head=res.path)

    def _search_key(self, c: Case, feats) -> str:
        return hash_key({"features": feats.manifest.get("key"), "kind": c.kind, "layer": c.layer,
                         "seed": self.p.data["seed"], **c.params, "featx": featx.__version__.split(".")[0]})

    def _search(self, c: Case) -> dict:
        feats = self.features_for(c.variant, c.name)
        key = self._search_key(c, feats)
        memo = self.root / "runs" / "searches" / f"{key}.json"

        def go():
            rec = read_json(memo)
            if isinstance(rec, dict) and isinstance(read_json(Path(rec.get("head", "")) / "metrics.json"), dict):
                return rec, False
            return self._run_search(c, feats, key, memo), True

        rec = self._stage(c.name, "search", go, lambda r: f"best validation {r['search']['best_value']:.4f}")
        m = read_json(Path(rec["head"]) / "metrics.json") or {}
        row = _row_metrics(m, seconds=rec["search"].get("seconds"), features=feats, head=Path(rec["head"]))
        row["val_accuracy"] = m.get("val_accuracy", rec["search"].get("best_value"))
        row["search_objective"] = rec["search"].get("objective")
        return row

    def _run_search(self, c: Case, feats, key: str, memo: Path) -> dict:
        """The search of ``c`` in a study named after its key.  A study left unfinished by a killed run starts
        again (its seeded sampler would not draw what an uninterrupted run draws); a finished one is only refit."""
        import optuna

        from featx.search import default_storage, open_storage, search

        storage = default_storage(self.root)
        name = f"featx-run-{key}"
        trials = c.params["trials"]
        done = None
        try:
            st = optuna.load_study(study_name=name, storage=open_storage(storage))
            S = optuna.trial.TrialState
            # a trial failed by an interruption (fail_reason "interrupted") is not a finished one
            done = sum(t.state in (S.COMPLETE, S.PRUNED) or
                       (t.state == S.FAIL and t.user_attrs.get("fail_reason") != "interrupted") for t in st.trials)
            if done != trials or len(st.trials) != trials:
                logger.info("[%s] search: study %s was left unfinished (%d of %d trials); starting it again",
                            c.name, name, done, trials)
                optuna.delete_study(study_name=name, storage=open_storage(storage))
                done = None
        except KeyError:  # no such study yet
            pass
        res = search(feats.path, c.kind, layer=c.layer, trials=0 if done == trials else trials, storage=storage,
                     study=name, cv=c.params["cv"], sampler=c.params["sampler"], seed=self.p.data["seed"],
                     device=self.device, cache=self.root)
        rec = {"head": str(res.path), "study": name, "storage": storage, "search": res.search}
        atomic_write_json(memo, rec)
        return rec

    def _finetune(self, c: Case) -> dict:
        from featx.finetune import FinetuneOptions, finetune

        best = self._best(c)
        head = Path(best["head_dir"])
        res = self._stage(c.name, "finetune", lambda: _pair(finetune(head, FinetuneOptions(
            **c.params, seed=self.p.data["seed"]), device=self.device, cache=self.root, progress=self.progress)),
            lambda r: f"test accuracy {r.metrics['test_accuracy']:.4f}")
        m = res.metrics
        row = _row_metrics(m, seconds=m.get("seconds"), features=None, head=head, model=res.path)
        row.update({"features": best.get("features"), "layer": best.get("layer"), "head": best.get("head"),
                    "val_accuracy": m.get("best_val_accuracy"), "images_per_s": m.get("train_images_per_s"),
                    "from_case": best["case"], "from_val_accuracy": best.get("val_accuracy")})
        return row

    def _best(self, c: Case) -> dict:
        """The candidate with the best validation accuracy (running candidates that have not run yet)."""
        rows = [self.case_row(self.p.case(n)) for n in c.candidates]
        ok = [r for r in rows if r["status"] == "ok"]
        if not ok:
            raise StageFailed(f"no head to start from: {', '.join(c.candidates)} all failed")
        if len(ok) == 1:
            return ok[0]
        scored = [r for r in ok if isinstance(r.get("val_accuracy"), (int, float)) and math.isfinite(r["val_accuracy"])]
        if not scored:
            raise StageFailed(f"cannot choose among {', '.join(r['case'] for r in ok)}: none has a validation accuracy "
                              f"(give the data a val split, e.g. data.split = \"test=0.15,val=0.1\", or name one case "
                              f"in from)")
        return max(scored, key=lambda r: r["val_accuracy"])  # max keeps the first of equals: the file's order

    def case_row(self, c: Case) -> dict:
        """Run ``c`` (once) and return its row; a failure is a row with its reason."""
        if c.name in self.outcomes:
            return self.outcomes[c.name]
        row: dict[str, Any] = {"case": c.name, "status": "ok"}
        self.outcomes[c.name] = row  # placed first: a fine-tune whose candidates include... itself cannot loop
        try:
            row.update({"fit": self._fit, "search": self._search, "finetune": self._finetune}[c.stage](c))
        except _STOPS:
            row.update(status="interrupted", error=f"{c.stage}: interrupted")
            raise
        except StageFailed as e:
            row.update(status="failed", error=str(e))
        except FeatxError as e:
            row.update(status="failed", error=f"{c.stage}: {e}")
        except Exception as e:  # a head that cannot fit is this case's failure, not the run's
            row.update(status="failed", error=f"{c.stage}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if row["status"] == "failed":
            logger.warning("[%s] failed: %s", c.name, row["error"])
        return row

    def run(self, chosen: list[Case], out: Path) -> RunResult:
        self.data_path()
        logger.info("pipeline %s: %d case(s), results in %s", self.p.name, len(chosen), out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "pipeline.json", {"name": self.p.name, "file": str(self.p.file or ""),
                                                  "config": self.p.config, "cases": [c.name for c in chosen]})
        try:
            for c in chosen:
                interrupt.check("run.case")  # between cases; each stage also stops between its own units
                self.case_row(c)
                self._write(chosen, out, final=False)
        except BaseException:
            self._write(chosen, out, final=True)
            raise
        rows = self._write(chosen, out, final=True)
        res = RunResult(out, rows, dict(self.computed), dict(self.cached))
        logger.info("pipeline %s: %d ok, %d failed; computed %s; cached %s", self.p.name,
                    sum(r["status"] == "ok" for r in rows), len(res.failed), _counts(self.computed), _counts(self.cached))
        return res

    # ---------------------------------------------------------------------------------------- outputs

    def rows(self, chosen: list[Case]) -> list[dict]:
        rows = []
        for c in chosen:
            r = dict(self.outcomes.get(c.name) or {"case": c.name, "status": "not run"})
            params = c.describe()
            if c.stage == "finetune":  # the feature set's values are those of the head it started from
                src = r.get("from_case")
                params.update(self.p.case(src).variant.values() if src else
                              {"backbone": c.labels.get("backbone"), "weights": c.labels.get("weights")})
            r["_params"] = params
            ref = self.p.reference_for(c.name)
            if ref is not None:
                r["reference"] = ref.accuracy
                r["reference_source"] = ref.source
                if isinstance(r.get("test_accuracy"), (int, float)):
                    r["vs_reference"] = round(r["test_accuracy"] - ref.accuracy, 4)
            rows.append(r)
        # every parameter that differs between the cases becomes a column
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r["_params"] if k not in keys]
        varying = [k for k in keys if len({repr(r["_params"].get(k)) for r in rows}) > 1
                   and k not in ("backbone", "weights", "layer", "head")]
        for r in rows:
            ps = r.pop("_params")
            for k in ("backbone", "weights", "layer", "head"):
                r.setdefault(k, ps.get(k))
            for k in varying:
                r[k if k not in r else f"param_{k}"] = ps.get(k)
        self._columns = [*LEAD, *[k if k not in METRICS else f"param_{k}" for k in varying], *METRICS]
        return rows

    def _write(self, chosen: list[Case], out: Path, *, final: bool) -> list[dict]:
        rows = self.rows(chosen)
        cols = self._columns + sorted({k for r in rows for k in r} - set(self._columns))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in cols})
        atomic_write_bytes(out / "results.csv", buf.getvalue().encode())
        atomic_write_json(out / "results.json", {
            "pipeline": self.p.name, "file": str(self.p.file or ""), "featx_version": featx.__version__,
            "rows": rows, "computed": self.computed, "cached": self.cached,
            "references": [{"cases": list(r.cases), "accuracy": r.accuracy, "source": r.source, "note": r.note}
                           for r in self.p.references]})
        if final:
            _report(self.p, rows, out)
        return rows

    # ---------------------------------------------------------------------------------------- dry run

    def plan(self, chosen: list[Case], out: Path) -> RunPlan:
        from featx.extract import extract
        from featx.fit import fit_head

        plan = RunPlan(out, self.p)
        say = plan.lines.append
        say(f"pipeline {self.p.name} ({self.p.file}): {len(chosen)} of {len(self.p.cases)} case(s)")
        data = self.data_path()
        needed = _needed(self.p, chosen)
        for v in [v for v in self.p.variants if v in needed]:
            try:
                sp = extract(data, **self._extract_kwargs(v), plan=True)
                info = {"status": "cached" if sp.cached else "to compute", "path": sp.path, **sp.info}
                counts = ", ".join(f"{k} {n}" for k, n in info["counts"].items())
                say(f"features {_variant(v)}: {info['status']} {sp.path}")
                say(f"  data {data}: layout {info['layout']}, {len(info['classes'])} classes, "
                    f"{info['n_images']} images ({counts})")
            except FeatxError as e:
                info = {"status": f"error: {e}"}
                say(f"features {_variant(v)}: error: {e}")
            plan.features[v] = info
        heads: dict[str, Path | None] = {}
        for c in self.p.cases:
            if c.name not in needed:
                continue
            st: dict[str, str] = {}
            if c.stage in ("fit", "search"):
                fi = plan.features[c.variant]
                st["extract"] = fi["status"]
                if c.stage == "fit":
                    if fi["status"] == "cached":
                        try:
                            sp = fit_head(fi["path"], c.kind, layer=c.layer, params=dict(c.params), scale=c.scale,
                                          seed=self.p.data["seed"], device=self.device, cache=self.root, plan=True)
                            st["fit"] = "cached" if sp.cached else "to compute"
                            heads[c.name] = sp.path if sp.cached else None
                        except FeatxError as e:
                            st["fit"] = f"error: {e}"
                    else:
                        st["fit"] = "to compute"
                else:
                    rec = None
                    if fi["status"] == "cached":
                        feats = _Manifest(fi["path"], {"key": fi["key"]})
                        rec = read_json(self.root / "runs" / "searches" / f"{self._search_key(c, feats)}.json")
                    ok = isinstance(rec, dict) and (Path(rec.get("head", "")) / "metrics.json").exists()
                    st["search"] = "cached" if ok else "to compute"
                    heads[c.name] = Path(rec["head"]) if ok else None
            else:
                st["heads"] = ", ".join(c.candidates)
                st["finetune"], start = self._plan_finetune(c, heads)
                if start:
                    st["from"] = start
            plan.cases[c.name] = st
            if c in chosen:
                say(f"  {c.name}: " + "; ".join(f"{k} {v}" for k, v in st.items()))
        say(f"results would go to {out}")
        return plan

    def _plan_finetune(self, c: Case, heads: dict[str, Path | None]) -> tuple[str, str | None]:
        """(status, the case it would start from): known only when every candidate head is in the cache."""
        from featx.finetune import FinetuneOptions, finetune

        paths = [heads.get(n) for n in c.candidates]
        if not paths or any(p is None for p in paths):
            return "to compute", None
        best, best_val, best_case = None, None, None
        for n, h in zip(c.candidates, paths):  # as _best: the highest validation accuracy, the first of equals
            m = read_json(h / "metrics.json") or {}
            val = m.get("val_accuracy", (m.get("search") or {}).get("best_value"))
            if best is None or (val is not None and (best_val is None or val > best_val)):
                best, best_val, best_case = h, val, n
        try:
            sp = finetune(best, FinetuneOptions(**c.params, seed=self.p.data["seed"]), device=self.device,
                          cache=self.root, plan=True)
        except FeatxError as e:
            return f"error: {e}", best_case
        return ("cached" if sp.cached else "to compute"), best_case


@dataclass
class _Manifest:
    path: Path
    manifest: dict


def _needed(p: Pipeline, chosen: list[Case]) -> dict:
    """Names of the chosen cases and of those their fine-tunes start from, and the feature sets they use."""
    names = {c.name for c in chosen}
    for c in chosen:
        names |= set(c.candidates)
    need: dict = dict.fromkeys(names, True)
    for c in p.cases:
        if c.name in names and c.variant is not None:
            need[c.variant] = True
    return need


def _pair(res) -> tuple[Any, bool]:
    return res, bool(res.computed)


def _row_metrics(m: dict, *, seconds, features, head: Path | None = None, model: Path | None = None) -> dict:
    row = {k: m.get(k) for k in ("test_accuracy", "macro_f1", "top5_accuracy", "val_accuracy")}
    row.update({"seconds": seconds, "head_dir": str(head) if head else None, "model_dir": str(model) if model else None})
    if features is not None:
        row["features"] = str(features.path)
        row["images_per_s"] = (features.manifest.get("timings") or {}).get("images_per_s")
        row["layer"] = m.get("layer")
        row["head"] = m.get("kind")
    return row


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _counts(d: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in d.items() if n) or "nothing"


def _variant(v: Variant) -> str:
    return f"{v.backbone} {v.weights} weights, views={v.views}, normalize={v.normalize}"


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "-"


def _points(v: Any) -> str:
    return f"{100 * v:+.2f} points" if isinstance(v, (int, float)) else "-"


def _report(p: Pipeline, rows: list[dict], out: Path) -> None:
    """report.md (the table sorted by test accuracy, the best case's plots linked) and results.png."""
    from featx.plots import plot_results

    ranked = sorted(rows, key=lambda r: -(r.get("test_accuracy") if isinstance(r.get("test_accuracy"), (int, float)) else -1))
    lines = [f"# {p.name}", "", f"Pipeline file: `{p.file}`; data: `{p.data['path']}`.", "",
             "| case | status | test accuracy | val accuracy | macro-F1 | top-5 | reference | vs reference | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in ranked:
        lines.append(f"| {r['case']} | {r['status']} | {_pct(r.get('test_accuracy'))} | {_pct(r.get('val_accuracy'))} | "
                     f"{_pct(r.get('macro_f1'))} | {_pct(r.get('top5_accuracy'))} | {_pct(r.get('reference'))} | "
                     f"{_points(r.get('vs_reference'))} | "
                     f"{r.get('seconds') if r.get('seconds') is not None else '-'} |")
    best = next((r for r in ranked if r["status"] == "ok"), None)
    if best is not None:
        d = Path(best.get("model_dir") or best.get("head_dir") or out)
        lines += ["", f"Best case: **{best['case']}** ({_pct(best.get('test_accuracy'))} test accuracy), "
                      f"output `{d}`.", ""]
        for png in ("confusion.png", "curve.png", "optimization_history.png"):
            if (d / png).exists():
                lines.append(f"![{png}]({os.path.relpath(d / png, out)})")
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        lines += ["", "## Cases that did not finish", ""] + [f"- {r['case']}: {r['status']}"
                                                             f"{': ' + r['error'] if r.get('error') else ''}" for r in bad]
    if p.references:
        lines += ["", "## References", ""] + [f"- {100 * r.accuracy:.2f}% for {', '.join(r.cases)}: {r.source}"
                                              f"{' (' + r.note + ')' if r.note else ''}" for r in p.references]
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
    plot_results([(r["case"], r.get("test_accuracy") if r["status"] == "ok" else None) for r in rows],
                 [(r.accuracy, r.source.split(";")[0][:60], r.cases) for r in p.references], out / "results.png",
                 title=f"{p.name}: test accuracy per case")
