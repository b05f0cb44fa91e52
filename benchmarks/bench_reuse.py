"""Deeper layers from cached rows against a re-extraction: ``featx extract --layer fc6 --layer fc7`` when the
cache already holds ``pool5`` of the same images and network, with and without ``--no-reuse``.

    python benchmarks/bench_reuse.py [--n 400] [--backbone alexnet] [--layers fc6,fc7] [--start pool5] [--repeats 2]

* Data: N JPEGs of 500x375 (bench_extract.make_jpegs: crops of scikit-learn's two photos), 4 classes.
* Set-up (not timed): ``featx extract DATA --layer START`` into a cache.
* Re-extraction: ``featx extract DATA --layer ... --no-reuse`` into an empty cache: decoding and every stage.
* Reuse: the same command on the cache holding START (its earlier result removed before each repeat): the
  deeper layers computed from the cached rows, no image decoded.  Both give the same feature set (same key;
  tests/test_extract.py checks the rows bit for bit).

Each side is timed as a whole process (python start-up, imports, hashing the images and building the network
included), alternating, median of the repeats; the manifests' ``timings.total_s`` (from the call of
:func:`featx.extract.extract` to the manifest, i.e. without start-up and imports: what a pipeline running many
extractions in one process pays) is reported beside it.  Weights are random (same cost as ImageNet weights).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_extract import WORK, make_jpegs  # noqa: E402


def featx(data: Path, cache: Path, layers: list[str], backbone: str, *extra: str) -> tuple[float, Path]:
    """Wall seconds of a whole ``featx extract`` process, and the feature set it printed."""
    cmd = [sys.executable, "-m", "featx", "extract", str(data), "--backbone", backbone, "--weights", "random",
           "--cache", str(cache), "--quiet", *[a for l in layers for a in ("--layer", l)], *extra]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {p.stderr[-2000:]}")
    return wall, Path(p.stdout.strip().splitlines()[-1])


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--backbone", default="alexnet")
    ap.add_argument("--layers", default="fc6,fc7")
    ap.add_argument("--start", default="pool5")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    layers = args.layers.split(",")
    data = make_jpegs(WORK / f"jpegs-{args.n}", args.n)
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        wall, base = featx(data, warm, [args.start], args.backbone)
        print(f"set-up: {args.start} of {args.n} images cached in {wall:.1f} s ({base.name})")
        direct_w, reuse_w, direct_t, reuse_t = [], [], [], []
        for r in range(args.repeats):
            cold = Path(tmp) / f"cold-{r}"
            w, d = featx(data, cold, layers, args.backbone, "--no-reuse")
            md = manifest(d)
            assert "computed_from" not in md
            direct_w.append(w)
            direct_t.append(md["timings"]["total_s"])
            w, u = featx(data, warm, layers, args.backbone)
            mu = manifest(u)
            assert mu["computed_from"]["layer"] == args.start and u.name == d.name, "not the same feature set"
            reuse_w.append(w)
            reuse_t.append(mu["timings"]["total_s"])
            shutil.rmtree(u)  # the next repeat computes it again
            shutil.rmtree(cold)
            print(f"repeat {r + 1}: re-extraction {direct_w[-1]:.1f} s (in extract() {direct_t[-1]:.1f} s: decode "
                  f"{md['timings']['decode_s']:.1f} s, forward {md['timings']['forward_s']:.1f} s of lane time); "
                  f"reuse {reuse_w[-1]:.1f} s (in extract() {reuse_t[-1]:.2f} s: reading rows "
                  f"{mu['timings'].get('read_s', 0):.2f} s, stages {mu['timings']['forward_s']:.2f} s)")
    med = statistics.median
    print(f"\n{args.backbone} {args.start} -> {','.join(layers)}, {args.n} images, {args.repeats} repeats (medians)")
    print(f"whole process:  re-extraction {med(direct_w):.1f} s, reuse {med(reuse_w):.1f} s: "
          f"{med(direct_w) / med(reuse_w):.1f}x")
    print(f"inside extract(): re-extraction {med(direct_t):.2f} s, reuse {med(reuse_t):.2f} s: "
          f"{med(direct_t) / med(reuse_t):.1f}x")


if __name__ == "__main__":
    main()
