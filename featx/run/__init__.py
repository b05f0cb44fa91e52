"""``featx run``: every case of a pipeline file through the stages' public functions, ending in a results table.

This is the one package that composes stages.  It calls :func:`featx.extract.extract`, :func:`featx.fit.fit_head`,
:func:`featx.search.search` and :func:`featx.finetune.finetune` in this process and shares their outputs between
cases: one extraction serves every head of its feature set, one search every fine-tune that starts from it.
Every stage keeps its own content-addressed cache, so a second run computes nothing, a run killed at any moment
redoes only the stage it was in (extraction resumes by shard, fine-tuning by epoch; a search, whose seeded
sampler cannot resume where it stopped, starts its study again), and changing one value reruns only what
depends on it.  A case that fails is recorded with its reason and the others run on.

The results go to ``<cache>/runs/<key>/`` (``key``: the hash of the resolved pipeline and the chosen cases):
``results.csv``, ``results.json``, ``report.md``, ``results.png``, and the resolved ``pipeline.json``.

The parts: :mod:`.runner` (:func:`run_pipeline`: the cases in order, each once, and the dry run over the same
cases), :mod:`.stages` (one executor per stage, extract, fit, search and finetune, each able to plan and to run),
:mod:`.start` (:func:`choose_start`: the head a fine-tune starts from) and :mod:`.report` (results.csv,
results.json, report.md, results.png).
"""
from __future__ import annotations

from featx.run.report import LEAD, METRICS
from featx.run.runner import RunPlan, RunResult, run_pipeline
from featx.run.stages import EXECUTORS, STAGES, Planned, StageFailed
from featx.run.start import NoStart, choose_start, start_score

__all__ = ["run_pipeline", "RunResult", "RunPlan", "STAGES", "EXECUTORS", "Planned", "StageFailed", "LEAD",
           "METRICS", "choose_start", "start_score", "NoStart"]
