"""Fine-tuning never diverges silently: the defaults train from every head kind and unfreeze strategy, and a
forced divergence either recovers at a lower learning rate or stops with one line and a non-zero exit."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import featx.finetune as ft
from conftest import run_cli
from featx.errors import DivergenceError
from featx.extract import extract
from featx.finetune import CHECKPOINT, finetune, load_checkpoint
from featx.fit import fit_head

# Few images but enough steps to diverge: with these 18 train images and 4 per step, the code before the fix went
# to NaN within 2 epochs from every head kind with --unfreeze all.  Every optimisation option is the default.
RUN = dict(epochs=2, batch_size=4, workers=0, progress=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """30 digits of 3 classes (18 train, 6 val, 6 test), random weights, pool5 and fc7."""
    from featx.demo import write_digits

    root = tmp_path_factory.mktemp("div")
    full = write_digits(root / "all", limit=150)
    data = root / "data"
    for c in range(3):
        (data / str(c)).mkdir(parents=True)
        for p in sorted((full / str(c)).glob("*.png"))[:10]:
            shutil.copy(p, data / str(c) / p.name)
    cache = root / "cache"
    fs = extract(data, layers=["pool5", "fc7"], split="test=0.2,val=0.2", cache=cache, weights="random", seed=0,
                 workers=0, batch_size=20, progress=False)
    heads = {(k, layer): fit_head(fs.path, k, layer=layer, cache=cache).path
             for k in ("svm", "logreg", "mlp") for layer in ("pool5", "fc7")}
    return SimpleNamespace(cache=cache, heads=heads)


def _check_stable(m: dict) -> None:
    head_acc = m["head_test_accuracy"]
    assert abs(m["initial_test_accuracy"] - head_acc) <= 0.01, (m["initial_test_accuracy"], head_acc)
    for h in m["curve"]:
        for k in ("train_loss", "val_loss", "test_loss"):
            # finite and nowhere near an explosion: the stable runs stay below 7, the code before the fix had
            # train losses of 10-750 in epoch 1 on these images before reaching nan
            assert math.isfinite(h[k]) and h[k] < 25, (k, h)
    assert m["recoveries"] == []  # stable without the guard's help


def test_defaults_train_stably_from_an_mlp_head_with_everything_unfrozen(small, tmp_path):
    # the case: before the fix, train loss nan in both epochs and "fine-tuned ... best epoch 0"
    m = finetune(small.heads["mlp", "pool5"], cache=tmp_path, **RUN).metrics
    _check_stable(m)
    assert m["curve"][-1]["train_loss"] < m["curve"][0]["train_loss"], [h["train_loss"] for h in m["curve"]]
    assert all(h["grad_norm_max"] is not None and h["grad_norm_max"] < 1e4 for h in m["curve"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["svm", "logreg", "mlp"])
@pytest.mark.parametrize("unfreeze, layer", [("head", "pool5"), ("last:2", "pool5"), ("all", "pool5"),
                                             ("gradual", "pool5"), ("fc", "fc7")])
def test_defaults_train_stably_from_every_head_and_strategy(small, kind, unfreeze, layer, tmp_path):
    _check_stable(finetune(small.heads[kind, layer], unfreeze=unfreeze, cache=tmp_path, **RUN).metrics)


def test_forced_divergence_recovers_at_a_lower_learning_rate(small, tmp_path, monkeypatch, caplog):
    # lr 1e20 goes to NaN at the second step; the retries are narrowed to x1e-10 to keep the test short
    monkeypatch.setattr(ft, "RECOVER_FACTOR", 1e-10)
    m = finetune(small.heads["logreg", "pool5"], lr=1e20, recover=3, cache=tmp_path,
                 **{**RUN, "epochs": 1, "augment": "none"}).metrics
    rec = m["recoveries"]
    assert 1 <= len(rec) <= 3 and rec == m["curve"][0]["recoveries"]
    assert rec[0]["epoch"] == 1 and rec[0]["value"] in ("nan", "inf", "-inf")
    for r in rec:
        assert r["lr_after"] == pytest.approx(r["lr_before"] * 1e-10)
    assert m["curve"][0]["lr"] == pytest.approx(rec[-1]["lr_after"])
    assert all(math.isfinite(m["curve"][0][k]) for k in ("train_loss", "val_loss", "test_loss"))
    assert "retrying it at" in caplog.text


def test_forced_divergence_gives_up_with_one_line_keeping_the_last_good_checkpoint(small, tmp_path):
    # gradual: epoch 1 trains the head (fine), epoch 2 the top conv at a backbone lr of 1e32 (NaN)
    head = small.heads["logreg", "pool5"]
    r = run_cli("finetune", str(head), "--unfreeze", "gradual", "--backbone-lr-factor", "1e35", "--epochs", "2",
                "--recover", "1", "--batch-size", "4", "--workers", "0", "--augment", "none", "--cache", str(tmp_path))
    assert r.returncode != 0 and r.stdout == ""
    err = [line for line in r.stderr.splitlines() if line.startswith("featx: error:")]
    assert len(err) == 1 and "fine-tuning diverged" in err[0] and "epoch 2" in err[0] and "--lr" in err[0], r.stderr
    assert "Traceback" not in r.stderr and "fine-tuned" not in r.stderr
    assert "retrying it at 0.5 x the learning rate" in r.stderr  # the one retry was made, and said
    out = next((tmp_path / "models").iterdir())
    for f in ("metrics.json", "model.pt", "model.json"):
        assert not (out / f).exists(), f
    assert not list(out.glob(".tmp-*"))
    state = load_checkpoint(out / CHECKPOINT)  # intact (sha256 checked) and of the last good epoch
    assert state["epoch"] == 1 and [h["epoch"] for h in state["history"]] == [1]
    hist = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1] and math.isfinite(hist[0]["train_loss"])


def test_no_retry_allowed_stops_at_the_first_divergence(small, tmp_path):
    with pytest.raises(DivergenceError, match=r"the loss was nan at epoch 1, step 2.*no epoch had finished"):
        finetune(small.heads["logreg", "pool5"], unfreeze="all", lr=1e20, recover=0, cache=tmp_path,
                 **{**RUN, "epochs": 1, "augment": "none"})
    out = next((tmp_path / "models").iterdir())
    assert not (out / CHECKPOINT).exists() and not (out / "metrics.json").exists()


@pytest.mark.parametrize("kw, message", [(dict(clip_grad=0), "--clip-grad"), (dict(clip_grad=-1), "--clip-grad"),
                                         (dict(recover=-1), "--recover")])
def test_bad_guard_options_are_usage_errors(kw, message, tmp_path):
    from featx.errors import UsageError

    with pytest.raises(UsageError, match=message):
        finetune(tmp_path / "no-head", **kw)


def test_clip_grad_caps_every_step(small, tmp_path):
    m = finetune(small.heads["mlp", "pool5"], clip_grad=1.0, cache=tmp_path, **{**RUN, "epochs": 1}).metrics
    h = m["curve"][0]
    assert h["clipped_steps"] >= 1 and h["grad_norm_max"] > 1.0 and m["options"]["clip_grad"] == 1.0
