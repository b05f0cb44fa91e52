"""featx predict: from a fine-tuned model or straight from a head; bad images get a reason, never stop the rest."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from featx.cache import sealed, sha256_file
from featx.errors import DataError, IntegrityError, UsageError
from featx.extract import extract
from featx.finetune import finetune
from featx.fit import fit_head, load_fitted
from featx.predict import format_predictions, predict
from featx.store import FeatureSet


@pytest.fixture(scope="module")
def made(digits_dir, tmp_path_factory):
    """18 digits of 3 classes -> pool5 -> logreg and linear SVM heads -> a model fine-tuned for one epoch."""
    root = tmp_path_factory.mktemp("predict")
    data = root / "data"
    for c in range(3):
        (data / str(c)).mkdir(parents=True)
        for p in sorted((digits_dir / str(c)).glob("*.png"))[:6]:
            shutil.copy(p, data / str(c) / p.name)
    cache = root / "c"
    fs = extract(data, split="test=0.34", weights="random", seed=0, workers=0, batch_size=18, cache=cache)
    logreg = fit_head(fs.path, "logreg", cache=cache).path
    svm = fit_head(fs.path, "svm", params={"kernel": "linear"}, cache=cache).path
    model = finetune(logreg, epochs=1, unfreeze="head", augment="none", batch_size=6, workers=0, cache=cache,
                     progress=False)
    return SimpleNamespace(data=data, features=fs.path, logreg=logreg, svm=svm, model=model.path,
                           metrics=model.metrics, bad=_bad_files(root))


def _bad_files(root: Path) -> dict[str, Path]:
    bad = root / "bad"
    bad.mkdir()
    (bad / "text.png").write_text("not an image")
    (bad / "empty.jpg").write_bytes(b"")
    return {"text": bad / "text.png", "empty": bad / "empty.jpg", "missing": bad / "gone.png"}


def _head_predictions(head: Path, features: Path) -> dict[str, str]:
    """What the head itself predicts from the stored features, per image path: the oracle."""
    fh = load_fitted(head)
    fs = FeatureSet(features)
    X = fh.scaler.transform_(fs.load(fh.layer))
    return dict(zip(fs.column("path"), (fh.classes[int(c)] for c in fh.estimator.predict(X))))


def _check_rows(rows: list[dict], classes: list[str], k: int) -> None:
    for r in rows:
        assert r["error"] is None, r
        probs = [t["probability"] for t in r["top_k"]]
        assert len(probs) == k and probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-6 and all(0 <= p <= 1 for p in probs)
        assert r["class"] == r["top_k"][0]["class"] and r["probability"] == probs[0]
        assert {t["class"] for t in r["top_k"]} <= set(classes)


@pytest.mark.parametrize("which", ["logreg", "svm"])
def test_a_head_directory_predicts_what_the_head_predicts(made, which):
    head = getattr(made, which)
    rows = predict(head, [made.data], top_k=2, device="cpu")
    oracle = _head_predictions(head, made.features)
    assert len(rows) == 18 == len(oracle)
    _check_rows(rows, ["0", "1", "2"], 2)
    got = {Path(r["path"]).relative_to(made.data).as_posix(): r["class"] for r in rows}
    assert got == oracle


def test_a_model_directory_predicts_and_bad_images_get_a_reason(made):
    good = sorted(made.data.rglob("*.png"))[:3]
    inputs = [good[0], made.bad["text"], made.bad["missing"], good[1], made.bad["empty"], good[2]]
    rows = predict(made.model, inputs, top_k=5, batch_size=2)
    assert [r["path"] for r in rows] == [str(p) for p in inputs]  # input order, one row each
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"text.png", "gone.png", "empty.jpg"}
    assert errors["gone.png"] == "no such file" and "empty" in errors["empty.jpg"]
    assert "not an image" in errors["text.png"]
    for r in rows:
        if r["error"]:
            assert r["class"] is None and r["top_k"] == []
    ok = [r for r in rows if not r["error"]]
    _check_rows(ok, ["0", "1", "2"], 3)  # top 5 of 3 classes: all three, summing to 1
    assert all(sum(t["probability"] for t in r["top_k"]) == pytest.approx(1, abs=1e-5) for r in ok)
    # the same classes from the head it came from, in the same vocabulary
    from_head = predict(made.logreg, [good[0]], top_k=5)
    assert {t["class"] for t in from_head[0]["top_k"]} == {t["class"] for t in ok[0]["top_k"]}


def test_the_rebuilt_model_measures_what_finetune_measured(made):
    fs = FeatureSet(made.features)
    test = fs.column("path", "test")
    labels = [fs.classes[i] for i in fs.labels("test")]
    rows = predict(made.model, [made.data / p for p in test], top_k=1)
    acc = float(np.mean([r["class"] == y for r, y in zip(rows, labels)]))
    assert acc == pytest.approx(made.metrics["test_accuracy"], abs=1e-9)
    assert made.metrics["initial_test_accuracy"] == pytest.approx(
        json.loads((made.logreg / "metrics.json").read_text())["test_accuracy"], abs=0.01)


def test_predictions_as_csv_and_json(made):
    rows = predict(made.model, [sorted(made.data.rglob("*.png"))[0], made.bad["text"]], top_k=2)
    parsed = list(csv.DictReader(io.StringIO(format_predictions(rows, "csv"))))
    assert [p["path"] for p in parsed] == [r["path"] for r in rows]
    assert parsed[0]["class"] == rows[0]["class"] and parsed[0]["error"] == ""
    assert [t.split(":")[0] for t in parsed[0]["top_k"].split(";")] == [t["class"] for t in rows[0]["top_k"]]
    assert float(parsed[0]["probability"]) == pytest.approx(rows[0]["probability"], abs=1e-6)
    assert parsed[1]["class"] == "" and "not an image" in parsed[1]["error"]
    assert json.loads(format_predictions(rows, "json")) == rows
    with pytest.raises(UsageError, match="csv or json"):
        format_predictions(rows, "xml")


def test_model_files_load_without_code_and_tampering_is_refused(made, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(made.model, copy)
    state = torch.load(copy / "model.pt", weights_only=True)  # a plain state dict: no pickled code
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    with open(copy / "model.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match="modified"):
        predict(copy, [made.data])

    from fractions import Fraction

    # a pickle that needs code to load (a GLOBAL other than torch's), with model.json's sha256 updated to match
    torch.save({"x": Fraction(1, 3)}, copy / "model.pt")
    meta = json.loads((copy / "model.json").read_text())
    meta["files"]["model.pt"] = sha256_file(copy / "model.pt")
    (copy / "model.json").write_text(json.dumps(sealed(meta)))  # resealed: the edit is deliberate
    with pytest.raises(IntegrityError, match="plain state dict"):
        predict(copy, [made.data])


def test_bad_invocations(made, tmp_path):
    with pytest.raises(DataError, match="neither a fine-tuned model"):
        predict(tmp_path, [made.data])
    with pytest.raises(UsageError, match="top-k"):
        predict(made.model, [made.data], top_k=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no images"):
        predict(made.model, [tmp_path / "empty"])


def test_cli_prints_rows_then_keeps_them_in_the_cache(made, tmp_path):
    from conftest import run_cli

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in sorted(made.data.rglob("*.png"))[:3]:
        shutil.copy(p, imgs / p.name)
    shutil.copy(made.bad["text"], imgs / "text.png")
    args = ("predict", str(made.model), str(imgs), "--top-k", "2", "--cache", str(tmp_path / "c"), "--device", "cpu")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    *table, last = r.stdout.strip().splitlines()
    out = Path(last)
    assert out.parent == tmp_path / "c" / "predictions" and (out / "summary.json").is_file()
    rows = list(csv.DictReader(io.StringIO("\n".join(table) + "\n")))
    assert len(rows) == 4 and "not an image" in rows[-1]["error"]
    assert (out / "predictions.csv").read_text().strip() == "\n".join(table)
    assert [x["path"] for x in json.loads((out / "predictions.json").read_text())] == [x["path"] for x in rows]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 4 and summary["n_errors"] == 1 and sum(summary["predicted_per_class"].values()) == 3
    assert r.stderr.count("could not be") == 1 and "Traceback" not in r.stderr

    again = run_cli(*args, "--format", "json")  # same inputs: read back from the cache, same directory
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == last
    assert "already in the cache" in again.stderr and "1 of 4 image(s) could not be classified" in again.stderr
    shown = json.loads("\n".join(again.stdout.strip().splitlines()[:-1]))
    assert [x["class"] or "" for x in shown] == [x["class"] for x in rows]

    shutil.copy(sorted(made.data.rglob("*.png"))[5], imgs / sorted(p.name for p in imgs.iterdir())[0])
    changed = run_cli(*args)  # an image's content changed: new predictions, a new directory
    assert changed.returncode == 0 and changed.stdout.strip().splitlines()[-1] != last
