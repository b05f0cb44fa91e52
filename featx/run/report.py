"""The results of a pipeline run, from the rows of its cases: ``results.csv`` and ``results.json`` (rewritten after
every case, so that a killed run leaves the finished rows; each finished few-shot curve's CSV and plot are copied
under ``fewshot/`` then), ``report.md``, ``results.png`` and, with few-shot curves, ``fewshot.png`` (at the end)."""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import featx
from featx.cache import atomic_write_bytes, atomic_write_json
from featx.pipeline import Case, Pipeline

__all__ = ["LEAD", "METRICS", "table", "write_results", "write_report"]

# results.csv's columns, in this order; the parameters that differ between cases come after `status`
LEAD = ("case", "status")
METRICS = ("backbone", "weights", "layer", "head", "test_accuracy", "macro_f1", "top5_accuracy", "val_accuracy",
           "seconds", "images_per_s", "reference", "vs_reference", "reference_source", "features", "head_dir",
           "model_dir", "error")
NAMED = ("backbone", "weights", "layer", "head")  # columns of their own, never parameter columns


def _row(p: Pipeline, c: Case, outcome: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """A case's row (``not run`` when it has none yet) with its reference, and its parameters."""
    r = dict(outcome or {"case": c.name, "status": "not run"})
    params = c.describe()
    if c.stage == "finetune":  # the feature set's values are those of the head it started from
        src = p.case(r["from_case"]).variant if r.get("from_case") else None
        params.update(src.values() if src is not None else
                      {"backbone": c.labels.get("backbone"), "weights": c.labels.get("weights")})
    ref = p.reference_for(c.name)
    if ref is not None:
        r["reference"] = ref.accuracy
        r["reference_source"] = ref.source
        if isinstance(r.get("test_accuracy"), (int, float)):
            r["vs_reference"] = round(r["test_accuracy"] - ref.accuracy, 4)
    return r, params


def table(p: Pipeline, chosen: list[Case], outcomes: Mapping[str, Mapping[str, Any]]) -> tuple[list[dict], list[str]]:
    """The rows of the chosen cases, in their order, and results.csv's leading columns: every parameter that
    differs between the cases becomes a column (``param_NAME`` when a metric has that name)."""
    pairs = [_row(p, c, outcomes.get(c.name)) for c in chosen]
    keys: list[str] = []
    for _, params in pairs:
        keys += [k for k in params if k not in keys]
    varying = [k for k in keys if len({repr(ps.get(k)) for _, ps in pairs}) > 1 and k not in NAMED]
    rows = []
    for r, ps in pairs:
        for k in NAMED:
            r.setdefault(k, ps.get(k))
        for k in varying:
            r[k if k not in r else f"param_{k}"] = ps.get(k)
        rows.append(r)
    return rows, [*LEAD, *[k if k not in METRICS else f"param_{k}" for k in varying], *METRICS, *_curve_columns(rows)]


def _curve_shots(rows: list[dict]) -> list[int]:
    """The k of every few-shot curve among the rows, in order."""
    return sorted({int(k[len("accuracy_k"):]) for r in rows for k in r if k.startswith("accuracy_k")})


def _curve_columns(rows: list[dict]) -> list[str]:
    """results.csv's few-shot columns (when a row has a curve): the k its test accuracy is at, the mean and the
    standard deviation over the draws at every k, the head on every train row, the curve's directory."""
    ks = _curve_shots(rows)
    if not ks:
        return []
    return ["fewshot_k", *[f"accuracy_k{k}" for k in ks], *[f"accuracy_std_k{k}" for k in ks], "full_accuracy",
            "fewshot_dir"]


def _copy_curves(out: Path, rows: list[dict]) -> None:
    """Each finished curve's CSV and plot, as ``fewshot/<case>.csv`` and ``fewshot/<case>.png`` of the run."""
    for r in rows:
        src = Path(r["fewshot_dir"]) if r.get("status") == "ok" and r.get("fewshot_dir") else None
        if src is None:
            continue
        for name, suffix in (("fewshot.csv", ".csv"), ("fewshot.png", ".png")):
            dst = out / "fewshot" / f"{r['case']}{suffix}"
            if (src / name).is_file() and not dst.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(dst, (src / name).read_bytes())


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def write_results(out: Path, p: Pipeline, rows: list[dict], columns: list[str], *, computed: dict[str, int],
                  cached: dict[str, int]) -> None:
    """results.csv (the columns, then any other key of a row, sorted), results.json (the rows, the stage
    counters and the references) and each finished few-shot curve's CSV and plot under ``fewshot/``."""
    cols = columns + sorted({k for r in rows for k in r} - set(columns))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r.get(k)) for k in cols})
    atomic_write_bytes(out / "results.csv", buf.getvalue().encode())
    _copy_curves(out, rows)
    atomic_write_json(out / "results.json", {
        "pipeline": p.name, "file": str(p.file or ""), "featx_version": featx.__version__,
        "rows": rows, "computed": computed, "cached": cached,
        "references": [{"cases": list(r.cases), "accuracy": r.accuracy, "source": r.source, "note": r.note}
                       for r in p.references]})


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "-"


def _points(v: Any) -> str:
    return f"{100 * v:+.2f} points" if isinstance(v, (int, float)) else "-"


def _accuracy(r: Mapping[str, Any]) -> float:
    v = r.get("test_accuracy")
    return float(v) if isinstance(v, (int, float)) else -1.0


def _markdown(p: Pipeline, rows: list[dict], out: Path) -> list[str]:
    ranked = sorted(rows, key=lambda r: -_accuracy(r))
    lines = [f"# {p.name}", "", f"Pipeline file: `{p.file}`; data: `{p.data['path']}`.", "",
             "| case | status | test accuracy | val accuracy | macro-F1 | top-5 | reference | vs reference | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in ranked:
        cells = [r["case"], r["status"], *(_pct(r.get(k)) for k in ("test_accuracy", "val_accuracy", "macro_f1",
                                                                     "top5_accuracy", "reference")),
                 _points(r.get("vs_reference")), r.get("seconds") if r.get("seconds") is not None else "-"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    best = next((r for r in ranked if r["status"] == "ok"), None)
    if best is not None:
        d = Path(best.get("model_dir") or best.get("head_dir") or out)
        lines += ["", f"Best case: **{best['case']}** ({_pct(best.get('test_accuracy'))} test accuracy), "
                      f"output `{d}`.", ""]
        for png in ("confusion.png", "curve.png", "optimization_history.png"):
            if (d / png).exists():
                lines.append(f"![{png}]({os.path.relpath(d / png, out)})")
    lines += _curve_lines(rows, out)
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        lines += ["", "## Cases that did not finish", ""] + [
            f"- {r['case']}: {r['status']}{': ' + r['error'] if r.get('error') else ''}" for r in bad]
    if p.references:
        lines += ["", "## References", ""] + [f"- {100 * r.accuracy:.2f}% for {', '.join(r.cases)}: {r.source}"
                                              f"{' (' + r.note + ')' if r.note else ''}" for r in p.references]
    return lines


def _curve_lines(rows: list[dict], out: Path) -> list[str]:
    """report.md's few-shot section: per curve, the mean test accuracy (and standard deviation) over the draws at
    every k, and the head on every train row."""
    curves = [r for r in rows if r["status"] == "ok" and r.get("fewshot_dir")]
    ks = _curve_shots(curves)
    if not curves:
        return []
    lines = ["", "## Few-shot curves", "",
             "Test accuracy of a head fitted on k train images per class: the mean over the draws, +- their "
             "standard deviation; the case's test accuracy above is the mean at its largest k.", "",
             "| case | " + " | ".join(f"k={k}" for k in ks) + " | all train rows |",
             "|---|" + "---|" * (len(ks) + 1)]
    for r in sorted(curves, key=lambda r: -_accuracy(r)):
        cells = [f"{_pct(r[f'accuracy_k{k}'])} +- {100 * r[f'accuracy_std_k{k}']:.2f}"
                 if isinstance(r.get(f"accuracy_k{k}"), (int, float)) else "-" for k in ks]
        lines.append(f"| {r['case']} | " + " | ".join(cells) + f" | {_pct(r.get('full_accuracy'))} |")
    if (out / "fewshot.png").exists():
        lines += ["", "![fewshot.png](fewshot.png)"]
    return lines


def write_report(p: Pipeline, rows: list[dict], out: Path) -> None:
    """report.md (the table sorted by test accuracy, the best case's plots linked, the few-shot curves, the cases
    that did not finish, the references), results.png (test accuracy per case, each reference a dashed line) and,
    when the run has few-shot curves, fewshot.png (every curve in one plot)."""
    from featx.curves import plot_curves
    from featx.plots import plot_results

    curves = [(r["case"], [(k, r[f"accuracy_k{k}"], r[f"accuracy_std_k{k}"]) for k in _curve_shots([r])],
               r.get("full_accuracy")) for r in rows if r["status"] == "ok" and r.get("fewshot_dir")]
    if curves:
        plot_curves(curves, out / "fewshot.png", title=f"{p.name}: few-shot test accuracy per case")
    atomic_write_bytes(out / "report.md", ("\n".join(_markdown(p, rows, out)) + "\n").encode())
    plot_results([(r["case"], r.get("test_accuracy") if r["status"] == "ok" else None) for r in rows],
                 [(r.accuracy, r.source.split(";")[0][:60], r.cases) for r in p.references], out / "results.png",
                 title=f"{p.name}: test accuracy per case")
