"""Benchmark featx's linear heads against scikit-learn on pool5-like features.

Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_svm_solver.py            # 4,000 x 9,216, 20 classes (minutes)
    PYTHONPATH=. python benchmarks/bench_svm_solver.py --quick    # 1,000 x 2,304, a sanity run (seconds)
    PYTHONPATH=. python benchmarks/bench_svm_solver.py --classes 200   # 15,000 x 4,096 in 200 classes

``--classes K`` is the many-classes case: ``--n`` rows (default 15,000) of ``--d`` (default 4,096) features in
``K`` classes; it times ``SVMHead`` and ``LogisticHead`` on them and reports the SVM's time as a ratio to the
logistic fit's and to scikit-learn's StandardScaler + LinearSVC.  LinearSVC on all ``K`` classes would take hours,
so it is timed on ``--ref-classes`` of its one-vs-rest problems (each on every train row, as LinearSVC solves
them) and extrapolated linearly in the number of classes; the output says so.

For each ``C`` it prints LinearSVC's and SVMHead's fit seconds, test accuracy and primal objective (both
scored by the same float64 formula) on the same standardized rows (85% train / 15% test, stratified), the
speed ratio, then the same for LogisticRegression vs LogisticHead.  ``--search`` adds a run of SVMHead over
all the ``C`` values sharing one :class:`featx.heads.LinearProblem` (how a hyperparameter search uses it);
``--stream`` adds ``SVMHead.fit_stream`` over 500-row chunks.  Timings are wall-clock on whatever else the
machine is doing: run it on an idle machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synth import make_pool5_like, stratified_split  # noqa: E402
from featx.heads import LinearProblem, LogisticHead, SVMHead  # noqa: E402
from featx.heads.problem import labels_to_pm1, svm_primal_objective  # noqa: E402

logger = logging.getLogger(__name__)

_HEADER = (
    f"{'C':>8} | {'sklearn s':>9} {'acc':>6} {'objective':>12} | {{ours:>9}} {'acc':>6} {'objective':>12} "
    f"| {'speedup':>7} {'obj rel diff':>12}"
)


def _logreg_objective(coef: np.ndarray, intercept: np.ndarray, X: np.ndarray, y_idx: np.ndarray, C: float) -> float:
    """LogisticRegression's objective in float64 (binomial for one score column, softmax otherwise)."""
    F = X.astype(np.float64) @ coef.T + intercept
    if F.shape[1] == 1:
        s = np.where(y_idx == 1, 1.0, -1.0) * F[:, 0]
        loss = np.logaddexp(0.0, -s).sum()
    else:
        F -= F.max(axis=1, keepdims=True)
        logp = F - np.log(np.exp(F).sum(axis=1, keepdims=True))
        loss = -logp[np.arange(len(y_idx)), y_idx].sum()
    return float(0.5 * (coef**2).sum() + C * loss)


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _many_classes(args: argparse.Namespace) -> dict[str, Any]:
    """``--classes K``: SVMHead vs LogisticHead vs StandardScaler + LinearSVC (extrapolated) on K classes."""
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    n, d, k = args.n, args.d, args.classes
    X, y = make_pool5_like(n=n, d=d, k=k, seed=args.seed, class_sep=args.class_sep)
    split = stratified_split(y, 0.15, args.seed)
    tr, te = split == "train", split == "test"
    scaler, t_scale = _timed(lambda: StandardScaler().fit(X[tr]))
    Xtr, Xte = scaler.transform(X[tr]).astype(np.float32), scaler.transform(X[te]).astype(np.float32)
    ytr, yte = y[tr], y[te]
    print(f"data: {len(ytr)} train / {len(yte)} test rows x {d} features, {k} classes; C={args.C[0]:g}")
    C = args.C[0]
    svm, t_svm = _timed(lambda: SVMHead(C=C).fit(Xtr, ytr))
    acc_svm = float((svm.predict(Xte) == yte).mean())
    print(f"SVMHead      {t_svm:8.1f} s  acc {acc_svm:.1%}  {svm.solve_info_.space}: {svm.solve_info_.detail}")
    log, t_log = _timed(lambda: LogisticHead(C=C).fit(Xtr, ytr))
    acc_log = float((log.predict(Xte) == yte).mean())
    print(f"LogisticHead {t_log:8.1f} s  acc {acc_log:.1%}")
    t_ref_part = 0.0
    ref_acc = []
    for c in np.unique(ytr)[: args.ref_classes]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref, t = _timed(lambda c=c: LinearSVC(C=C).fit(Xtr, (ytr == c).astype(int)))
        t_ref_part += t
        ref_acc.append(float((ref.predict(Xte) == (yte == c)).mean()))
    t_ref = t_scale + t_ref_part * k / args.ref_classes
    print(f"LinearSVC    {t_ref_part:8.1f} s for {args.ref_classes} one-vs-rest problems -> {t_ref:.0f} s for {k} "
          f"(extrapolated linearly in classes, + StandardScaler {t_scale:.1f} s)")
    print(f"ratios: SVMHead / LogisticHead {t_svm / t_log:.2f}x; SVMHead / (StandardScaler + LinearSVC) "
          f"{t_svm / t_ref:.3f}x")
    return {"n_train": int(len(ytr)), "d": d, "k": k, "C": C, "svm_s": t_svm, "svm_acc": acc_svm,
            "svm_detail": {k_: str(v) for k_, v in svm.solve_info_.detail.items()}, "logreg_s": t_log,
            "logreg_acc": acc_log, "linearsvc_s_extrapolated": t_ref, "linearsvc_classes_timed": args.ref_classes,
            "linearsvc_binary_acc": ref_acc}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the tables; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4000, help="rows (before the 85/15 split)")
    ap.add_argument("--d", type=int, default=9216, help="features per row")
    ap.add_argument("--k", type=int, default=20, help="classes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--C", type=float, nargs="+", default=[0.01, 1.0])
    ap.add_argument("--quick", action="store_true", help="1,000 x 2,304 rows: a sanity run")
    ap.add_argument("--no-logreg", action="store_true", help="skip the logistic regression comparison")
    ap.add_argument("--search", action="store_true", help="also time all C values on one shared LinearProblem")
    ap.add_argument("--stream", action="store_true", help="also time SVMHead.fit_stream over 500-row chunks")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    ap.add_argument("--classes", type=int, help="the many-classes case (see above): this many classes")
    ap.add_argument("--ref-classes", type=int, default=2, help="LinearSVC one-vs-rest problems timed (--classes)")
    ap.add_argument("--class-sep", type=float, default=1.0, help="class separation of the data (--classes)")
    args = ap.parse_args(argv)
    if args.classes:
        if "--n" not in (argv if argv is not None else sys.argv):
            args.n = 15000
        if "--d" not in (argv if argv is not None else sys.argv):
            args.d = 4096
        if "--C" not in (argv if argv is not None else sys.argv):
            args.C = [1.0]  # featx fit svm's default
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        results = _many_classes(args)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return 0
    if args.quick:
        args.n, args.d = 1000, 2304
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    X, y = make_pool5_like(n=args.n, d=args.d, k=args.k, seed=args.seed)
    split = stratified_split(y, 0.15, args.seed)
    tr, te = split == "train", split == "test"
    scaler, t_scale = _timed(lambda: StandardScaler().fit(X[tr]))
    Xtr = scaler.transform(X[tr]).astype(np.float32)
    Xte = scaler.transform(X[te]).astype(np.float32)
    ytr, yte = y[tr], y[te]
    classes = np.unique(ytr)
    Y = labels_to_pm1(np.searchsorted(classes, ytr), len(classes))
    print(
        f"data: {len(ytr)} train / {len(yte)} test rows x {X.shape[1]} features, {len(classes)} classes, "
        f"{(X == 0).mean():.0%} zeros; StandardScaler fit {t_scale:.2f}s"
    )
    results: dict[str, Any] = {
        "n_train": int(len(ytr)), "d": int(X.shape[1]), "k": int(len(classes)), "svm": [], "logreg": []
    }

    print("\nlinear SVM (squared hinge, LinearSVC's problem)")
    print(_HEADER.format(ours="SVMHead s"))
    for C in args.C:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LinearSVC's ConvergenceWarning is reported through its objective
            ref, t_ref = _timed(lambda C=C: LinearSVC(C=C).fit(Xtr, ytr))
        ours, t_ours = _timed(lambda C=C: SVMHead(C=C).fit(Xtr, ytr))
        acc_ref, acc_ours = float((ref.predict(Xte) == yte).mean()), float((ours.predict(Xte) == yte).mean())
        o_ref = float(svm_primal_objective(ref.coef_, ref.intercept_, Xtr, Y, C).sum())
        o_ours = float(svm_primal_objective(ours.coef_, ours.intercept_, Xtr, Y, C).sum())
        print(
            f"{C:>8g} | {t_ref:>9.2f} {acc_ref:>6.1%} {o_ref:>12.6g} | {t_ours:>9.2f} {acc_ours:>6.1%} {o_ours:>12.6g} "
            f"| {t_ref / t_ours:>6.1f}x {(o_ours - o_ref) / o_ref:>+12.2e}"
        )
        results["svm"].append(
            {"C": C, "sklearn_s": t_ref, "sklearn_acc": acc_ref, "sklearn_obj": o_ref, "featx_s": t_ours,
             "featx_acc": acc_ours, "featx_obj": o_ours, "featx_newton_iters": ours.n_iter_,
             "featx_space": ours.solve_info_.space}
        )

    if args.search:
        problem, t_build = _timed(lambda: LinearProblem(Xtr))
        t_total = t_build
        print("\nSVMHead over all C on one shared LinearProblem (Gram matrix once, warm starts)")
        for C in sorted(args.C):
            head, t = _timed(lambda C=C: SVMHead(C=C).fit(Xtr, ytr, problem=problem))
            t_total += t
            print(f"  C={C:<8g} {t:6.2f}s  acc {(head.predict(Xte) == yte).mean():.1%}  Newton steps {head.n_iter_}")
        print(f"  total {t_total:.2f}s for {len(args.C)} values of C")

    if args.stream:
        print("\nSVMHead.fit_stream over 500-row chunks (L-BFGS, one pass per evaluation)")
        for C in args.C:

            def batches() -> Any:
                for s in range(0, len(ytr), 500):
                    yield Xtr[s : s + 500], ytr[s : s + 500]

            head, t = _timed(
                lambda C=C, b=batches: SVMHead(C=C).fit_stream(b, classes=classes, n_features=Xtr.shape[1])
            )
            o = float(svm_primal_objective(head.coef_, head.intercept_, Xtr, Y, C).sum())
            info = head.solve_info_
            print(
                f"  C={C:<8g} {t:7.2f}s  acc {(head.predict(Xte) == yte).mean():.1%}  objective {o:.6g}  "
                f"passes {info.detail['passes']}  converged {info.converged}"
            )

    if not args.no_logreg:
        y_idx = np.searchsorted(classes, ytr)
        print("\nlogistic regression (softmax, LogisticRegression's problem)")
        print(_HEADER.format(ours="LogHead s"))
        for C in args.C:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref, t_ref = _timed(lambda C=C: LogisticRegression(C=C).fit(Xtr, ytr))
            ours, t_ours = _timed(lambda C=C: LogisticHead(C=C).fit(Xtr, ytr))
            acc_ref, acc_ours = float((ref.predict(Xte) == yte).mean()), float((ours.predict(Xte) == yte).mean())
            o_ref = _logreg_objective(ref.coef_, ref.intercept_, Xtr, y_idx, C)
            o_ours = _logreg_objective(ours.coef_, ours.intercept_, Xtr, y_idx, C)
            print(
                f"{C:>8g} | {t_ref:>9.2f} {acc_ref:>6.1%} {o_ref:>12.6g} | {t_ours:>9.2f} {acc_ours:>6.1%} "
                f"{o_ours:>12.6g} | {t_ref / t_ours:>6.1f}x {(o_ours - o_ref) / o_ref:>+12.2e}"
            )
            results["logreg"].append(
                {"C": C, "sklearn_s": t_ref, "sklearn_acc": acc_ref, "sklearn_obj": o_ref, "featx_s": t_ours,
                 "featx_acc": acc_ours, "featx_obj": o_ours}
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
