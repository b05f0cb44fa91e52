"""Which torchvision backbones featx builds and extracts: every one, at ``penultimate``, with seeded random weights.

    python benchmarks/backbone_coverage.py [NAME ...] [--images 2] [--json out.json]

For each backbone (all of ``torchvision.models.list_models(module=torchvision.models)`` by default): ``featx
extract`` of a folder of small photos at ``--layer penultimate`` with ``--weights random``, then the same images
through the published transform and the network itself, the input of its final classifier layer caught by a
forward pre-hook (an oracle that does not use featx's graph taps), reduced by the rule the feature set records.
Prints one line per backbone: built or not, the width, the largest relative difference, the seconds taken; and
whether the network's train- and eval-mode graphs differ (fine-tuning reads the train-mode one).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch


def photos(root: Path, n: int) -> Path:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images().images
    for i in range(n):
        img = imgs[i % 2]
        d = root / ("china" if i % 2 == 0 else "flower")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[20 * i:300 + 20 * i, 10 * i:400 + 10 * i]).save(d / f"{i}.jpg", quality=90)
    return root


def check(name: str, data: Path, cache: Path) -> dict:
    from torchvision.models.feature_extraction import get_graph_node_names

    from featx.backbones import graph_info, load_backbone, reduce
    from featx.datasets import open_rgb
    from featx.extract import ExtractResult, extract
    from featx.store import FeatureSet

    t = time.perf_counter()
    res = extract(data, layers=["penultimate"], backbone=name, weights="random", seed=0, cache=cache, workers=0,
                  batch_size=4, progress=False)
    t_extract = time.perf_counter() - t
    assert isinstance(res, ExtractResult)
    fs = FeatureSet(res.path)
    got = torch.from_numpy(fs.load("penultimate"))
    tap = res.manifest["config"]["taps"]["penultimate"]
    bb = load_backbone(name, "random", seed=0)
    module = dict(bb.model.named_modules())[graph_info(bb.spec).classifier]
    seen: list[torch.Tensor] = []
    hook = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    tf = bb.spec.weights_enum().transforms()
    x = torch.stack([tf(open_rgb(data / p)) for p in fs.column("path")])
    with torch.inference_mode():
        bb.model(x)
    hook.remove()
    want = reduce(seen[-1], tap["reduce"]).flatten(1)
    err = float((got - want).norm() / want.norm().clamp_min(1e-12))
    train, evals = get_graph_node_names(bb.model, suppress_diff_warning=True)
    return {"name": name, "ok": err <= 1e-4, "dim": int(got.shape[1]), "node": tap["node"], "reduce": tap["reduce"],
            "rel_err": err, "extract_s": round(t_extract, 2), "s": round(time.perf_counter() - t, 2),
            "graphs_differ": set(train) != set(evals)}


def main() -> None:
    import torchvision

    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = a.names or torchvision.models.list_models(module=torchvision.models)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = photos(Path(tmp) / "photos", a.images)
        for name in names:
            try:
                r = check(name, data, Path(tmp) / "cache")
            except Exception as e:  # noqa: BLE001 - a failure is what this script reports
                r = {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:300],
                     "trace": traceback.format_exc(limit=3)}
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "trace"}), flush=True)
            gc.collect()
    ok = [r for r in results if r["ok"]]
    print(f"{len(ok)} of {len(results)} backbones extract at penultimate and match the classifier's input to 1e-4; "
          f"failures: {', '.join(r['name'] for r in results if not r['ok']) or 'none'}", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print("max relative difference:", max((r.get("rel_err", 0.0) for r in ok), default=float("nan")),
          "; graphs that differ in train mode:", [r["name"] for r in results if r.get("graphs_differ")],
          file=sys.stderr)


if __name__ == "__main__":
    main()
