"""featx fit / evaluate: heads on feature sets and plain HDF5 files, saved, reloaded, measured, refused."""
from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from featx.cli import main
from featx.errors import DataError, IntegrityError, UsageError
from featx.extract import extract
from featx.fit import Scaler, evaluate, fit_head, load_fitted, open_rows


def _blobs(n=400, d=48, k=4, seed=0, sep=2.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * sep
    y = rng.integers(0, k, size=n)
    X = (centers[y] + rng.normal(size=(n, d)) * 3.0 + 5.0).astype(np.float32)
    return X, y.astype(np.int64)


def write_h5(path: Path, X, y, split=None, layer="pool5", bytes_split=False) -> Path:
    with h5py.File(path, "w") as f:
        f[layer] = X
        f["label"] = y
        if split is not None:
            if bytes_split:
                f["split"] = np.asarray([s.encode() for s in split])
            else:
                f.create_dataset("split", data=np.asarray(split, dtype=object), dtype=h5py.string_dtype())
    return path


@pytest.fixture
def h5file(tmp_path) -> Path:
    X, y = _blobs()
    return write_h5(tmp_path / "feats.h5", X, y)


@pytest.mark.parametrize("kind, params", [("svm", {"C": 0.1}), ("logreg", {"C": 1.0}),
                                          ("mlp", {"hidden": 32, "epochs": 15, "patience": 3})])
def test_fit_saves_a_complete_head(kind, params, h5file, tmp_path):
    res = fit_head(h5file, kind, params=params, cache=tmp_path)
    files = {p.name for p in res.path.iterdir()}
    assert {"featx-head.json", "metrics.json", "scaler.npz", "confusion.png", "head.json"} <= files
    if kind == "mlp":
        assert "curve.png" in files and len(res.metrics["curve"]) >= 1
    m = json.loads((res.path / "metrics.json").read_text())
    assert m["test_accuracy"] > 0.8 and m["train_accuracy"] >= m["test_accuracy"] - 0.1
    assert m["rows"]["test"] == 60 and m["rows"]["train"] == 340  # stratified 15% without a recorded split
    assert set(m) >= {"macro_f1", "per_class_accuracy", "confusion_matrix", "fit_seconds", "params", "source", "layer"}
    assert "top5_accuracy" not in m  # only 4 classes
    assert np.sum(m["confusion_matrix"]) == 60
    # the saved head predicts what was measured
    fh = load_fitted(res.path)
    rows = open_rows(h5file, "pool5")
    X = rows.load("test", fh.scaler)
    acc = float(np.mean(fh.estimator.predict(X) == rows.labels[rows.mask("test")]))
    assert acc == pytest.approx(m["test_accuracy"])
    again = fit_head(h5file, kind, params=params, cache=tmp_path)
    assert again.path == res.path and not again.computed


def test_scaler_is_part_of_the_head(h5file, tmp_path):
    res = fit_head(h5file, "logreg", params={"C": 1.0}, cache=tmp_path)
    fh = load_fitted(res.path)
    rows = open_rows(h5file, "pool5")
    Xtr = rows.load("train")
    assert np.allclose(fh.scaler.mean, Xtr.mean(0), atol=1e-4)
    assert np.allclose(fh.scaler.scale, Xtr.std(0), rtol=1e-3)
    l2 = fit_head(h5file, "logreg", params={"C": 1.0}, scale="l2", cache=tmp_path)
    assert l2.path != res.path
    X = load_fitted(l2.path).scaler.transform_(rows.load("test"))
    assert np.allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)


def test_scaling_in_place_holds_one_copy():
    X = np.random.default_rng(0).normal(size=(3000, 1000)).astype(np.float32)
    s = Scaler("standard").fit(X)
    tracemalloc.start()
    s.transform_(X)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.2 * X.nbytes


def test_recorded_split_and_val_rows_are_used(tmp_path):
    X, y = _blobs(n=300)
    split = np.array(["train"] * 200 + ["val"] * 50 + ["test"] * 50)
    f = write_h5(tmp_path / "s.h5", X, y, split, bytes_split=True)
    res = fit_head(f, "mlp", params={"hidden": 16, "epochs": 5}, cache=tmp_path)
    assert res.metrics["rows"] == {"train": 200, "val": 50, "test": 50}


def test_streamed_fit_matches_in_memory(h5file, tmp_path):
    a = fit_head(h5file, "logreg", params={"C": 1.0}, cache=tmp_path / "a", stream=False)
    b = fit_head(h5file, "logreg", params={"C": 1.0}, cache=tmp_path / "b", stream=True)
    assert b.metrics["streamed"] and abs(a.metrics["test_accuracy"] - b.metrics["test_accuracy"]) <= 0.05


def test_fit_on_an_extracted_feature_set(digits_dir, tmp_path):
    fs = extract(digits_dir, layers=["pool5", "fc7"], weights="random", workers=0, cache=tmp_path,
                 split="test=0.3")
    res = fit_head(fs.path, "svm", layer="fc7", params={"C": 1.0}, cache=tmp_path)
    m = res.metrics
    assert m["source"]["key"] == fs.path.name and m["source"]["backbone"] == "alexnet" and m["layer"] == "fc7"
    assert "top5_accuracy" in m and m["top5_accuracy"] >= m["test_accuracy"]
    assert m["rows"]["test"] == fs.manifest["counts"]["test"]
    assert res.path.parent == tmp_path / "heads"


def test_evaluate_refuses_other_weights_and_layers(digits_dir, tmp_path):
    kw = dict(weights="random", workers=0, cache=tmp_path, split="test=0.3")
    a = extract(digits_dir, layers=["pool5", "fc7"], seed=0, **kw)
    b = extract(digits_dir, layers=["pool5", "fc7"], seed=1, **kw)  # other random weights
    c = extract(digits_dir, layers=["pool5", "fc7"], seed=0, normalize="dataset", **kw)
    head = fit_head(a.path, "logreg", layer="fc7", cache=tmp_path)
    ok = evaluate(head.path, a.path, split="test", cache=tmp_path)
    assert ok.metrics["accuracy"] == pytest.approx(head.metrics["test_accuracy"])
    with pytest.raises(DataError, match="another weights"):
        evaluate(head.path, b.path, cache=tmp_path)
    with pytest.raises(DataError, match="another preprocess"):
        evaluate(head.path, c.path, cache=tmp_path)
    pool = extract(digits_dir, layers=["pool5"], seed=0, **kw)
    with pytest.raises(DataError, match="layers present are pool5"):
        evaluate(head.path, pool.path, cache=tmp_path)


def test_tampered_head_is_refused(h5file, tmp_path):
    res = fit_head(h5file, "logreg", cache=tmp_path)
    victim = next(p for p in res.path.iterdir() if p.suffix == ".npz" and p.name != "scaler.npz")
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="modified"):
        load_fitted(res.path)
    r = CliRunner().invoke(main, ["evaluate", str(res.path), str(h5file), "--cache", str(tmp_path)])
    assert r.exit_code == 2 and r.stderr.strip().startswith("featx: error: head") and "Traceback" not in r.stderr


@pytest.mark.parametrize("case, message", [
    ("layer", "layers present are pool5"),
    ("one-class", "only one class"),
    ("nan", "NaN or infinite"),
    ("no-test", "no test rows"),
    ("no-label", "no 'label' dataset"),
])
def test_bad_features_are_one_line(case, message, tmp_path):
    X, y = _blobs(n=120, d=8)
    split = None
    args = []
    if case == "layer":
        args = ["--layer", "fc7"]
    elif case == "one-class":
        y = np.zeros_like(y)
    elif case == "nan":
        X[3, 2] = np.nan
    elif case == "no-test":
        split = ["train"] * 120
    path = write_h5(tmp_path / "f.h5", X, y, split)
    if case == "no-label":
        with h5py.File(path, "a") as f:
            del f["label"]
    r = CliRunner().invoke(main, ["fit", "logreg", str(path), "--cache", str(tmp_path / "c"), *args])
    assert r.exit_code == 2, r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("featx: error: ") and message in last, r.stderr
    assert r.stderr.count("featx: error") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "c" / "heads").exists() or not any((tmp_path / "c" / "heads").iterdir())


def test_cli_fit_prints_the_head_directory(h5file, tmp_path):
    r = CliRunner().invoke(main, ["fit", "svm", str(h5file), "--C", "0.5", "--cache", str(tmp_path)])
    assert r.exit_code == 0, r.stderr
    out = Path(r.stdout.strip().splitlines()[-1])
    assert (out / "featx-head.json").exists() and "test accuracy" in r.stderr
    meta = json.loads((out / "featx-head.json").read_text())
    assert meta["params"]["C"] == 0.5 and meta["kind"] == "svm"


def test_unknown_head_parameter():
    from featx.fit import make_head

    with pytest.raises(UsageError, match="has no parameter 'gamma2'"):
        make_head("logreg", {"gamma2": 1})


def _confusion_png_as_before(cm, classes, path, title):
    """featx.plots.plot_confusion as it was (one Figure, saved with bbox_inches="tight"): the reference."""
    from matplotlib.figure import Figure

    k = len(classes)
    cm = np.asarray(cm, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
    size = min(12.0, 3.0 + 0.35 * k)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 40:
        ax.set_xticks(range(k), [str(c) for c in classes], rotation=90, fontsize=7)
        ax.set_yticks(range(k), [str(c) for c in classes], fontsize=7)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")


@pytest.mark.parametrize("k,long_names", [(2, False), (20, False), (12, True), (45, False)])
@pytest.mark.parametrize("prepared", [False, True], ids=["drawn-at-once", "frame-prepared"])
def test_confusion_plot_draws_the_same_pixels(tmp_path, k, long_names, prepared):
    """The confusion plot's frame is built ahead on the preload thread and saved with the tight bounding box measured
    on it (one draw instead of two): the picture must be the one the single-step drawing made."""
    from PIL import Image

    from featx import plots

    rng = np.random.default_rng(k)
    classes = [f"n0144{i:04d}_a_rather_long_class_name" if long_names else str(i) for i in range(k)]
    cm = rng.integers(0, 5, (k, k)) * (rng.random((k, k)) < 0.3) + np.diag(rng.integers(10, 40, k))
    cm[min(1, k - 1)] = 0  # a class never seen
    title = "svm on pool5: test accuracy 0.883" if k != 2 else "svm on " + "a_very_long_layer_name_" * 4 + ": 0.5"
    _confusion_png_as_before(cm, classes, tmp_path / "before.png", title)
    if prepared:
        plots.preload(classes)
    plots.plot_confusion(cm, classes, tmp_path / "now.png", title=title)
    before, now = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("before", "now"))
    assert before.shape == now.shape and np.array_equal(before, now)
