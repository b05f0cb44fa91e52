"""featx finetune: the head back on its backbone, equal to the head before a step; what trains, what resumes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from featx.cache import sealed
from featx.errors import DataError, IntegrityError, UsageError
from featx.extract import extract
from featx.finetune import (
    CHECKPOINT,
    FinetuneOptions,
    ImageRows,
    finetune,
    load_checkpoint,
    split_rows,
    trainable_groups,
)
from featx.fit import fit_head, load_fitted
from featx.model import build_from_head, load_model
from featx.store import FeatureSet

EXTRACT = dict(weights="random", seed=0, workers=0, batch_size=20)
# the cheapest training that still steps every part: two steps on the tiny set's 9 train images, no augmentation
QUICK: dict[str, Any] = dict(epochs=1, augment="none", batch_size=5, workers=0, schedule="none", progress=False)
CONVS = ["features.0", "features.3", "features.6", "features.8", "features.10"]


class _Stop(Exception):
    """Raised from on_epoch: the run ends there as a killed one would, its checkpoint written."""


@pytest.fixture(scope="module")
def base(digits_dir, tmp_path_factory):
    """60 digits -> pool5 + fc7 features (38 train, 11 val, 11 test) -> logreg heads on each layer."""
    cache = tmp_path_factory.mktemp("ft-cache")
    fs = extract(digits_dir, layers=["pool5", "fc7"], split="test=0.2,val=0.2", cache=cache, **EXTRACT)
    assert set(fs.manifest["counts"]) == {"train", "val", "test"}
    pool5 = fit_head(fs.path, "logreg", layer="pool5", cache=cache)
    fc7 = fit_head(fs.path, "logreg", layer="fc7", cache=cache)
    return SimpleNamespace(cache=cache, features=fs.path, pool5=pool5.path, fc7=fc7.path, data=digits_dir,
                           counts=fs.manifest["counts"])


def _mini_digits(src: Path, dest: Path, classes: int, per_class: int) -> Path:
    for c in range(classes):
        (dest / str(c)).mkdir(parents=True)
        for p in sorted((src / str(c)).glob("*.png"))[:per_class]:
            shutil.copy(p, dest / str(c) / p.name)
    return dest


@pytest.fixture(scope="module")
def tiny(digits_dir, tmp_path_factory):
    """15 digits of 3 classes (9 train, 3 val, 3 test) -> pool5 -> logreg: for what trains and what resumes."""
    root = tmp_path_factory.mktemp("ft-tiny")
    data = _mini_digits(digits_dir, root / "data", 3, 5)
    fs = extract(data, split="test=0.2,val=0.2", cache=root / "c", **EXTRACT)
    assert fs.manifest["counts"] == {"train": 9, "val": 3, "test": 3}
    return fit_head(fs.path, "logreg", cache=root / "c").path


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def _conv_params(*names: str) -> set[str]:
    # a pool5 head's backbone is Sequential(Sequential(features, avgpool, flatten)): features.i -> backbone.0.0.i
    return {f"backbone.0.0.{n.split('.')[1]}.{w}" for n in names for w in ("weight", "bias")}


# --------------------------------------------------------------------------------- the network before a step

@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_initial_accuracy_is_the_heads_and_the_output_loads_without_pickles(base, kind, tmp_path):
    head = base.pool5 if kind == "logreg" else fit_head(base.features, "mlp", layer="pool5", cache=base.cache).path
    head_acc = json.loads((head / "metrics.json").read_text())["test_accuracy"]
    res = finetune(head, unfreeze="head", cache=tmp_path, **{**QUICK, "batch_size": 20})
    m = res.metrics
    assert res.computed and res.path.parent == tmp_path / "models"
    assert abs(m["initial_test_accuracy"] - head_acc) <= 0.01, (m["initial_test_accuracy"], head_acc)
    assert m["head_test_accuracy"] == head_acc and m["images"] == base.counts
    for k in ("test_accuracy", "best_epoch", "curve", "per_class_accuracy", "confusion_matrix", "train_images_per_s"):
        assert k in m, k
    assert np.asarray(m["confusion_matrix"]).sum() == base.counts["test"] and m["train_images_per_s"] > 0
    assert m["validation"] == "val split" and m["best_epoch"] in (0, 1)
    hist = [json.loads(line) for line in (res.path / "history.jsonl").read_text().splitlines()]
    assert hist == m["curve"] and [h["epoch"] for h in hist] == [1]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy"} <= set(hist[0])
    assert (res.path / "curve.png").stat().st_size > 0 and (res.path / "confusion.png").stat().st_size > 0
    assert not (res.path / CHECKPOINT).exists()  # tidied up once the model is written
    # tensors only: a pickle that needs any code would be refused here
    state = torch.load(res.path / "model.pt", map_location="cpu", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    meta = json.loads((res.path / "model.json").read_text())
    assert meta["backbone"] == "alexnet" and meta["layer"] == "pool5" and meta["weights"]["kind"] == "random"
    assert meta["classes"] == [str(i) for i in range(10)] and meta["scaler"]["kind"] == "standard"
    net, _ = load_model(res.path)
    assert set(net.state_dict()) == set(state)
    assert all(torch.equal(net.state_dict()[k], state[k]) for k in state)
    again = finetune(head, unfreeze="head", cache=tmp_path, **{**QUICK, "batch_size": 20})
    assert not again.computed and again.path == res.path


def test_backbone_output_is_the_feature_set_and_logits_the_heads(base):
    hm = build_from_head(base.fc7)
    fs = FeatureSet(base.features)
    test = fs.mask("test")
    paths, X = fs.column("path")[test][:4], fs.load("fc7", "test")[:4]
    from featx.datasets import open_rgb

    x = torch.stack([hm.preprocess.transform(open_rgb(base.data / p)) for p in paths])
    with torch.inference_mode():
        feats = hm.net.backbone(x)
        logits = hm.net(x)
    assert float((feats - torch.from_numpy(X)).norm() / torch.from_numpy(X).norm()) <= 1e-4
    fh = load_fitted(base.fc7)
    expected = fh.estimator.predict(fh.scaler.transform_(X.copy()))
    assert np.array_equal(np.asarray(fh.estimator.classes_)[logits.argmax(1).numpy()], expected)


# --------------------------------------------------------------------------------- what trains

@pytest.mark.parametrize("unfreeze, backbone", [
    ("head", set()),
    ("last:1", _conv_params("features.10")),
    ("all", _conv_params(*CONVS)),
])
def test_one_epoch_changes_exactly_the_unfrozen_parts(tiny, unfreeze, backbone, tmp_path):
    before = _state(build_from_head(tiny).net)
    after = {}

    def grab(epoch, net, rec):
        after.update(_state(net))

    # the backbone's lr unscaled: with random weights it is otherwise x ~1e-5 (docs/finetune.md), and the steps of
    # some conv biases round to nothing in float32; what trains is the question here, not how far
    finetune(tiny, unfreeze=unfreeze, cache=tmp_path, on_epoch=grab, scale_backbone_lr=False, **QUICK)
    changed = _changed(before, after)
    head = {k for k in before if k.startswith("head.")}
    assert head and head <= changed
    assert changed - head == backbone
    assert not any(k.startswith("scale.") for k in changed)  # the feature scaling is fixed


def test_gradual_starts_with_the_head_then_unfreezes_from_the_top(tiny, tmp_path):
    states = [_state(build_from_head(tiny).net)]
    res = finetune(tiny, unfreeze="gradual", gradual_every=1, cache=tmp_path,
                   on_epoch=lambda e, net, rec: states.append(_state(net)), **{**QUICK, "epochs": 2})
    steps = [_changed(a, b) - {k for k in a if k.startswith("head.")} for a, b in zip(states, states[1:])]
    assert steps == [set(), _conv_params("features.10")]
    assert [h["unfrozen"] for h in res.metrics["curve"]] == [[], ["features.10"]]


def test_strategies_modes_and_groups_on_an_fc7_head(base):
    net = build_from_head(base.fc7).net
    g = net.groups
    assert [x.name for x in g] == CONVS + ["classifier.1", "classifier.4"]
    assert trainable_groups(g, ("head", 0), 1, 1) == trainable_groups(g, ("none", 0), 1, 1) == set()
    assert trainable_groups(g, ("fc", 0), 1, 1) == {5, 6}
    assert trainable_groups(g, ("last", 3), 1, 1) == {4, 5, 6}
    assert trainable_groups(g, ("last", 99), 1, 1) == trainable_groups(g, ("all", 0), 1, 1) == set(range(7))
    assert [len(trainable_groups(g, ("gradual", 0), e, 2)) for e in range(1, 8)] == [0, 0, 1, 1, 2, 2, 3]
    pool5 = build_from_head(base.pool5).net.groups
    assert trainable_groups(pool5, ("fc", 0), 1, 1) == set()  # no fully connected layer below pool5: head only
    net.set_trainable({6})
    fc6, fc7 = g[5], g[6]
    drop6 = next(m for m in fc6.modules if isinstance(m, torch.nn.Dropout))
    drop7 = next(m for m in fc7.modules if isinstance(m, torch.nn.Dropout))
    # fc7 trains: the dropout feeding it is on; fc6 is frozen: its dropout is off, as at extraction
    assert drop7.training and not drop6.training
    assert all(p.requires_grad for p in fc7.parameters()) and not any(p.requires_grad for p in fc6.parameters())
    assert all(p.requires_grad for p in net.head.parameters()) and net.head.training
    assert not any(p.requires_grad for g in net.groups[:5] for p in g.parameters())


# --------------------------------------------------------------------------------- checkpoints and resume

def test_killed_run_resumes_from_its_checkpoint_and_equals_an_uninterrupted_one(tiny, tmp_path):
    kw = dict(epochs=3, unfreeze="last:1", augment="flip,crop", schedule="step", step_size=2, batch_size=5,
              progress=False)
    seen = []

    def stop_after_first(epoch, net, rec):
        out = next((tmp_path / "a" / "models").iterdir())
        assert load_checkpoint(out / CHECKPOINT)["epoch"] == epoch  # a checkpoint per epoch, before the callback
        assert len((out / "history.jsonl").read_text().splitlines()) == epoch
        seen.append(epoch)
        if epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        finetune(tiny, cache=tmp_path / "a", workers=0, on_epoch=stop_after_first, **kw)
    out = next((tmp_path / "a" / "models").iterdir())
    assert not (out / "metrics.json").exists() and (out / CHECKPOINT).exists()
    # the same call again continues after epoch 1 (with another number of decode workers: the same draws)
    resumed = finetune(tiny, cache=tmp_path / "a", workers=1, on_epoch=stop_after_first, **kw)
    assert seen == [1, 2, 3] and resumed.computed and resumed.path == out
    ref = finetune(tiny, cache=tmp_path / "b", workers=0, **kw)
    a, b = resumed.metrics["curve"], ref.metrics["curve"]
    assert [h["epoch"] for h in a] == [h["epoch"] for h in b] == [1, 2, 3]
    # the step schedule counts epochs: a resumed run that lost its scheduler would not decay after epoch 2
    assert [h["lr"] for h in a] == [h["lr"] for h in b] == pytest.approx([1e-3, 1e-3, 1e-4])
    for key in ("train_loss", "train_accuracy", "val_loss", "test_loss", "test_accuracy"):
        assert [h[key] for h in a] == pytest.approx([h[key] for h in b], rel=1e-5), key
    assert resumed.metrics["best_epoch"] == ref.metrics["best_epoch"]
    sa = torch.load(out / "model.pt", weights_only=True)
    sb = torch.load(ref.path / "model.pt", weights_only=True)
    assert all(torch.allclose(sa[k], sb[k], rtol=1e-5, atol=1e-6) for k in sa)


def test_corrupt_checkpoint_is_detected_and_not_loaded(tiny, tmp_path):
    kw = dict(unfreeze="head", cache=tmp_path, **{**QUICK, "epochs": 2})

    def stop(epoch, net, rec):
        raise _Stop

    with pytest.raises(_Stop):
        finetune(tiny, on_epoch=stop, **kw)
    ckpt = next((tmp_path / "models").iterdir()) / CHECKPOINT
    raw = bytearray(ckpt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped bit in the middle of the tensors
    ckpt.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="corrupt.*not loaded"):
        finetune(tiny, **kw)
    assert ckpt.read_bytes() == bytes(raw)  # kept as it is, for the user to look at
    assert not (ckpt.parent / "model.pt").exists()
    ckpt.write_bytes(bytes(raw[:len(raw) // 3]))  # a torn file
    with pytest.raises(IntegrityError, match="corrupt"):
        load_checkpoint(ckpt)
    with pytest.raises(_Stop):  # what the message suggests: start again, which overwrites it after epoch 1
        finetune(tiny, resume=False, on_epoch=stop, **kw)
    assert load_checkpoint(ckpt)["epoch"] == 1


def test_resume_true_without_a_checkpoint_is_a_usage_error(tiny, tmp_path):
    with pytest.raises(UsageError, match="nothing to resume"):
        finetune(tiny, unfreeze="head", resume=True, cache=tmp_path, **QUICK)


# --------------------------------------------------------------------------------- refusals

def test_rbf_svm_head_is_refused(base, tmp_path):
    rbf = fit_head(base.features, "svm", layer="pool5", params={"kernel": "rbf"}, cache=base.cache)
    with pytest.raises(UsageError, match="cannot be fine-tuned"):
        finetune(rbf.path, cache=tmp_path, **QUICK)


def test_missing_images_are_named(digits_dir, tmp_path):
    data = _mini_digits(digits_dir, tmp_path / "d", 2, 4)
    fs = extract(data, split="test=0.25", cache=tmp_path / "c", **EXTRACT)
    head = fit_head(fs.path, "logreg", cache=tmp_path / "c")
    victim = sorted(data.rglob("*.png"))[5]
    victim.unlink()
    with pytest.raises(DataError, match=f"1 of the 8 images.*{victim.name}"):
        finetune(head.path, cache=tmp_path / "c", **QUICK)
    shutil.rmtree(data)
    with pytest.raises(DataError, match="is gone"):
        finetune(head.path, cache=tmp_path / "c", **QUICK)


def test_changed_images_are_named(digits_dir, tmp_path):
    data = _mini_digits(digits_dir, tmp_path / "d", 2, 4)
    fs = extract(data, split="test=0.25", cache=tmp_path / "c", **EXTRACT)
    head = fit_head(fs.path, "logreg", cache=tmp_path / "c")
    victim = sorted(data.rglob("*.png"))[2]
    victim.write_bytes(sorted(data.rglob("*.png"))[6].read_bytes())  # still a valid image, other content
    with pytest.raises(DataError, match=f"1 of the 8 images .* changed since extraction.*{victim.name}"):
        finetune(head.path, cache=tmp_path / "c", **QUICK)


def test_layer_or_backbone_mismatch_is_refused(tiny, tmp_path):
    head = tmp_path / "head"
    shutil.copytree(tiny, head)
    meta_file = head / "featx-head.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(sealed({**meta, "layer": "fc7"})))  # resealed: a consistent head, wrong layer
    with pytest.raises(DataError, match="layer/backbone mismatch"):
        finetune(head, cache=tmp_path, **QUICK)
    meta_file.write_text(json.dumps(sealed({**meta, "source": {**meta["source"], "backbone": "vgg16"}})))
    with pytest.raises(DataError, match="another backbone"):
        finetune(head, cache=tmp_path, **QUICK)


@pytest.mark.parametrize("kw, message", [
    ({"unfreeze": "last:0"}, "last:N"),
    ({"unfreeze": "some"}, "none, head, fc, all, gradual or last:N"),
    ({"augment": "crop,sixview"}, "two ways of cropping"),
    ({"augment": "rotate"}, "flip"),
    ({"optimizer": "rmsprop"}, "sgd or adam"),
    ({"schedule": "linear"}, "step, plateau, cosine"),
    ({"epochs": 0}, "at least 1 epoch"),
    ({"early_stop": 0}, "early-stop"),
])
def test_bad_options_are_usage_errors(kw, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        finetune(tmp_path / "no-head", **{**QUICK, **kw})


def test_validation_is_held_out_of_train_never_test():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30)
    splits = np.where(rng.random(90) < 0.2, "test", "train")
    rows = ImageRows(Path("/data"), [f"{i:03d}.png" for i in range(90)], labels, splits)
    parts, source = split_rows(rows, seed=0)
    assert "held out" in source
    train, val, test = (set(parts[s][0]) for s in ("train", "val", "test"))
    assert test == {Path("/data") / p for p, s in zip(rows.paths, splits) if s == "test"}
    assert val and not val & train and not val & test and len(train) + len(val) == int((splits == "train").sum())
    assert set(parts["val"][1].tolist()) == {0, 1, 2}  # stratified: every class is validated


# --------------------------------------------------------------------------------- options and keys

# a stand-in head's identity: its files' sha256 and its feature set's key (what a model's key hashes of the head)
HEAD_META = {"files": {"featx-head.json": "0" * 64, "estimator.npz": "1" * 64},
             "source": {"key": "feat0123456789abcdef"}}
SOME = dict(epochs=3, unfreeze="Last:2", lr=0.01, optimizer="ADAM", schedule="plateau", plateau_patience=4,
            augment=["crop", "flip", "flip"], batch_size=16, early_stop=2, clip_grad=1.0, recover=1, seed=7, amp=True,
            scale_backbone_lr=False, backbone_dropout=True)


def test_model_keys_are_those_of_existing_caches():
    # the keys that the code which wrote the existing caches gives these options (computed with it): a model
    # already in a cache is found again, not trained twice
    assert FinetuneOptions().model_key(HEAD_META) == "7fa22fab16ec91ecb6b7"
    assert FinetuneOptions(**SOME).model_key(HEAD_META) == "847cf5e1e336386b2253"


def test_options_json_is_canonical_and_says_null_where_an_option_does_not_apply():
    opts = FinetuneOptions(**SOME)
    assert opts.to_json() == {
        "epochs": 3, "unfreeze": "last:2", "lr": 0.01, "backbone_lr_factor": 0.1, "optimizer": "adam",
        "momentum": None, "weight_decay": 0.0005, "schedule": "plateau", "step_size": None, "plateau_patience": 4,
        "gradual_every": None, "augment": ["crop", "flip"], "batch_size": 16, "amp": True, "early_stop": 2,
        "clip_grad": 1.0, "recover": 1, "scale_backbone_lr": False, "backbone_dropout": True}
    assert list(opts.to_json()) == [f.name for f in fields(FinetuneOptions) if f.name != "seed"]  # the saved order
    same = FinetuneOptions(**{**SOME, "unfreeze": "last:2", "optimizer": "adam", "augment": "flip,crop"})
    assert same == opts and same.model_key(HEAD_META) == opts.model_key(HEAD_META)
    assert replace(opts, seed=8).to_json() == opts.to_json() and replace(opts, seed=8).model_key(HEAD_META) != \
        opts.model_key(HEAD_META)
    assert opts.strategy == ("last", 2) and opts.augments == {"crop", "flip"}
    with pytest.raises(UsageError, match="--batch-size 'many': give a whole number"):
        FinetuneOptions(batch_size="many")


def test_the_options_object_and_keywords_name_one_model(tiny, tmp_path):
    a = finetune(tiny, FinetuneOptions(epochs=2, unfreeze="head"), cache=tmp_path, plan=True)
    b = finetune(tiny, epochs=2, unfreeze="head", cache=tmp_path, plan=True)
    c = finetune(tiny, FinetuneOptions(epochs=1, unfreeze="all"), epochs=2, unfreeze="head", cache=tmp_path, plan=True)
    assert a.path == b.path == c.path and not a.cached
    assert finetune(tiny, FinetuneOptions(epochs=3), cache=tmp_path, plan=True).path != a.path
    with pytest.raises(TypeError, match="'epochz'"):
        finetune(tiny, epochz=2, cache=tmp_path, plan=True)


# --------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_kill_9_then_the_same_call_finishes(tiny, tmp_path):
    """A real SIGKILL right after epoch 1's checkpoint; the same call in a new process finishes the run."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from featx.finetune import finetune
        kill = sys.argv[1] == "kill"
        def cb(epoch, net, rec):
            if kill and epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        r = finetune({str(tiny)!r}, epochs=2, unfreeze="head", augment="flip", batch_size=5, workers=1,
                     cache={str(tmp_path)!r}, progress=False, on_epoch=cb)
        print(r.path)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, "-c", script, "kill"], capture_output=True, text=True, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    out = next((tmp_path / "models").iterdir())
    assert load_checkpoint(out / CHECKPOINT)["epoch"] == 1
    done = subprocess.run([sys.executable, "-c", script, "go"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip().splitlines()[-1]) == out
    m = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in m["curve"]] == [1, 2] and not (out / CHECKPOINT).exists()


@pytest.mark.slow
def test_weights_file_is_reloaded_and_checked(digits_dir, tmp_path):
    from featx.backbones import load_backbone

    wfile = tmp_path / "w.pt"
    torch.save(load_backbone("alexnet", "random", seed=3).model.state_dict(), wfile)
    fs = extract(digits_dir, cache=tmp_path / "c", split="test=0.2", **{**EXTRACT, "weights": str(wfile)})
    head = fit_head(fs.path, "logreg", cache=tmp_path / "c")
    res = finetune(head.path, unfreeze="head", cache=tmp_path / "c", **QUICK)
    assert res.metrics["initial_test_accuracy"] == pytest.approx(head.metrics["test_accuracy"], abs=0.01)
    assert res.metrics["weights"]["kind"] == "file" and res.metrics["validation"].endswith("(seed 0)")
    with open(wfile, "ab") as f:
        f.write(b"\0")
    with pytest.raises(IntegrityError, match="changed since the features were extracted"):
        finetune(head.path, unfreeze="head", cache=tmp_path / "c", **{**QUICK, "epochs": 2})


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epoch(base, tmp_path):
    # a learning rate far too high: validation gets worse after the first epochs and training must stop
    res = finetune(base.pool5, unfreeze="all", lr=0.5, epochs=6, early_stop=2, augment="none", batch_size=10,
                   workers=0, cache=tmp_path, progress=False)
    m = res.metrics
    curve = m["curve"]
    assert m["stopped_early"] and len(curve) < 6
    best = m["best_epoch"]
    vals = [m["initial_val_accuracy"]] + [h["val_accuracy"] for h in curve]
    assert vals[best] == max(vals) and len(curve) - best == 2


def _amp_run(head: Path, cache: Path, device: str) -> dict:
    res = finetune(head, unfreeze="all", cache=cache, amp=True, device=device, **{**QUICK, "batch_size": 3})
    m = res.metrics
    assert res.computed and json.loads((res.path / "model.json").read_text())["options"]["amp"] is True
    assert all(np.isfinite(h["train_loss"]) for h in m["curve"]) and m["train_images_per_s"] > 0
    state = torch.load(res.path / "model.pt", map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())  # weights stay float32
    return m


def test_amp_on_cpu_trains_in_bfloat16(tiny, tmp_path):
    head_acc = json.loads((tiny / "metrics.json").read_text())["test_accuracy"]
    m = _amp_run(tiny, tmp_path, "cpu")
    # autocast changes the arithmetic, so the start matches the head up to bfloat16's rounding (3 test images)
    assert abs(m["initial_test_accuracy"] - head_acc) <= 0.34


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_with_amp_starts_at_the_heads_accuracy_and_loads_on_the_cpu(base, tmp_path):
    head_acc = json.loads((base.pool5 / "metrics.json").read_text())["test_accuracy"]
    exact = finetune(base.pool5, unfreeze="head", cache=tmp_path, device="cuda", **{**QUICK, "workers": 2})
    assert abs(exact.metrics["initial_test_accuracy"] - head_acc) <= 0.01
    m = _amp_run(base.pool5, tmp_path, "cuda")
    assert abs(m["initial_test_accuracy"] - head_acc) <= 0.1
    net, _ = load_model(exact.path)  # a model trained on the GPU loads on the CPU
    assert next(net.parameters()).device.type == "cpu"
