"""featx's start-up: each command's fixed cost, and a C sweep of `featx fit svm` against scikit-learn, as whole
processes.

    python benchmarks/bench_startup.py [--repeats 3] [--previous DIR] [--skip-fixed] [--skip-sweep] [--n 4000]

* Fixed cost: `featx --help`, and `fit svm|logreg|mlp`, `evaluate`, `search svm` on a tiny feature file (120 x 72
  rows, 3 classes) with a fresh cache each time, so that what is timed is python's start, the imports and the
  command's own set-up. Median of ``--repeats``. ``--previous DIR`` also times another checkout (e.g. the code
  before this work, from ``git archive``), alternating with this one, run from its own root.
* Sweep: `featx fit svm FILE --C C` for C = 1e-4, 1e-3, 1e-2, 0.1, 1 on N x 9,216 pool5-like rows
  in 20 classes (benchmarks/synth.py, 85% train), each a whole process with a fresh cache, against
  scikit-learn's StandardScaler + LinearSVC(C) (defaults), the fit alone with the rows already in memory.  The
  two sides alternate C by C so that both see the same load.  The total line says whether featx's test accuracy
  stays within 1 point of scikit-learn's at every C.

Besides wall-clock seconds, the sweep reports CPU seconds (user + system) of both sides: on a machine shared with
other work the wall clock of a multi-threaded BLAS suffers far more than a single-threaded solver's (threads wait
for cores), and CPU seconds tell what each side costs when it has the machine to itself.

Results are also written to benchmarks/_work/startup.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
WORK = HERE / "_work"
SWEEP = (1e-4, 1e-3, 1e-2, 0.1, 1.0)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def featx(args: list[str], *, root: Path = ROOT, cpu: list[float] | None = None) -> tuple[float, str]:
    """Run ``python -m featx ARGS`` from ``root`` (its code first on the path); seconds and the last stdout line.

    ``cpu``, when given, receives the process's CPU seconds (user + system).
    """
    env = {**os.environ, "PYTHONPATH": str(root)}
    c0 = _children_cpu()
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "featx", *args], capture_output=True, text=True, cwd=root, env=env)
    dt = time.perf_counter() - t
    if cpu is not None:
        cpu.append(_children_cpu() - c0)
    if p.returncode != 0:
        raise RuntimeError(f"featx {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    lines = p.stdout.strip().splitlines()
    return dt, lines[-1] if lines else ""


def fixed_costs(repeats: int, previous: Path | None) -> dict:
    from synth import make_pool5_like, write_h5

    WORK.mkdir(exist_ok=True)
    tiny = WORK / "tiny-120x72.h5"
    if not tiny.exists():
        X, y = make_pool5_like(n=120, d=72, k=3, seed=0, class_sep=2.0)
        write_h5(tiny, X, y, seed=0)
    with tempfile.TemporaryDirectory() as c:
        _, head = featx(["fit", "svm", str(tiny), "--cache", c, "-q"])
        # A head made by this checkout, copied so that each evaluate gets a fresh cache but the same head.
        head_dir = Path(tempfile.mkdtemp(prefix="featx-head-"))
        subprocess.run(["cp", "-r", head, str(head_dir / "h")], check=True)
    commands = {
        "featx --help": ["--help"],
        "fit svm": ["fit", "svm", str(tiny)],
        "fit logreg": ["fit", "logreg", str(tiny)],
        "fit mlp (1 epoch)": ["fit", "mlp", str(tiny), "--epochs", "1", "--hidden", "8"],
        "evaluate": ["evaluate", str(head_dir / "h"), str(tiny)],
        "search svm (1 trial)": ["search", "svm", str(tiny), "--trials", "1", "--cv", "2"],
    }
    sides = {"this": ROOT, **({"previous": previous} if previous else {})}
    times: dict[str, dict[str, list[float]]] = {name: {s: [] for s in sides} for name in commands}
    cpus: dict[str, dict[str, list[float]]] = {name: {s: [] for s in sides} for name in commands}
    for r in range(repeats):
        for name, args in commands.items():
            for side, root in sides.items():
                with tempfile.TemporaryDirectory() as c:
                    extra = [] if args == ["--help"] else ["--cache", c, "-q"]
                    dt, _ = featx(args + extra, root=root, cpu=cpus[name][side])
                times[name][side].append(dt)
        print(f"fixed costs: repeat {r + 1}/{repeats} done", file=sys.stderr)
    out = {}
    print(f"\n{'command':<24} " + " ".join(f"{s + ' wall s':>16} {s + ' CPU s':>16}" for s in sides)
          + ("   previous/this (wall, CPU)" if previous else "") + "   (medians)")
    for name in commands:
        med = {s: statistics.median(v) for s, v in times[name].items()}
        cmed = {s: statistics.median(v) for s, v in cpus[name].items()}
        out[name] = {s: {"median": med[s], "all": times[name][s], "cpu_median": cmed[s], "cpu_all": cpus[name][s]}
                     for s in sides}
        line = f"{name:<24} " + " ".join(f"{med[s]:>16.2f} {cmed[s]:>16.2f}" for s in sides)
        if previous:
            line += f"   {med['previous'] / med['this']:.2f}x, {cmed['previous'] / cmed['this']:.2f}x"
        print(line)
    return out


def sweep(n: int) -> dict:
    from synth import make_pool5_like, write_h5

    WORK.mkdir(exist_ok=True)
    path = WORK / f"pool5-like-{n}.h5"
    X, y = make_pool5_like(n=n, d=9216, k=20, seed=0)
    if not path.exists():
        write_h5(path, X, y, seed=0)
    import h5py

    with h5py.File(path, "r") as f:
        split = f["split"].asstr()[()]
    tr, te = split == "train", split == "test"
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    rows = []
    for C in SWEEP:
        Xtr = X[tr]
        c = time.process_time()
        t = time.perf_counter()
        sc = StandardScaler().fit(Xtr)
        clf = LinearSVC(C=C).fit(sc.transform(Xtr), y[tr])
        t_sk = time.perf_counter() - t
        cpu_sk = time.process_time() - c
        acc_sk = float(np.mean(clf.predict(sc.transform(X[te])) == y[te]))
        cpu: list[float] = []
        with tempfile.TemporaryDirectory() as cache:
            t_fx, head = featx(["fit", "svm", str(path), "--C", repr(C), "--cache", cache, "--quiet"], cpu=cpu)
            m = json.loads((Path(head) / "metrics.json").read_text())
        rows.append({"C": C, "sklearn_s": t_sk, "sklearn_cpu_s": cpu_sk, "sklearn_acc": acc_sk, "featx_s": t_fx,
                     "featx_cpu_s": cpu[0], "featx_fit_s": m["fit_seconds"], "featx_acc": m["test_accuracy"]})
        r = rows[-1]
        print(f"C={C:g}: scikit-learn {t_sk:.1f} s, {cpu_sk:.1f} s CPU ({acc_sk:.4f}); featx process {t_fx:.1f} s, "
              f"{cpu[0]:.1f} s CPU (fit {r['featx_fit_s']:.1f} s) ({r['featx_acc']:.4f})", file=sys.stderr)
    tot_sk = sum(r["sklearn_s"] for r in rows)
    tot_fx = sum(r["featx_s"] for r in rows)
    cpu_sk = sum(r["sklearn_cpu_s"] for r in rows)
    cpu_fx = sum(r["featx_cpu_s"] for r in rows)
    print(f"\ndata: {n} x 9216 pool5-like rows, 20 classes, {int(tr.sum())} train / {int(te.sum())} test; "
          f"cores: {os.cpu_count()}")
    print(f"{'C':>8} {'sklearn s':>10} {'featx s':>9} {'(fit s)':>8} {'ratio':>7} {'CPU ratio':>10} "
          f"{'acc sklearn':>12} "
          f"{'acc featx':>10} {'delta':>7}")
    for r in rows:
        print(f"{r['C']:>8g} {r['sklearn_s']:>10.1f} {r['featx_s']:>9.1f} {r['featx_fit_s']:>8.1f} "
              f"{r['sklearn_s'] / r['featx_s']:>6.1f}x {r['sklearn_cpu_s'] / r['featx_cpu_s']:>9.1f}x "
              f"{r['sklearn_acc']:>12.4f} {r['featx_acc']:>10.4f} {100 * (r['featx_acc'] - r['sklearn_acc']):>+6.2f}")
    ok_acc = all(r["featx_acc"] >= r["sklearn_acc"] - 0.01 for r in rows)
    print(f"{'total':>8} {tot_sk:>10.1f} {tot_fx:>9.1f} {'':>8} {tot_sk / tot_fx:>6.1f}x {cpu_sk / cpu_fx:>9.1f}x   "
          f"(accuracy at most 1 point below scikit-learn's at every C: {'yes' if ok_acc else 'NO'})")
    return {"n": n, "rows": rows, "total_sklearn_s": tot_sk, "total_featx_s": tot_fx, "ratio": tot_sk / tot_fx,
            "total_sklearn_cpu_s": cpu_sk, "total_featx_cpu_s": cpu_fx, "cpu_ratio": cpu_sk / cpu_fx}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--previous", type=Path, default=None, help="another featx checkout to time alongside")
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--skip-fixed", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()
    result: dict = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "load_before": os.getloadavg()}
    if not args.skip_fixed:
        result["fixed"] = fixed_costs(args.repeats, args.previous.resolve() if args.previous else None)
    if not args.skip_sweep:
        result["sweep"] = sweep(args.n)
    result["load_after"] = os.getloadavg()
    WORK.mkdir(exist_ok=True)
    (WORK / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nload average before {result['load_before'][0]:.1f}, after {result['load_after'][0]:.1f} "
          f"(cores: {os.cpu_count()})")


if __name__ == "__main__":
    main()
