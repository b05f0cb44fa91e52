"""Search throughput on PostgreSQL: trials per minute with 1, 2 and 4 ``featx search`` workers on one study.

    python benchmarks/bench_search_pg.py [--url postgresql://...] [--trials 24] [--workers 1 2 4]
                                         [--n 1500] [--d 256] [--head logreg]

* Server: ``--url`` names a server whose user may create databases; without it a throw-away PostgreSQL server is
  started for the run (tests/pgserver.py: initdb + pg_ctl on a free loopback port, as the ``postgres`` user
  when run as root; fsync off).
* Each worker count gets a fresh database and study; N ``featx search HEAD FILE --trials T/N --storage URL
  --study bench --sampler random --seed i`` processes are started at the same moment (whole processes, as a
  Slurm job array starts them), each refitting the best head at its end as usual.
* Throughput: finished trials / (last trial's end - first trial's start), from the study's own timestamps, so
  that Python start-up and the final refit do not count; the wall time of the whole run is given beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))


def run_workers(url: str, h5: Path, head: str, trials: int, workers: int, cache: Path) -> dict:
    import optuna

    shares = [trials // workers + (1 if i < trials % workers else 0) for i in range(workers)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "featx", "search", head, str(h5), "--trials", str(n),
                               "--storage", url, "--study", "bench", "--sampler", "random", "--seed", str(i),
                               "--cache", str(cache / f"w{i}"), "--quiet"],
                              env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, n in enumerate(shares)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"a worker failed:\n{err[-3000:]}")
    wall = time.perf_counter() - t0
    trials_ = optuna.load_study(study_name="bench", storage=url).trials
    done = [t for t in trials_ if t.state == optuna.trial.TrialState.COMPLETE]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    per_trial = sorted((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    return {"workers": workers, "trials": len(done), "other_states": len(trials_) - len(done),
            "span_s": round(span, 2), "trials_per_min": round(60 * len(done) / span, 1),
            "median_trial_s": round(per_trial[len(per_trial) // 2], 3), "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a server URL (its user may CREATE DATABASE); default: start one")
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--head", default="logreg", choices=["svm", "logreg", "mlp"])
    args = ap.parse_args()

    from synth import make_pool5_like, write_h5

    work = Path(tempfile.mkdtemp(prefix="featx-bench-pg-"))
    h5 = work / "feats.h5"
    X, y = make_pool5_like(args.n, args.d, 10, seed=0, rank=min(64, args.d))
    write_h5(h5, X, y)
    rows = []
    with ExitStack() as stack:
        if args.url:
            import sqlalchemy

            base = args.url.rsplit("/", 1)[0]

            def new_database(name: str) -> str:
                e = sqlalchemy.create_engine(args.url, isolation_level="AUTOCOMMIT")
                with e.connect() as c:
                    c.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
                    c.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
                e.dispose()
                return f"{base}/{name}"
        else:
            from pgserver import running_server

            new_database = stack.enter_context(running_server()).new_database
        for w in args.workers:
            url = new_database(f"bench_w{w}")
            row = run_workers(url, h5, args.head, args.trials, w, work / f"cache{w}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{args.head} on {args.n} x {args.d} rows, {args.trials} trials, {os.cpu_count()} CPUs")
    print("| workers | trials | trials/min | median trial (s) | whole run (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['trials']} | {r['trials_per_min']} | {r['median_trial_s']} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
