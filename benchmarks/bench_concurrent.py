"""Two identical ``featx run`` started together on one fresh cache, N rounds: both must exit 0 and write the same
results table; the time of a round is compared with one run alone on a fresh cache, measured in the same script.

    python benchmarks/bench_concurrent.py [--pipeline pipelines/digits.toml] [--rounds 3] [--small]
                                          [--data PATH] [--set KEY=VALUE ...]

* ``--small``: the pipeline made small (60 digits written under the work folder, one layer, 2 search trials, 3
  MLP epochs, the fine-tune training its head alone), as tests/test_run.py runs it: a round of the full digits
  pipeline takes about 10 minutes on two cores.
* A round: a fresh cache, two ``featx run PIPELINE --weights random`` started at once.  The second waits for the
  first on the run's lock (featx.locks), then finds every stage cached; both print the same results directory.
  The tables are compared without the timing columns (``seconds``, ``images_per_s``).
* The baseline: one run alone on a fresh cache, before the rounds.  A round costs the baseline plus a cached run
  (start-up, reading the cache), so the ratio is a little over 1: the waiting run adds no second computation.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DIGITS = HERE.parent / "pipelines" / "digits.toml"
SMALL = ["search.logreg.trials=2", "heads.mlp.epochs=3", "features.layers=['pool5']", "finetune.all.unfreeze=head"]
TIMING = ("seconds", "images_per_s")


def command(args, cache: Path, data: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "featx", "run", str(args.pipeline), "--weights", "random", "--cache", str(cache),
           "--device", "cpu", "--quiet"]
    if data is not None:
        cmd += ["--data", str(data)]
    return cmd + [a for s in args.sets for a in ("--set", s)]


def table(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "results.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p: subprocess.Popen) -> Path:
    out, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"a run exited {p.returncode}: {err[-2000:]}")
    return Path(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", type=Path, default=DIGITS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--small", action="store_true", help="60 digits and the small settings (see above)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="featx-bench-concurrent-"))
    try:
        data = args.data
        if args.small:
            from featx.datasets.digits import write_digits

            data = data or write_digits(work / "digits", limit=60)
            args.sets = [*SMALL, *args.sets]
        t = time.perf_counter()
        ref = table(finish(start(command(args, work / "baseline", data))))
        alone = time.perf_counter() - t
        print(f"one run alone: {alone:.1f}s, {len(ref)} case(s)", flush=True)
        walls = []
        for i in range(args.rounds):
            cache = work / f"round-{i}"
            t = time.perf_counter()
            a, b = start(command(args, cache, data)), start(command(args, cache, data))
            da, db = finish(a), finish(b)
            walls.append(time.perf_counter() - t)
            assert da == db, (da, db)
            strip = ("features", "head_dir", "model_dir")  # paths under each cache
            got = [{k: v for k, v in r.items() if k not in strip} for r in table(da)]
            assert got == [{k: v for k, v in r.items() if k not in strip} for r in ref], "results differ"
            assert all(r["status"] == "ok" for r in got), got
            shutil.rmtree(cache)
            print(f"round {i + 1}: both exited 0, same {len(got)}-row table, {walls[-1]:.1f}s "
                  f"({walls[-1] / alone:.2f}x one run alone)", flush=True)
        med = statistics.median(walls)
        print(f"{args.rounds} round(s) of two runs at once: median {med:.1f}s = {med / alone:.2f}x one run alone "
              f"({alone:.1f}s); every round: both exit 0, identical results tables")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
