"""Extraction throughput and memory: featx extract against the usual PyTorch loop, as whole processes, in one run.

    python benchmarks/bench_extract.py [--n 1600] [--repeats 2] [--memory] [--quick]

* Data: N JPEGs of 500x375 (crops of scikit-learn's two real photos, with flips and jitter), 4 classes.
* Baseline: the loop people write: torchvision ``ImageFolder`` with ``weights.transforms()``,
  ``DataLoader(batch_size=64, num_workers=2)``, ``model.features`` + avgpool + flatten (pool5), features kept in
  RAM, one h5py write at the end.
* featx: ``featx extract DIR --layer pool5 --weights random``, cold cache each time.
* Ideal: this machine's bound for the same work: forward-only throughput (channels_last, inference_mode, on
  preloaded tensors) and decode-only throughput (one process), combined as if perfectly overlapped on the cores.
* ``--memory``: peak PSS (main process + workers) of featx at N and 10 N images.

Both are timed as whole processes (python start, imports and all), alternating, in the same run; the figures
printed are medians. Weights are random (the same cost as ImageNet weights, and nothing to download).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"

BASELINE = r'''
import sys, time, h5py, numpy as np, torch, torchvision
from torchvision.datasets import ImageFolder
from torch.utils.data import DataLoader
root, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
weights = torchvision.models.AlexNet_Weights.IMAGENET1K_V1
model = torchvision.models.alexnet(weights=None).eval()
ds = ImageFolder(root, transform=weights.transforms())
loader = DataLoader(ds, batch_size=64, num_workers=2)
feats, labels = [], []
with torch.no_grad():
    for x, y in loader:
        f = torch.flatten(model.avgpool(model.features(x)), 1)
        feats.append(f.numpy()); labels.append(y.numpy())
with h5py.File(out, "w") as h:
    h["pool5"] = np.concatenate(feats); h["label"] = np.concatenate(labels)
'''


def make_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    """N JPEGs of 500x375 in 4 classes, made once and reused."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    marker = root / f".complete-{n}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    photos = load_sample_images().images  # two 427x640 photos
    for i in range(n):
        img = photos[i % 2]
        y, x = int(rng.integers(0, img.shape[0] - 375)), int(rng.integers(0, img.shape[1] - 500))
        crop = img[y:y + 375, x:x + 500].astype(np.int16)
        crop = np.clip(crop + rng.integers(-12, 13, size=(1, 1, 3)), 0, 255).astype(np.uint8)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        d = root / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop)).save(d / f"img{i:05d}.jpg", quality=90)
    marker.touch()
    return root


def _tree_rss_kb(pid: int) -> int:
    """Proportional resident memory (PSS: shared pages split between sharers) of a process and its
    descendants (kB), from /proc; plain RSS would count torch's shared libraries once per worker."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return total


def timed(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> tuple[float, int]:
    """Wall seconds and peak tree RSS (kB) of a whole process."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
                         cwd=cwd)
    peak = 0
    stop = threading.Event()

    def poll():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss_kb(p.pid))
            time.sleep(0.5)  # reading smaps_rollup costs kernel time: poll gently so as not to slow what we measure

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    _, err = p.communicate()
    stop.set()
    th.join()
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {err.decode()[-2000:]}")
    return time.perf_counter() - t, peak


def run_baseline(data: Path) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        return timed([sys.executable, "-c", BASELINE, str(data), str(Path(tmp) / "f.h5")])


def run_featx(data: Path, extra: list[str], source: str | None = None) -> tuple[float, int]:
    """``source``: another featx checkout to run instead of this one (an A/B against an earlier commit)."""
    # `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH: run the other checkout from
    # its own root, or the featx imported would be whichever the current directory holds
    env = {"PYTHONPATH": source} if source else None
    with tempfile.TemporaryDirectory() as tmp:
        return timed([sys.executable, "-m", "featx", "extract", str(data.absolute()), "--layer", "pool5", "--weights",
                      "random", "--cache", tmp, "--quiet", *extra], env=env, cwd=source or tmp)


def ideal(data: Path, n: int) -> dict:
    """Forward-only and decode-only throughputs on this machine, and their perfectly overlapped bound."""
    import torch

    from featx.backbones import Preprocess, Tapped, load_backbone
    from featx.datasets import open_rgb

    files = sorted(data.rglob("*.jpg"))[:256]
    pre = Preprocess()
    t = time.perf_counter()
    pix = [pre.pixels(open_rgb(f)) for f in files]
    dec = len(files) / (time.perf_counter() - t)  # images/s on one core
    bb = load_backbone("alexnet", "random")
    model = Tapped(bb.stages(), ["pool5"]).to(memory_format=torch.channels_last)
    x = pre.normalize(torch.cat(pix[:64])).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        model(x)
        t = time.perf_counter()
        for _ in range(3):
            model(x)
    fwd = 3 * 64 / (time.perf_counter() - t)  # images/s on all cores
    cores = os.cpu_count() or 1
    # decode work spread on the cores the forward pass leaves idle: time per image = 1/fwd + 1/(dec * cores)
    bound = 1.0 / (1.0 / fwd + 1.0 / (dec * cores))
    return {"decode_1core_ips": dec, "forward_ips": fwd, "ideal_ips": bound, "ideal_s": n / bound}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1600)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="also peak memory at M and 10 M images")
    ap.add_argument("--memory-n", type=int, default=200, help="M for --memory")
    ap.add_argument("--featx-args", default="", help="extra featx extract arguments (tuning)")
    ap.add_argument("--quick", action="store_true", help="200 images, 1 repeat")
    ap.add_argument("--previous", default=None, metavar="DIR",
                    help="also time the featx of another checkout (e.g. `git worktree add /tmp/old HEAD~1`)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats = 200, 1
    data = make_jpegs(WORK / f"jpegs-{args.n}", args.n)
    extra = args.featx_args.split()
    base, ours, prev = [], [], []
    for r in range(args.repeats):
        base.append(run_baseline(data))
        ours.append(run_featx(data, extra))
        if args.previous:
            prev.append(run_featx(data, extra, args.previous))
        print(f"repeat {r}: baseline {base[-1][0]:.1f}s, featx {ours[-1][0]:.1f}s"
              + (f", previous featx {prev[-1][0]:.1f}s" if prev else ""), file=sys.stderr)
    tb = statistics.median(t for t, _ in base)
    tf = statistics.median(t for t, _ in ours)
    ide = ideal(data, args.n)
    print(f"images: {args.n} JPEG 500x375, cores: {os.cpu_count()}")
    print(f"baseline loop (ImageFolder + DataLoader(num_workers=2) + model.features): {tb:.1f} s = {args.n / tb:.1f} img/s, "
          f"peak PSS {max(m for _, m in base) / 1024:.0f} MiB")
    print(f"featx extract: {tf:.1f} s = {args.n / tf:.1f} img/s, peak PSS {max(m for _, m in ours) / 1024:.0f} MiB")
    print(f"speed-up featx / baseline: {tb / tf:.2f}x")
    if prev:
        tp = statistics.median(t for t, _ in prev)
        print(f"previous featx ({args.previous}): {tp:.1f} s, peak PSS {max(m for _, m in prev) / 1024:.0f} MiB, "
              f"{tb / tp:.2f}x the baseline; this featx is {tp / tf:.2f}x the previous")
    print(f"machine bound: forward-only {ide['forward_ips']:.1f} img/s, decode-only {ide['decode_1core_ips']:.1f} img/s/core, "
          f"overlapped {ide['ideal_ips']:.1f} img/s -> {ide['ideal_s']:.1f} s + process start-up; "
          f"bound / baseline: {tb / ide['ideal_s']:.2f}x (without start-up)")
    if args.memory:
        M = args.memory_n
        small = make_jpegs(WORK / f"jpegs-{M}", M)
        big = make_jpegs(WORK / f"jpegs-{10 * M}", 10 * M)
        _, m1 = run_featx(small, extra)
        _, m10 = run_featx(big, extra)
        print(f"peak PSS featx: {M} images {m1 / 1024:.0f} MiB, {10 * M} images {m10 / 1024:.0f} MiB, "
              f"ratio {m10 / m1:.2f}x")


if __name__ == "__main__":
    main()
