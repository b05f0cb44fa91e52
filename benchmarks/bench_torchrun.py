"""1 process vs ``torchrun --nproc-per-node N`` for ``featx extract`` and ``featx finetune`` on this machine.

    python benchmarks/bench_torchrun.py [--images 240] [--procs 2] [--what extract,finetune] [--repeat 1]

Each run is a fresh command (``python -m featx`` or ``python -m torch.distributed.run ... -m featx``) on
scikit-learn's digits with random AlexNet weights and a fresh cache, so the wall time includes starting Python
and torch; the stage's own time (the manifest's ``timings.total_s``, metrics.json's ``seconds``) is printed
beside it.  The rendezvous is c10d on a loopback port.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], procs: int, env: dict) -> tuple[float, str]:
    if procs == 1:
        cmd = [sys.executable, "-m", "featx", *args]
    else:
        port = _port()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(procs),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--local-addr", "127.0.0.1",
               "-m", "featx", *args]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return dt, p.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--what", default="extract,finetune")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    from featx.datasets.digits import write_digits

    work = Path(tempfile.mkdtemp(prefix="featx-bench-torchrun-"))
    data = write_digits(work / "digits", limit=a.images)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # featx shares the cores out itself
    print(f"{a.images} digits, AlexNet (random weights), {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    for what in a.what.split(","):
        for rep in range(a.repeat):
            for procs in (1, a.procs):
                cache = work / f"c-{what}-{procs}-{rep}"
                if what == "extract":
                    dt, out = _run(["extract", str(data), "--weights", "random", "--layer", "pool5", "--cache",
                                    str(cache), "--quiet"], procs, env)
                    m = json.loads((Path(out) / "manifest.json").read_text())
                    print(f"extract  {procs} process(es): {dt:6.1f} s wall, {m['timings']['total_s']:6.1f} s in "
                          f"extract(), {m['n_images'] / m['timings']['total_s']:5.1f} images/s")
                else:
                    _, feats = _run(["extract", str(data), "--weights", "random", "--layer", "pool5", "--split",
                                     "test=0.2,val=0.1", "--cache", str(cache), "--quiet"], 1, env)
                    _, head = _run(["fit", "logreg", feats, "--cache", str(cache), "--quiet"], 1, env)
                    dt, out = _run(["finetune", head, "--epochs", str(a.epochs), "--augment", "none",
                                    "--batch-size", "32", "--unfreeze", "all", "--workers", "0", "--cache",
                                    str(cache), "--quiet"], procs, env)
                    m = json.loads((Path(out) / "metrics.json").read_text())
                    print(f"finetune {procs} process(es): {dt:6.1f} s wall, {m['seconds']:6.1f} s in finetune(), "
                          f"{m['train_images_per_s']:5.1f} train images/s, train loss "
                          f"{[round(r['train_loss'], 5) for r in m['curve']]}")


if __name__ == "__main__":
    main()
