"""featx fit and search at scale: time, peak memory against a bound, accuracy and the path the memory plan took.

    python benchmarks/bench_scale.py --rows 15000,30000 --dims 4096,9216 --heads svm,logreg,mlp,search
    python benchmarks/bench_scale.py --rows 3000 --dims 512 --classes 20          # a quick check
    python benchmarks/bench_scale.py --rows 15000 --dims 4096 --heads logreg,svm,linearsvc --C 1e-4   # the SVM's C
    python benchmarks/bench_scale.py --limits 24G [--dims 4096,9216,25088]        # largest n per path

* Data: synthetic non-negative float32 features (a low-rank class signal, ReLU-sparse, as benchmarks/synth.py
  describes) written chunk by chunk as an HDF5 feature set (``pool5``, ``label``, ``split``: 85% train, 15% test)
  under benchmarks/_work/, once per size.
* Runs: whole processes ``featx fit svm|logreg|mlp FILE`` and ``featx search logreg FILE --trials 10``, each under
  GNU time (``/usr/bin/time -f %M``; without it, ``resource.getrusage(RUSAGE_CHILDREN)``) with a cold cache.
* Reported: wall seconds, peak RSS, its ratio to the bound ``2.5 x feature matrix + 1.5 GB`` (the matrix being
  every row of the file in float32), test accuracy, the path taken (for a search: how its trials ran, then its
  refit's path, e.g. ``memory/feature``) and the plan's predicted peak for the (refit) head.
* ``--heads linearsvc``: scikit-learn's ``StandardScaler`` + ``LinearSVC(C)`` on the same rows, a whole process
  timed the same way (``--C`` as for ``fit svm``).
* ``--limits SIZE``: no runs; for each head, path and ``d``, the largest number of train rows whose
  :func:`featx.memory.estimate` fits SIZE.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
WORK = HERE / "_work"
GNU_TIME = "/usr/bin/time"
BOUND_FACTOR, BOUND_EXTRA = 2.5, 1.5e9


def write_features(path: Path, n: int, d: int, k: int, seed: int = 0, rank: int = 128) -> Path:
    """``n`` x ``d`` synthetic float32 rows in ``k`` balanced classes, written chunk by chunk (bounded memory)."""
    import h5py

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    rank = max(1, min(rank, d))
    scales = (np.arange(1, rank + 1) ** -0.5).astype(np.float32)
    centres = rng.standard_normal((k, rank)).astype(np.float32)
    mix = (rng.standard_normal((rank, d)) / np.sqrt(rank)).astype(np.float32)
    thresh = (0.5 * rng.random(d)).astype(np.float32)
    y = np.resize(np.arange(k, dtype=np.int64), n)
    rng.shuffle(y)
    split = np.where(rng.random(n) < 0.15, "test", "train")
    tmp = path.with_suffix(".partial")
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset("pool5", shape=(n, d), dtype=np.float32, chunks=(max(1, min(n, 65536 // d + 1)), d))
        step = max(1, (64 << 20) // (4 * d))
        for a in range(0, n, step):
            b = min(n, a + step)
            codes = (centres[y[a:b]] + rng.standard_normal((b - a, rank)).astype(np.float32)) * scales
            X = codes @ mix + 0.5 * rng.standard_normal((b - a, d)).astype(np.float32)
            ds[a:b] = np.maximum(X - thresh, 0.0)
        f.create_dataset("label", data=y)
        f.create_dataset("split", data=split.astype(object), dtype=h5py.string_dtype("utf-8"))
    os.replace(tmp, path)
    return path


def timed(cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` under GNU time (or getrusage): wall seconds, peak RSS bytes, exit code, stdout's last line."""
    use_gnu = Path(GNU_TIME).exists()
    full = [GNU_TIME, "-f", "%M", *cmd] if use_gnu else cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    p = subprocess.run(full, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    err = p.stderr.strip().splitlines()
    if use_gnu and err and err[-1].strip().isdigit():
        peak = int(err.pop().strip()) * 1024
    else:  # the largest child so far: right when this run is the largest
        peak = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before) * 1024
    out = p.stdout.strip().splitlines()
    plan = [line.split("featx: ", 1)[-1] for line in err if "search in " in line or "path, predicted peak" in line]
    return {"seconds": round(wall, 2), "peak": peak, "rc": p.returncode, "last": out[-1] if out else "",
            "error": err[-1] if p.returncode and err else "", "plan": plan[0] if plan else ""}


# scikit-learn's own recipe for the same rows: StandardScaler + LinearSVC(C) (one-vs-rest), test accuracy printed
LINEARSVC = r"""
import json, sys, h5py, numpy as np
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
with h5py.File(sys.argv[1], "r") as f:
    X, y = f["pool5"][:], f["label"][:]
    split = np.asarray([s.decode() if isinstance(s, bytes) else s for s in f["split"][:]])
tr, te = split == "train", split == "test"
model = make_pipeline(StandardScaler(), LinearSVC(C=float(sys.argv[2]))).fit(X[tr], y[tr])
print(json.dumps({"test_accuracy": float(np.mean(model.predict(X[te]) == y[te]))}))
"""


def run_case(h5: Path, head: str, n: int, d: int, max_memory: str | None, trials: int,
             C: str | None = None) -> dict:
    cache = WORK / "scale-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if head == "linearsvc":
        r = timed([sys.executable, "-c", LINEARSVC, str(h5), str(1.0 if C in (None, "auto") else C)], env)
        bound = BOUND_FACTOR * n * d * 4 + BOUND_EXTRA
        row = {"head": head, "rows": n, "dim": d, "C": C, **r, "bound": int(bound),
               "ratio": round(r["peak"] / bound, 3), "path": "sklearn"}
        if r["rc"] == 0:
            row["accuracy"] = json.loads(r["last"])["test_accuracy"]
        return row
    cmd = [sys.executable, "-m", "featx"]
    cmd += ["search", "logreg", str(h5), "--trials", str(trials)] if head == "search" else ["fit", head, str(h5)]
    cmd += ["--cache", str(cache)] + (["--max-memory", max_memory] if max_memory else [])
    cmd += ["--C", str(C)] if C is not None and head == "svm" else []
    r = timed(cmd, env)
    bound = BOUND_FACTOR * n * d * 4 + BOUND_EXTRA
    row = {"head": head, "rows": n, "dim": d, "C": C, **r, "bound": int(bound), "ratio": round(r["peak"] / bound, 3)}
    if r["rc"] == 0:
        out = Path(r["last"])
        metrics = json.loads((out / "metrics.json").read_text())
        meta = json.loads((out / "featx-head.json").read_text())
        # a search's trials may run another way than its refit: "search in memory (...)" or "search in stream"
        path = meta.get("fit", {}).get("path")
        if head == "search" and r["plan"].startswith("search in "):
            path = f"{r['plan'].split()[2]}/{path}"
        row.update(accuracy=metrics["test_accuracy"], path=path,
                   predicted=meta.get("fit", {}).get("predicted_peak_bytes"),
                   chosen_C=metrics.get("chosen_C", {}).get("C"))
    shutil.rmtree(cache, ignore_errors=True)
    return row


def limits(size: str, dims: list[int], k: int) -> list[dict]:
    """The largest train-row count per head, path and d whose estimate fits ``size`` (the SVM with its default
    ``C="auto"``, which holds a copy of the rows it fits while choosing C, and with a given C)."""
    from featx import memory

    budget = memory.parse_size(size)
    out = []
    for head, paths in memory.PATHS.items():
        for path in paths:
            for choose_c in ((True, False) if head.startswith("svm") and path != "stream" else (False,)):
                def fits(n: int, d: int, head: str = head, path: str = path, choose_c: bool = choose_c) -> bool:
                    return memory.estimate(head, path, n, d, k, choose_c=choose_c) <= budget

                for d in dims:
                    lo, hi = 0, 1
                    while hi <= 1 << 40 and fits(hi, d):
                        lo, hi = hi, hi * 2
                    while hi - lo > 1:
                        mid = (lo + hi) // 2
                        lo, hi = (mid, hi) if fits(mid, d) else (lo, mid)
                    out.append({"head": head + (" (C auto)" if choose_c else ""), "path": path, "dim": d,
                                "max_rows": lo if hi <= 1 << 40 else None})
    return out


def _c_text(row: dict) -> str:
    """The C a row used: the one ``auto`` chose, the one given, or ``-`` (a head without C)."""
    C = row.get("chosen_C") if row.get("chosen_C") is not None else row.get("C")
    try:
        return f"{float(C):.3g}"
    except (TypeError, ValueError):
        return str(C or "-")


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="15000,30000,60000,100000", help="rows of the feature sets (all splits)")
    ap.add_argument("--dims", default="4096,9216,25088", help="features per row")
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--heads", default="svm,logreg,mlp,search",
                    help="svm, logreg, mlp, search (10-trial logreg), linearsvc (scikit-learn's StandardScaler + "
                         "LinearSVC, for comparison)")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--C", default=None, help="C of fit svm (default auto) and linearsvc (default 1.0): a number, "
                                             "or auto for fit svm")
    ap.add_argument("--max-memory", default=None, help="passed to every run (default: featx's own)")
    ap.add_argument("--limits", default=None, metavar="SIZE", help="print the largest n per path for SIZE; no runs")
    ap.add_argument("--out", default=str(WORK / "bench_scale.json"))
    a = ap.parse_args()
    if a.limits:
        rows = limits(a.limits, _ints(a.dims), a.classes)
        print(f"largest train rows whose estimate fits {a.limits} ({a.classes} classes)")
        print(f"{'head':16} {'path':8} " + " ".join(f"{'d=' + str(d):>10}" for d in _ints(a.dims)))
        for head_path in dict.fromkeys((r["head"], r["path"]) for r in rows):
            cells = [r["max_rows"] for r in rows if (r["head"], r["path"]) == head_path]
            print(f"{head_path[0]:16} {head_path[1]:8} " + " ".join(f"{'any' if c is None else c:>10}" for c in cells))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{'head':7} {'rows':>7} {'dim':>6} {'path':14} {'s':>8} {'peak GB':>8} {'bound GB':>8} {'ratio':>6} "
          f"{'acc':>6} {'pred GB':>8} {'C':>8}")
    for n in _ints(a.rows):
        for d in _ints(a.dims):
            h5 = write_features(WORK / f"scale-{n}x{d}x{a.classes}.h5", n, d, a.classes)
            for head in a.heads.split(","):
                r = run_case(h5, head, n, d, a.max_memory, a.trials, a.C)
                results.append(r)
                pred = r.get("predicted")
                print(f"{head:7} {n:>7} {d:>6} {str(r.get('path') or '-'):14} {r['seconds']:>8.1f} "
                      f"{r['peak'] / 1e9:>8.2f} {r['bound'] / 1e9:>8.2f} {r['ratio']:>6.2f} "
                      f"{r.get('accuracy', float('nan')):>6.3f} {(pred or 0) / 1e9:>8.2f} {_c_text(r):>8}"
                      + (f"  rc={r['rc']} {r['error']}" if r["rc"] else ""), flush=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
