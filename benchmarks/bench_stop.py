"""How fast featx's long commands stop on SIGTERM and SIGINT, and whether they say so in one line.

    python benchmarks/bench_stop.py [--features FILE_OR_DIR] [--after 3] [--signals SIGTERM,SIGINT]
    python benchmarks/bench_stop.py --rows 3000 --dim 512 --classes 20 --after 2      # a quick check

* Data: ``--features`` (a feature set directory or HDF5 file), or a synthetic HDF5 set built as
  benchmarks/bench_scale.py does, under benchmarks/_work/.
* Runs, one round per signal: ``featx fit svm``, ``featx fit logreg`` and a 10-trial ``featx search logreg``,
  each a whole process with a cold cache, sent the signal ``--after`` seconds after it started.
* Reported per run: seconds from the signal to the exit, the exit code (143 for SIGTERM, 130 for SIGINT) and
  whether stderr's last line is featx's one-line interrupt message; a run that ended before the signal is
  reported as such (lower ``--after``, or give bigger data).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
WORK = HERE / "_work"

COMMANDS = {
    "fit svm": ["fit", "svm"],
    "fit logreg": ["fit", "logreg"],
    "search logreg": ["search", "logreg"],
}
EXPECTED = {"SIGTERM": 143, "SIGINT": 130}


def stop_once(args: list[str], features: str, sig: str, after: float, cache: Path, trials: int) -> dict:
    """Start ``featx ARGS FEATURES``, send ``sig`` ``after`` seconds in, and time its exit."""
    from featx.interrupt import MESSAGE

    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "featx", *args, features, "--cache", str(cache)]
    if args[0] == "search":
        cmd += ["--trials", str(trials)]
    err_path = cache.with_suffix(".stderr")
    with open(err_path, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            p.wait(timeout=after)
            ended_first = True
        except subprocess.TimeoutExpired:
            ended_first = False
        t = time.perf_counter()
        if not ended_first:
            p.send_signal(getattr(signal, sig))
        try:
            rc = p.wait(timeout=600)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
        seconds = time.perf_counter() - t
    lines = err_path.read_text().strip().splitlines()
    last = lines[-1] if lines else ""
    one_line = last == "featx: " + MESSAGE.format(signame=sig)
    shutil.rmtree(cache, ignore_errors=True)
    err_path.unlink(missing_ok=True)
    return {"command": " ".join(args), "signal": sig, "after": after, "ended_before_signal": ended_first,
            "seconds_to_exit": None if ended_first else round(seconds, 2), "rc": rc,
            "rc_ok": (not ended_first) and rc == EXPECTED[sig], "one_line": one_line, "last_line": last}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", default=None, help="a feature set directory or HDF5 file (default: synthetic)")
    ap.add_argument("--rows", type=int, default=15000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--after", type=float, default=5.0, help="seconds from the start to the signal")
    ap.add_argument("--signals", default="SIGTERM,SIGINT")
    ap.add_argument("--commands", default=",".join(COMMANDS), help="of: " + ", ".join(COMMANDS))
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--out", default=str(WORK / "bench_stop.json"))
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    features = a.features
    if features is None:
        from bench_scale import write_features

        features = str(write_features(WORK / f"scale-{a.rows}x{a.dim}x{a.classes}.h5", a.rows, a.dim, a.classes))
    results = []
    print(f"{'command':14} {'signal':8} {'after s':>7} {'to exit s':>9} {'rc':>4} {'rc ok':>5} {'one line':>8}")
    for sig in a.signals.split(","):
        for name in a.commands.split(","):
            r = stop_once(COMMANDS[name], features, sig, a.after, WORK / "stop-cache", a.trials)
            results.append(r)
            to_exit = "ended" if r["ended_before_signal"] else f"{r['seconds_to_exit']:.2f}"
            print(f"{name:14} {sig:8} {a.after:>7.1f} {to_exit:>9} {r['rc']:>4} {str(r['rc_ok']):>5} "
                  f"{str(r['one_line']):>8}" + ("" if r["one_line"] else f"  last: {r['last_line'][:80]}"), flush=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"results: {a.out}")


if __name__ == "__main__":
    main()
