"""featx fit / search speed against scikit-learn, as whole processes, in one run.

    python benchmarks/bench_fit.py [--n 4000] [--C 1.0] [--trials 20] [--skip-search]

* Data: a plain HDF5 file of N x 9,216 pool5-like rows in 20 classes, 85% train (benchmarks/synth.py).
* Baseline: scikit-learn's ``StandardScaler`` + ``LinearSVC(C)``: the fit alone (data already in memory), and
  its test accuracy.
* featx: ``featx fit svm FILE --C C`` as a whole process (python start, imports, reading the file, scaling,
  fitting, measuring, saving the head and its plots), cold cache.
* Search: ``featx search svm FILE --trials T`` (3-fold CV per trial, then the refit) against T separate
  ``featx fit svm`` processes at the C values the search tried (each a single fit, no CV).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORK = HERE / "_work"


def run(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t, p.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--skip-search", action="store_true")
    args = ap.parse_args()

    from synth import make_pool5_like, write_h5

    WORK.mkdir(exist_ok=True)
    path = WORK / f"pool5-like-{args.n}.h5"
    X, y = make_pool5_like(n=args.n, d=9216, k=20, seed=0)
    if not path.exists():
        write_h5(path, X, y, seed=0)
    import h5py

    with h5py.File(path, "r") as f:
        split = f["split"].asstr()[()]
    tr, te = split == "train", split == "test"

    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    t = time.perf_counter()
    sc = StandardScaler().fit(X[tr])
    clf = LinearSVC(C=args.C).fit(sc.transform(X[tr]), y[tr])
    t_sk = time.perf_counter() - t
    acc_sk = float(np.mean(clf.predict(sc.transform(X[te])) == y[te]))
    del X

    with tempfile.TemporaryDirectory() as cache:
        t_fx, head = run([sys.executable, "-m", "featx", "fit", "svm", str(path), "--C", str(args.C),
                          "--cache", cache, "--quiet"])
        m = json.loads((Path(head) / "metrics.json").read_text())
    print(f"data: {args.n} x 9216 pool5-like rows, 20 classes, {int(tr.sum())} train / {int(te.sum())} test; "
          f"cores: {os.cpu_count()}")
    print(f"scikit-learn StandardScaler + LinearSVC(C={args.C}) fit alone: {t_sk:.2f} s, test accuracy {acc_sk:.4f}")
    print(f"featx fit svm --C {args.C}, whole process: {t_fx:.2f} s (fit itself {m['fit_seconds']:.2f} s), "
          f"test accuracy {m['test_accuracy']:.4f}")
    print(f"speed-up: {t_sk / t_fx:.1f}x whole process ({t_sk / m['fit_seconds']:.1f}x fit against fit); "
          f"accuracy difference {100 * (m['test_accuracy'] - acc_sk):+.2f} points")

    if args.skip_search:
        return
    with tempfile.TemporaryDirectory() as cache:
        t_search, head = run([sys.executable, "-m", "featx", "search", "svm", str(path), "--trials", str(args.trials),
                              "--cache", cache, "--quiet"])
        s = json.loads((Path(head) / "metrics.json").read_text())["search"]
        import optuna

        from featx.search import open_storage

        study = optuna.load_study(study_name=s["study"], storage=open_storage(s["storage"]))
        trials = [(t.params["C"], t.params["scale"]) for t in study.trials if t.state.name == "COMPLETE"]
        t_sep = 0.0
        for C, scale in trials:
            dt, _ = run([sys.executable, "-m", "featx", "fit", "svm", str(path), "--C", repr(C), "--scale", scale,
                         "--cache", cache, "--quiet"])
            t_sep += dt
    print(f"featx search svm --trials {args.trials} (3-fold CV each, then the refit): {t_search:.1f} s; "
          f"{len(trials)} separate featx fit svm processes at the same C/scale (no CV): {t_sep:.1f} s; "
          f"ratio {t_sep / t_search:.2f}x (the search does 3 fits per trial plus the refit)")


if __name__ == "__main__":
    main()
