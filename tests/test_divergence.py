"""Fine-tuning never diverges silently: the defaults train from every head kind and unfreeze strategy, and a
forced divergence (a non-finite loss, or a finite one that explodes) either recovers at a lower learning rate or
stops with one line and a non-zero exit."""
from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli

import featx.finetune as ft
import featx.finetune.guard as guard
from featx.errors import DivergenceError
from featx.extract import extract
from featx.finetune import CHECKPOINT, backbone_lr_scale, finetune, load_checkpoint
from featx.fit import fit_head
from featx.model import build_from_head

# Few images but enough steps to diverge: with these 18 train images and 4 per step, the code before the fix went
# to NaN within 2 epochs from every head kind with --unfreeze all.  Every optimisation option is the default.
RUN = dict(epochs=2, batch_size=4, workers=0, progress=False)
# how fine-tuning trained before the demo's collapse was fixed: the backbone's lr not scaled, its dropout on
OLD_WAY = dict(scale_backbone_lr=False, backbone_dropout=True)
# The demo's head is a logreg with C=1 fit on 1,349 train rows; on these 18, C=75 regularizes each row as much.
DEMO_C = 75.0


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """30 digits of 3 classes (18 train, 6 val, 6 test), random weights, pool5 and fc7."""
    from featx.datasets.digits import write_digits

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
    heads["demo", "fc7"] = fit_head(fs.path, "logreg", layer="fc7", params={"C": DEMO_C}, cache=cache).path
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
    # ... and far from the explosion limits, which cannot fire on such training: the largest 5-step mean loss
    # stays under a third of 10 x max(log k, the epoch's first loss), each validation loss under half of
    # 3 x max(log k, the one before)
    prev = m["initial_val_loss"]
    for h in m["curve"]:
        assert h["train_loss_peak"] < h["train_loss_limit"] / 3, h
        assert h["val_loss"] < ft.VAL_EXPLODE_FACTOR * max(math.log(3), prev) / 2, (h, prev)
        prev = h["val_loss"]


def test_defaults_train_stably_from_an_mlp_head_with_everything_unfrozen(small, tmp_path):
    # the case: before the fix, train loss nan in both epochs and "fine-tuned ... best epoch 0"
    m = finetune(small.heads["mlp", "pool5"], cache=tmp_path, **RUN).metrics
    _check_stable(m)
    assert m["curve"][-1]["train_loss"] < m["curve"][0]["train_loss"], [h["train_loss"] for h in m["curve"]]
    assert all(h["grad_norm_max"] is not None and h["grad_norm_max"] < 1e4 for h in m["curve"])


def test_the_demos_collapse_at_small_scale_no_longer_happens(small, tmp_path):
    # make demo: a 97.8% fc7 logreg head (random weights, standard scaling) fine-tuned with every default and
    # --unfreeze all fell to chance (val accuracy 0.10, val loss 108) with finite losses, so nothing fired, and
    # "fine-tuned ... best epoch 0" was printed.  The same pattern on 18 train images, before the fix: val
    # accuracy 1.0 -> 0.33 (chance) and val loss 0.03 -> 3.9 after one epoch.
    m = finetune(small.heads["demo", "fc7"], unfreeze="all", cache=tmp_path, **{**RUN, "epochs": 1}).metrics
    assert m["recoveries"] == []  # stable by itself, not rescued by the guard
    h = m["curve"][0]
    assert h["val_accuracy"] >= m["initial_val_accuracy"] - 1 / 6, h  # at most one of the 6 val images lost
    assert h["val_loss"] < math.log(3), h  # nowhere near chance level
    assert m["test_accuracy"] >= m["head_test_accuracy"] - 1 / 6
    # what fixed it: the backbone learns at lr x 0.1 x s^2 (s ~ 1e-3 here), with its dropout off
    assert m["options"]["scale_backbone_lr"] is True and m["options"]["backbone_dropout"] is False
    assert 0 < m["feature_spread"] < 0.05 and m["backbone_lr_scale"] == pytest.approx(m["feature_spread"] ** 2)
    assert h["backbone_lr"] == pytest.approx(1e-3 * 0.1 * m["backbone_lr_scale"])


def test_backbone_lr_scale_is_the_square_of_the_spread_up_to_one():
    assert backbone_lr_scale(1e-3) == pytest.approx(1e-6)
    assert backbone_lr_scale(0.5) == pytest.approx(0.25)
    assert backbone_lr_scale(3.0) == backbone_lr_scale(1.0) == 1.0  # features that vary by 1 or more: unchanged
    assert backbone_lr_scale(None) == backbone_lr_scale(0.0) == backbone_lr_scale(float("nan")) == 1.0


def test_backbone_dropout_is_off_while_training_unless_asked_for(small):
    hm = build_from_head(small.heads["mlp", "fc7"], envelope=True)
    net = hm.net
    drops = [m for g in net.groups for m in g.modules if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 2  # AlexNet's, before fc6 and fc7
    net.set_trainable(set(range(len(net.groups))), dropout=False)
    assert not any(m.training for m in drops)
    assert net.head.training and any(isinstance(m, torch.nn.Dropout) and m.training for m in net.head.modules())
    net.set_trainable(set(range(len(net.groups))), dropout=True)
    assert all(m.training for m in drops)
    # the spread is measured in the same pass as the envelope: the median train std of the varying features
    assert 0 < hm.feature_spread < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["svm", "logreg", "mlp"])
@pytest.mark.parametrize("unfreeze, layer", [("head", "pool5"), ("last:2", "pool5"), ("all", "pool5"),
                                             ("gradual", "pool5"), ("fc", "fc7"), ("all", "fc7")])
def test_defaults_train_stably_from_every_head_and_strategy(small, kind, unfreeze, layer, tmp_path):
    _check_stable(finetune(small.heads[kind, layer], unfreeze=unfreeze, cache=tmp_path, **RUN).metrics)


def test_forced_divergence_recovers_at_a_lower_learning_rate(small, tmp_path, monkeypatch, caplog):
    # lr 1e20 goes to NaN at the second step; the retries are narrowed to x1e-10 to keep the test short
    monkeypatch.setattr(guard, "RECOVER_FACTOR", 1e-10)
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


def test_an_exploding_finite_loss_recovers_at_a_lower_learning_rate(small, tmp_path, caplog, monkeypatch):
    # the old way at lr 1: finite losses, but their mean reaches ~150 by step 2 (the first step's was 0.3): the
    # step is stopped before it is taken, the epoch restarts from its first weights at 1e-6 x the learning rate
    monkeypatch.setattr(guard, "RECOVER_FACTOR", 1e-6)
    m = finetune(small.heads["demo", "fc7"], unfreeze="fc", lr=1.0, recover=2, cache=tmp_path,
                 **{**RUN, "epochs": 1}, **OLD_WAY).metrics
    rec = m["recoveries"]
    assert len(rec) == 1 and rec == m["curve"][0]["recoveries"], rec
    r = rec[0]
    assert r["epoch"] == 1 and r["step"] >= 2 and r["what"].startswith("the training loss (mean of the last")
    assert math.isfinite(float(r["value"])) and float(r["value"]) > r["limit"] >= 10 * math.log(3)
    assert r["lr_before"] == 1.0 and r["lr_after"] == pytest.approx(1e-6)
    h = m["curve"][0]
    assert h["val_accuracy"] >= m["initial_val_accuracy"] - 1 / 6 and h["val_loss"] < math.log(3)
    assert "the training loss (mean of the last" in caplog.text and "retrying it at 1e-06 x" in caplog.text


def test_a_collapse_seen_at_evaluation_stops_with_one_line(small, tmp_path):
    # the old way at lr 0.01: the training losses stay under their limit, but the network ends the epoch at
    # chance with a validation loss of ~21 (it started at 0.03): that is divergence too, and with no retry
    # allowed the run stops with one line (the CLI's exit 2: the test above), having written no model
    with pytest.raises(DivergenceError) as e:
        finetune(small.heads["demo", "fc7"], unfreeze="all", lr=0.01, recover=0, cache=tmp_path,
                 **{**RUN, "epochs": 1}, **OLD_WAY)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("fine-tuning diverged: the validation loss was "), msg
    assert "above" in msg and "epoch 1, its evaluation" in msg and "no epoch had finished" in msg, msg
    assert "without --no-scale-backbone-lr and --backbone-dropout" in msg, msg  # what to change first
    out = next((tmp_path / "models").iterdir())
    for f in ("metrics.json", "model.pt", "model.json", CHECKPOINT):
        assert not (out / f).exists(), f


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
