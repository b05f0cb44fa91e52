"""featx fewshot: k-shot learning curves from cached rows only, seeded draws, exact resume, one-line errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import run_cli

from featx.cache import StagePlan
from featx.cli import main
from featx.errors import DataError, UsageError
from featx.extract import extract
from featx.fewshot import balanced_accuracy, fewshot, read_csv
from featx.store import FeatureSet

SHOTS = [1, 2, 4, 8, 16]
LAYER = "features.12"  # AlexNet's last convolutional block, average-pooled: 256 features per image


@pytest.fixture(scope="module")
def digits_features(tmp_path_factory) -> Path:
    """300 of scikit-learn's digits (about 30 per class) through AlexNet with seeded random weights, 30% test."""
    from featx.demo import write_digits

    root = tmp_path_factory.mktemp("fewshot")
    data = write_digits(root / "digits", limit=300)
    res = extract(data, layers=[LAYER], weights="random", seed=0, split="test=0.3", cache=root / "cache", workers=0,
                  batch_size=32)
    shutil.rmtree(data)  # from here on there is no image to open
    return res.path


def _by_k(draws: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for d in draws:
        out.setdefault(d["k"], []).append(d)
    return out


def test_curve_has_every_draw_the_csv_and_the_plot(digits_features, tmp_path):
    res = fewshot(digits_features, shots=SHOTS, draws=4, head="logreg", layer=LAYER, cache=tmp_path)
    assert res.computed and res.path.parent == tmp_path / "fewshot"
    fs = FeatureSet(digits_features)
    labels, splits = fs.labels(), fs.splits()
    by_k = _by_k(res.draws)
    assert sorted(by_k) == SHOTS
    for k, draws in by_k.items():
        assert [d["draw"] for d in draws] == [0, 1, 2, 3]
        sets = [tuple(d["train_rows"]) for d in draws]
        assert len(set(sets)) == 4  # every draw has its own train rows
        for rows in sets:
            assert len(set(rows)) == len(rows) == 10 * k  # k distinct images of each of the 10 classes
            assert all(splits[r] == "train" for r in rows)
            assert np.bincount(labels[list(rows)], minlength=10).tolist() == [k] * 10
    # the draws are nested in k: draw r's 2-shot images hold its 1-shot ones
    assert set(by_k[1][0]["train_rows"]) <= set(by_k[2][0]["train_rows"]) <= set(by_k[16][0]["train_rows"])
    per_k = {s["k"]: s for s in res.summary["per_k"]}
    for a, b in zip(SHOTS, SHOTS[1:]):  # the mean does not fall as k grows, within the draws' spread
        assert per_k[b]["accuracy_mean"] >= per_k[a]["accuracy_mean"] - max(per_k[a]["accuracy_std"],
                                                                            per_k[b]["accuracy_std"])
    assert per_k[16]["accuracy_mean"] > per_k[1]["accuracy_mean"] + 0.1
    rows = read_csv(res.path / "fewshot.csv")
    assert (res.path / "fewshot.csv").read_text().splitlines()[0] == "k,draw,accuracy,balanced_accuracy"
    assert [(r["k"], r["draw"]) for r in rows] == [(k, d) for k in SHOTS for d in range(4)]
    for k in SHOTS:
        accs = [r["accuracy"] for r in rows if r["k"] == k]
        assert per_k[k]["accuracy_mean"] == pytest.approx(np.mean(accs))
        assert per_k[k]["accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
    assert (res.path / "fewshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    full = res.summary["full"]
    assert full["n_train_rows"] == int((splits == "train").sum()) and 0.5 < full["accuracy"] <= 1.0
    summary = json.loads((res.path / "summary.json").read_text())
    assert summary["shots"] == SHOTS and summary["draws"] == 4 and summary["scale"] == "standard"


def test_same_seed_same_numbers_other_seed_other_draws(digits_features, tmp_path):
    kw = dict(shots="1,4", draws=3, layer=LAYER)
    a = fewshot(digits_features, cache=tmp_path / "a", **kw)
    again = fewshot(digits_features, cache=tmp_path / "a", **kw)
    assert not again.computed and again.path == a.path and again.summary == a.summary
    fresh = fewshot(digits_features, cache=tmp_path / "b", **kw)  # computed anew, elsewhere
    assert fresh.computed and fresh.path.name == a.path.name
    assert (fresh.path / "fewshot.csv").read_bytes() == (a.path / "fewshot.csv").read_bytes()
    assert fresh.summary["per_k"] == a.summary["per_k"]
    other = fewshot(digits_features, cache=tmp_path / "a", seed=1, **kw)
    assert other.path != a.path
    assert [d["train_rows"] for d in other.draws] != [d["train_rows"] for d in a.draws]


def test_a_stopped_run_keeps_its_draws_and_ends_equal(digits_features, tmp_path):
    args = ["fewshot", str(digits_features), "--shots", "1,2", "--draws", "3", "--layer", LAYER,
            "--cache", str(tmp_path / "c")]
    stopped = run_cli(*args, env={"FEATX_STOP_AT": "fewshot.draw:4"})  # the 4th draw: 3 are finished
    assert stopped.returncode == 130 and "interrupted (SIGINT)" in stopped.stderr, stopped.stderr
    out = next((tmp_path / "c" / "fewshot").iterdir())
    assert len(list((out / "draws").glob("*.json"))) == 3 and not (out / "summary.json").exists()
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert Path(resumed.stdout.strip().splitlines()[-1]) == out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["timings"]["fits_now"] == 4  # the 3 remaining draws and the full-data head
    whole = fewshot(digits_features, shots="1,2", draws=3, layer=LAYER, cache=tmp_path / "whole")
    assert (whole.path / "fewshot.csv").read_bytes() == (out / "fewshot.csv").read_bytes()
    assert whole.summary["full"] == summary["full"]


def test_an_edited_draw_is_fitted_again(digits_features, tmp_path):
    kw = dict(shots="1,2", draws=2, layer=LAYER, cache=tmp_path)
    first = fewshot(digits_features, **kw)
    draw = first.path / "draws" / "k0002-d0001.json"
    rec = json.loads(draw.read_text())
    draw.write_text(json.dumps({**rec, "accuracy": 1.0}))  # its digest no longer matches
    (first.path / "summary.json").unlink()
    again = fewshot(digits_features, **kw)
    assert again.computed and again.summary["timings"]["fits_now"] == 1
    assert again.summary["per_k"] == first.summary["per_k"]


def test_never_opens_an_image(digits_features, tmp_path, monkeypatch):
    import PIL.Image

    def refuse(*a, **k):
        raise AssertionError("fewshot opened an image")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    res = fewshot(digits_features, shots="1,2", draws=2, layer=LAYER, cache=tmp_path)
    assert res.computed and len(res.draws) == 4
    manifest = json.loads((digits_features / "manifest.json").read_text())
    assert not Path(manifest["config"]["data"]).exists()  # the images were removed after extraction


def test_bad_input_is_one_line(digits_features, tmp_path):
    fs = FeatureSet(digits_features)
    train = fs.labels()[fs.splits() == "train"]
    n_min = int(np.bincount(train).min())
    smallest = fs.classes[int(np.argmin(np.bincount(train)))]
    with pytest.raises(UsageError, match=f"more than the {n_min} train image\\(s\\) of class '{smallest}'"):
        fewshot(digits_features, shots=[1, n_min + 1], layer=LAYER, cache=tmp_path)
    with pytest.raises(UsageError, match="--shots"):
        fewshot(digits_features, shots="1,two", layer=LAYER, cache=tmp_path)
    with pytest.raises(UsageError, match="--draws"):
        fewshot(digits_features, draws=0, layer=LAYER, cache=tmp_path)
    with pytest.raises(DataError, match="layers present are features.12"):
        fewshot(digits_features, layer="fc7", cache=tmp_path)
    with pytest.raises(UsageError, match="unknown head"):
        fewshot(digits_features, head="knn", layer=LAYER, cache=tmp_path)
    r = CliRunner().invoke(main, ["fewshot", str(digits_features), "--shots", f"1,{n_min + 1}", "--layer", LAYER,
                                  "--cache", str(tmp_path)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("featx: error: --shots")
    assert str(n_min) in r.stderr and repr(smallest) in r.stderr
    assert not (tmp_path / "fewshot").exists()
    r = CliRunner().invoke(main, ["fewshot", str(digits_features), "--layer", "fc7", "--cache", str(tmp_path)])
    assert r.exit_code != 0 and r.stderr.count("\n") == 1 and r.stderr.startswith("featx: "), r.stderr
    assert "layers present are features.12" in r.stderr


def test_a_pipeline_curve_on_an_unknown_backbone_or_layer_is_one_line(tmp_path):
    file = tmp_path / "p.toml"
    file.write_text('[data]\npath = "sklearn:digits"\n[features]\nlayers = ["penultimate"]\n[fewshot.logreg]\n')
    for sets, said in (("features.backbone=\"lenet\"", "key features.backbone: 'lenet' is not a backbone"),
                       ("features.layers=[\"pool9\"]", "key features.layers: 'pool9' is not a layer of alexnet")):
        r = CliRunner().invoke(main, ["run", str(file), "--set", sets, "--dry-run", "--cache", str(tmp_path)])
        assert r.exit_code != 0 and r.stderr.count("\n") == 1 and r.stderr.startswith("featx: "), r.stderr
        assert said in r.stderr


def test_features_without_a_test_split(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f["pool5"] = rng.normal(size=(40, 6)).astype(np.float32)
        f["label"] = np.repeat(np.arange(4), 10)
        f.create_dataset("split", data=np.asarray(["train"] * 40, dtype=object), dtype=h5py.string_dtype())
    with pytest.raises(DataError, match="no test rows"):
        fewshot(path, shots="1", cache=tmp_path)
    r = CliRunner().invoke(main, ["fewshot", str(path), "--shots", "1", "--cache", str(tmp_path)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "no test rows" in r.stderr


def test_views_are_drawn_with_their_image(tmp_path):
    """k counts images: an image's rows (its views) are drawn together."""
    rng = np.random.default_rng(0)
    n_img, views = 24, 2
    y_img = np.arange(n_img) % 3
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        f["pool5"] = (rng.normal(size=(n_img * views, 5)) + np.repeat(y_img, views)[:, None]).astype(np.float32)
        f["label"] = np.repeat(y_img, views)
        split = ["test" if i % 4 == 3 else "train" for i in range(n_img) for _ in range(views)]
        f.create_dataset("split", data=np.asarray(split, dtype=object), dtype=h5py.string_dtype())
        paths = [f"{y_img[i]}/img{i}.png" for i in range(n_img) for _ in range(views)]
        f.create_dataset("path", data=np.asarray(paths, dtype=object), dtype=h5py.string_dtype())
    res = fewshot(path, shots="1,3", draws=2, cache=tmp_path)
    stored = FeatureSet(path).column("path")
    for d in res.draws:
        rows = d["train_rows"]
        assert len(rows) == 3 * d["k"] * views
        assert len({stored[r] for r in rows}) == 3 * d["k"]  # k images per class, each with both its views
    with pytest.raises(UsageError, match="more than the 6 train image"):
        fewshot(path, shots="7", cache=tmp_path)


def test_plan_says_where_and_whether_done(digits_features, tmp_path):
    p = fewshot(digits_features, shots="1", draws=2, layer=LAYER, cache=tmp_path, plan=True)
    assert isinstance(p, StagePlan) and not p.cached and not p.path.exists()
    res = fewshot(digits_features, shots="1", draws=2, layer=LAYER, cache=tmp_path)
    again = fewshot(digits_features, shots="1", draws=2, layer=LAYER, cache=tmp_path, plan=True)
    assert isinstance(again, StagePlan) and again.cached and again.path == res.path


def test_cli_prints_the_directory_last(digits_features, tmp_path):
    r = CliRunner().invoke(main, ["fewshot", str(digits_features), "--shots", "1,2", "--draws", "2", "--layer", LAYER,
                                  "--head", "svm", "--C", "0.1", "--cache", str(tmp_path)])
    assert r.exit_code == 0, r.stderr
    out = Path(r.stdout.strip().splitlines()[-1])
    assert out.parent == tmp_path / "fewshot" and (out / "fewshot.png").is_file()
    assert "k=2: accuracy" in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["head"] == "svm" and summary["params"]["C"] == 0.1


def test_balanced_accuracy_is_scikit_learns():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(1)
    y = rng.integers(0, 5, size=200)
    pred = np.where(rng.random(200) < 0.6, y, rng.integers(0, 5, size=200))
    assert balanced_accuracy(y, pred, 6) == pytest.approx(balanced_accuracy_score(y, pred))
