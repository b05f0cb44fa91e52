"""What checking feature shards on every read costs: HDF5's fletcher32 filter against a sha256 per shard.

A few hundred MB of synthetic pool5-like + fc7-like rows (``synth.make_pool5_like``) are written as featx writes
shards (the full-size datasets created first, rows written in batches of 64 as they come, the per-row columns at
the end), then read back whole, every layer and column, in featx's 4,096-row blocks. Four ways, alternating
within each repeat so that the machine's load hits them alike:

* ``plain``: contiguous datasets, no check (featx format 1);
* ``chunked``: the datasets chunked as fletcher32 needs, no filter (what chunking alone costs);
* ``fletcher32``: chunked, with HDF5's fletcher32 checksum on every numeric dataset (verified by HDF5 on read);
* ``sha256``: contiguous, the file's sha256 computed after writing and checked before reading.

Reads are from the page cache (the files were just written): the worst case for a check, whose cost is then not
hidden behind the disk. Reading one layer (fc7) alone is timed too, where fletcher32 checks only what is read and
sha256 must hash the whole file.

Usage: python benchmarks/bench_integrity.py [--rows 8192] [--repeats 3] [--chunk-mib 1] [--dir /tmp/x]
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from synth import make_pool5_like  # noqa: E402

STR = h5py.string_dtype("utf-8")
BATCH = 64
READ_ROWS = 4096


CHUNK_BYTES = 1 << 20


def chunk_rows(d: int) -> int:
    """Rows per chunk: about ``--chunk-mib`` MiB."""
    return max(1, CHUNK_BYTES // (4 * d))


def write_shard(path: Path, layers: dict[str, np.ndarray], y: np.ndarray, mode: str) -> str | None:
    n = len(y)
    kw = {}
    with h5py.File(path, "w", rdcc_nbytes=16 << 20) as f:
        for name, X in layers.items():
            if mode in ("chunked", "fletcher32"):
                kw = {"chunks": (min(n, chunk_rows(X.shape[1])), X.shape[1]), "fletcher32": mode == "fletcher32"}
            ds = f.create_dataset(name, shape=X.shape, dtype=np.float32, **kw)
            for a in range(0, n, BATCH):
                ds[a:a + BATCH] = X[a:a + BATCH]
        ikw = {"fletcher32": True, "chunks": True} if mode == "fletcher32" else {}
        f.create_dataset("label", data=y, **ikw)
        for col in ("path", "split", "view"):
            f.create_dataset(col, data=np.asarray([f"class{c}/img{i:06d}.jpg" for i, c in enumerate(y)], dtype=object),
                             dtype=STR)
        f.attrs["classes"] = "[]"
    if mode == "sha256":
        return sha256_file(path)
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_shard(path: Path, mode: str, digest: str | None, only: str | None = None) -> float:
    if mode == "sha256" and sha256_file(path) != digest:
        raise RuntimeError("digest differs")
    total = 0.0
    with h5py.File(path, "r") as f:
        names = [only] if only else [k for k in f if f[k].dtype == np.float32]
        for name in names:
            ds = f[name]
            for a in range(0, ds.shape[0], READ_ROWS):
                total += float(ds[a:a + READ_ROWS][0, 0])
        if not only:
            f["label"][()]
            for col in ("path", "split", "view"):
                f[col][()]
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192, help="rows in all (split into shards of 2,048)")
    ap.add_argument("--shard", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--chunk-mib", type=float, default=1.0, help="chunk size of the chunked formats")
    args = ap.parse_args()
    global CHUNK_BYTES
    CHUNK_BYTES = int(args.chunk_mib * (1 << 20))
    base = Path(args.dir or tempfile.mkdtemp(prefix="featx-bench-integrity-"))
    base.mkdir(parents=True, exist_ok=True)
    X5, y = make_pool5_like(n=args.shard, d=9216, k=20, seed=0)
    X7 = np.ascontiguousarray(X5[:, :4096] * 0.5 + X5[:, 4096:8192] * 0.5)
    layers = {"pool5": X5, "fc7": X7}
    n_shards = max(1, args.rows // args.shard)
    mb = n_shards * sum(a.nbytes for a in layers.values()) / 1e6
    print(f"{n_shards} shard(s) of {args.shard} rows, pool5 [.., 9216] + fc7 [.., 4096] float32: {mb:.0f} MB of "
          f"features, {args.repeats} repeat(s), chunks of {args.chunk_mib:g} MiB", flush=True)
    modes = ("plain", "chunked", "fletcher32", "sha256")
    times = {m: {"write": [], "read": [], "fc7": []} for m in modes}
    sizes = {}
    for r in range(args.repeats):
        for m in (modes if r % 2 == 0 else modes[::-1]):
            d = base / m
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            t = time.perf_counter()
            digests = [write_shard(d / f"shard-{s:05d}.h5", layers, y, m) for s in range(n_shards)]
            times[m]["write"].append(time.perf_counter() - t)
            sizes[m] = sum(p.stat().st_size for p in d.iterdir()) / 1e6
            t = time.perf_counter()
            for s in range(n_shards):
                read_shard(d / f"shard-{s:05d}.h5", m, digests[s])
            times[m]["read"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for s in range(n_shards):
                read_shard(d / f"shard-{s:05d}.h5", m, digests[s], only="fc7")
            times[m]["fc7"].append(time.perf_counter() - t)
    med = {m: {k: statistics.median(v) for k, v in times[m].items()} for m in modes}
    print("| format | file MB | write s | write / plain | full read s | read / plain | fc7 alone s | fc7 / plain |")
    print("|---|---|---|---|---|---|---|---|")
    p = med["plain"]
    for m in modes:
        q = med[m]
        print(f"| {m} | {sizes[m]:.0f} | {q['write']:.2f} | {q['write'] / p['write']:.2f}x | {q['read']:.2f} | "
              f"{q['read'] / p['read']:.2f}x | {q['fc7']:.2f} | {q['fc7'] / p['fc7']:.2f}x |")
    print("ranges (min-max):",
          {m: {k: (round(min(v), 2), round(max(v), 2)) for k, v in times[m].items()} for m in modes})
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
