"""The stages of a pipeline's cases, each an executor that can plan it (``--dry-run``: where its output is and
whether it is already in the cache, computing nothing) and run it.  :data:`EXECUTORS` maps each stage's name to its
executor; the real run and the dry run both dispatch through it, and each executor calls its stage's public
function (:func:`featx.extract.extract`, :func:`featx.fit.fit_head`, :func:`featx.search.search`,
:func:`featx.fewshot.fewshot`, :func:`featx.finetune.finetune`) from one place, with ``plan=True`` for the dry run.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import featx
from featx.cache import StagePlan, atomic_write_json, hash_key, read_json
from featx.errors import FeatxError
from featx.pipeline import Case, Variant
from featx.run.start import NoStart, choose_start, start_score

if TYPE_CHECKING:
    from featx.extract import ExtractResult
    from featx.run.runner import Runner

__all__ = ["STAGES", "EXECUTORS", "Stage", "Planned", "StageFailed", "row_metrics", "fewshot_metrics"]

logger = logging.getLogger(__name__)


class StageFailed(Exception):
    """A stage of a case could not run; the message is the reason recorded in the results."""


@dataclass
class Planned:
    """What the dry run says of a stage: ``cached``, ``to compute`` or ``error: REASON``; where its output is (or
    would be); what the stage learnt on the way (extraction: the feature set's key, the data's layout, classes and
    split counts); and, for a case, its line of the dry run (each of its stages with its status)."""

    status: str
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    shown: dict[str, str] = field(default_factory=dict)

    @property
    def cached(self) -> bool:
        return self.status == "cached"

    @classmethod
    def of(cls, plan: Any) -> Planned:
        """From what a stage's function returned when called with ``plan=True``."""
        assert isinstance(plan, StagePlan), type(plan)
        return cls("cached" if plan.cached else "to compute", plan.path, dict(plan.info))


T = TypeVar("T", Variant, Case)


class Stage(ABC, Generic[T]):
    """One stage: ``plan`` says what running it would do, ``run`` does it (through :meth:`Runner.timed`)."""

    name: ClassVar[str]

    @abstractmethod
    def plan(self, r: Runner, of: T) -> Planned:
        """The dry run's view of this stage for ``of``; computes nothing."""

    @abstractmethod
    def run(self, r: Runner, of: T) -> Any:
        """Run the stage for ``of``: a feature set's extraction result, or a case's results row."""


def _head(c: Case) -> tuple[Variant, str, str]:
    """The feature set, head kind and layer of a fit, search or few-shot case (which always has all three)."""
    assert c.variant is not None and c.kind is not None and c.layer is not None, c
    return c.variant, c.kind, c.layer


def row_metrics(m: dict, *, seconds: Any, features: ExtractResult | None, head: Path | None = None,
                model: Path | None = None) -> dict[str, Any]:
    """The results row's columns from a head's (or a model's) ``metrics.json``."""
    row = {k: m.get(k) for k in ("test_accuracy", "macro_f1", "top5_accuracy")}
    row["val_accuracy"] = start_score(m)  # the score a fine-tune's start is chosen by
    row.update({"seconds": seconds, "head_dir": str(head) if head else None,
                "model_dir": str(model) if model else None})
    if features is not None:
        row["features"] = str(features.path)
        row["images_per_s"] = (features.manifest.get("timings") or {}).get("images_per_s")
        row["layer"] = m.get("layer")
        row["head"] = m.get("kind")
    return row


# ============================================================================================== extract

class Extract(Stage[Variant]):
    """A feature set: every layer of the pipeline from one pass over the images, shared by all its cases."""

    name = "extract"

    def call(self, r: Runner, v: Variant, **extra: Any) -> Any:
        from featx.extract import extract

        p = r.p
        return extract(r.data_path(), layers=list(p.layers), backbone=v.backbone, weights=v.weights,
                       split=p.data["split"], seed=p.data["seed"], views=v.views, normalize=v.normalize,
                       batch_size=p.extract["batch_size"], amp=p.extract["amp"], device=r.device, cache=r.root,
                       layout=None if p.data["layout"] in ("auto", "") else p.data["layout"], **extra)

    def plan(self, r: Runner, of: Variant) -> Planned:
        try:
            return Planned.of(self.call(r, of, plan=True))
        except FeatxError as e:
            return Planned(f"error: {e}")

    def run(self, r: Runner, of: Variant) -> ExtractResult:
        from featx.extract import ExtractResult

        def go() -> tuple[ExtractResult, bool]:
            res = self.call(r, of, progress=r.progress)
            assert isinstance(res, ExtractResult)
            return res, bool(res.computed)

        return r.timed("extract", go,
                       lambda res: f"{res.manifest.get('n_rows', 0)} rows {res.manifest.get('counts', {})}")


# ============================================================================================== fit

class OnFeatures(Stage[Case]):
    """A stage computed from one cached feature set of its case (a fitted head, a few-shot curve): planned from
    where that set is, run once it is there."""

    @abstractmethod
    def call(self, r: Runner, c: Case, features: Path, **extra: Any) -> Any:
        """The stage's public function on ``features`` (``plan=True`` in ``extra`` for the dry run)."""

    @abstractmethod
    def summary(self, res: Any) -> str:
        """What the log line says of a result."""

    def plan(self, r: Runner, of: Case) -> Planned:
        fi = r.planned_features(_head(of)[0])
        got = Planned("to compute")
        if fi.cached and fi.path is not None:
            try:
                got = Planned.of(self.call(r, of, fi.path, plan=True))
            except FeatxError as e:
                got = Planned(f"error: {e}")
        got.shown = {"extract": fi.status, self.name: got.status}
        return got

    def computed(self, r: Runner, of: Case) -> tuple[Any, ExtractResult]:
        """The stage's result on the case's features (computed now or found cached), and those features."""
        feats = r.features(_head(of)[0])

        def go() -> tuple[Any, bool]:
            res = self.call(r, of, feats.path)
            return res, bool(res.computed)

        return r.timed(self.name, go, self.summary), feats


class Fit(OnFeatures):
    """A head fitted with the case's parameters on one layer of its feature set."""

    name = "fit"

    def call(self, r: Runner, c: Case, features: Path, **extra: Any) -> Any:
        from featx.fit import fit_head

        _, kind, layer = _head(c)
        return fit_head(features, kind, layer=layer, params=dict(c.params), scale=c.scale, seed=r.p.data["seed"],
                        device=r.device, cache=r.root, **extra)

    def summary(self, res: Any) -> str:
        return f"test accuracy {res.metrics['test_accuracy']:.4f}"

    def run(self, r: Runner, of: Case) -> dict[str, Any]:
        res, feats = self.computed(r, of)
        return row_metrics(res.metrics, seconds=res.metrics.get("fit_seconds"), features=feats, head=res.path)


# ============================================================================================== search

class Search(Stage[Case]):
    """An Optuna search of a head on one layer, in a study named after everything that defines it, then the best
    trial refit; ``<cache>/runs/searches/<key>.json`` records which head it produced."""

    name = "search"

    def key(self, r: Runner, c: Case, features_key: Any) -> str:
        return hash_key({"features": features_key, "kind": c.kind, "layer": c.layer, "seed": r.p.data["seed"],
                         **c.params, "featx": featx.__version__.split(".")[0]})

    def recorded(self, r: Runner, key: str) -> dict | None:
        """The record of the finished search ``key`` when its head is still in the cache."""
        rec = read_json(r.root / "runs" / "searches" / f"{key}.json")
        if isinstance(rec, dict) and isinstance(read_json(Path(rec.get("head", "")) / "metrics.json"), dict):
            return rec
        return None

    def plan(self, r: Runner, of: Case) -> Planned:
        fi = r.planned_features(_head(of)[0])
        rec = self.recorded(r, self.key(r, of, fi.info.get("key"))) if fi.cached else None
        got = Planned("cached", Path(rec["head"])) if rec else Planned("to compute")
        got.shown = {"extract": fi.status, "search": got.status}
        return got

    def run(self, r: Runner, of: Case) -> dict[str, Any]:
        feats = r.features(_head(of)[0])
        key = self.key(r, of, feats.manifest.get("key"))

        def go() -> tuple[dict, bool]:
            rec = self.recorded(r, key)
            return (rec, False) if rec is not None else (self.search(r, of, feats.path, key), True)

        rec = r.timed("search", go, lambda rec: f"best validation {rec['search']['best_value']:.4f}")
        m = read_json(Path(rec["head"]) / "metrics.json") or {}
        row = row_metrics(m, seconds=rec["search"].get("seconds"), features=feats, head=Path(rec["head"]))
        row["search_objective"] = rec["search"].get("objective")
        return row

    def search(self, r: Runner, c: Case, features: Path, key: str) -> dict:
        """The search of ``c`` in the study ``featx-run-<key>``.  A study left unfinished by a killed run starts
        again (its seeded sampler would not draw what an uninterrupted run draws); a finished one is only refit."""
        from featx.search import default_storage, delete_study, finished_trials, search

        _, kind, layer = _head(c)
        storage, name, trials = default_storage(r.root), f"featx-run-{key}", c.params["trials"]
        progress = finished_trials(storage, name)
        if progress is not None and progress != (trials, trials):
            logger.info("[%s] search: study %s was left unfinished (%d of %d trials); starting it again",
                        c.name, name, progress[0], trials)
            delete_study(storage, name)
            progress = None
        res = search(features, kind, layer=layer, trials=0 if progress else trials, storage=storage, study=name,
                     cv=c.params["cv"], sampler=c.params["sampler"], seed=r.p.data["seed"], device=r.device,
                     cache=r.root)
        rec = {"head": str(res.path), "study": name, "storage": storage, "search": res.search}
        atomic_write_json(r.root / "runs" / "searches" / f"{key}.json", rec)
        return rec


# ============================================================================================== fewshot

def fewshot_metrics(summary: dict, *, features: ExtractResult, path: Path) -> dict[str, Any]:
    """A few-shot curve's results row: ``test_accuracy`` is the mean over the draws at the largest k,
    ``fewshot_k`` (the curve's end, what the case is ranked by), ``accuracy_kN`` and ``accuracy_std_kN`` every
    point of the curve, and ``full_accuracy`` the same head on every train row."""
    per_k = summary["per_k"]
    last = per_k[-1]
    row: dict[str, Any] = {"test_accuracy": last["accuracy_mean"], "macro_f1": None, "top5_accuracy": None,
                           "val_accuracy": None, "seconds": (summary.get("timings") or {}).get("total_s"),
                           "features": str(features.path), "layer": summary.get("layer"), "head": summary.get("head"),
                           "images_per_s": (features.manifest.get("timings") or {}).get("images_per_s"),
                           "fewshot_k": last["k"], "full_accuracy": summary["full"]["accuracy"],
                           "fewshot_dir": str(path)}
    for s in per_k:
        row[f"accuracy_k{s['k']}"] = s["accuracy_mean"]
        row[f"accuracy_std_k{s['k']}"] = s["accuracy_std"]
    return row


class Fewshot(OnFeatures):
    """A few-shot learning curve of a head on one layer: for each k, the case's draws of k train images per class,
    each fitted and tested on the whole test split.  Its draws are cached one by one, so a stopped run continues
    the curve where it stopped and ends with the same numbers."""

    name = "fewshot"

    def call(self, r: Runner, c: Case, features: Path, **extra: Any) -> Any:
        from featx.fewshot import fewshot

        _, kind, layer = _head(c)
        params = dict(c.params)
        shots, draws = list(params.pop("shots")), int(params.pop("draws"))
        return fewshot(features, shots=shots, draws=draws, head=kind, params=params, layer=layer, scale=c.scale,
                       seed=r.p.data["seed"], device=r.device, cache=r.root, **extra)

    def summary(self, res: Any) -> str:
        return ", ".join(f"k={s['k']} {s['accuracy_mean']:.4f}" for s in res.summary["per_k"])

    def run(self, r: Runner, of: Case) -> dict[str, Any]:
        res, feats = self.computed(r, of)
        return fewshot_metrics(res.summary, features=feats, path=res.path)


# ============================================================================================== finetune

class Finetune(Stage[Case]):
    """The network trained end to end from the head :func:`~featx.run.start.choose_start` picks among the case's
    candidates (the same rule in the dry run and the real run)."""

    name = "finetune"

    def call(self, r: Runner, c: Case, head: Path, **extra: Any) -> Any:
        from featx.finetune import FinetuneOptions, finetune

        options = FinetuneOptions(**c.params, seed=r.p.data["seed"])
        return finetune(head, options, device=r.device, cache=r.root, **extra)

    def plan(self, r: Runner, of: Case) -> Planned:
        shown = {"heads": ", ".join(of.candidates)}
        planned = [r.plan_case(r.p.case(n)) for n in of.candidates]
        heads = {n: h.path for n, h in zip(of.candidates, planned) if h.cached and h.path is not None}
        if not heads or len(heads) < len(planned):
            got = Planned("to compute")  # the start is known once every candidate's head is in the cache
            got.shown = {**shown, "finetune": got.status}
            return got
        try:
            start = choose_start([(n, start_score(read_json(h / "metrics.json") or {})) for n, h in heads.items()])
        except NoStart as e:
            return Planned(f"error: {e}", shown={**shown, "finetune": f"error: {e}"})
        try:
            got = Planned.of(self.call(r, of, heads[start], plan=True))
        except FeatxError as e:
            got = Planned(f"error: {e}")
        got.info["from"] = start
        got.shown = {**shown, "finetune": got.status, "from": start}
        return got

    def run(self, r: Runner, of: Case) -> dict[str, Any]:
        from featx.finetune import FinetuneResult

        start = self.start(r, of)
        head = Path(start["head_dir"])

        def go() -> tuple[FinetuneResult, bool]:
            res = self.call(r, of, head, progress=r.progress)
            assert isinstance(res, FinetuneResult)
            return res, bool(res.computed)

        res = r.timed("finetune", go, lambda res: f"test accuracy {res.metrics['test_accuracy']:.4f}")
        m = res.metrics
        row = row_metrics(m, seconds=m.get("seconds"), features=None, head=head, model=res.path)
        row.update({"features": start.get("features"), "layer": start.get("layer"), "head": start.get("head"),
                    "val_accuracy": m.get("best_val_accuracy"), "images_per_s": m.get("train_images_per_s"),
                    "from_case": start["case"], "from_val_accuracy": start.get("val_accuracy")})
        return row

    def start(self, r: Runner, c: Case) -> dict[str, Any]:
        """The row of the candidate to start from (running the candidates that have not run yet)."""
        rows = [r.case_row(r.p.case(n)) for n in c.candidates]
        ok = [row for row in rows if row["status"] == "ok"]
        try:
            chosen = choose_start([(row["case"], row.get("val_accuracy")) for row in ok],
                                  failed=[row["case"] for row in rows if row["status"] != "ok"])
        except NoStart as e:
            raise StageFailed(str(e)) from None
        return next(row for row in ok if row["case"] == chosen)


EXECUTORS: dict[str, Stage[Any]] = {s.name: s for s in (Extract(), Fit(), Search(), Fewshot(), Finetune())}
STAGES = tuple(EXECUTORS)
