"""``featx finetune``: a fitted head put back on its backbone and trained end to end.

:func:`featx.model.build_from_head` rebuilds the network that made the head's features with the head on top::

    images -> truncated(backbone, layer) -> fixed feature scaling -> head.to_torch() -> logits

which, before any step, classifies the test images exactly as the head classified their features (recorded as
``initial_test_accuracy`` beside the head's own ``head_test_accuracy``).  The images come from the source
feature set: its data root and, in the shards, every image's path, label and split.

Training is resumable the way extraction is: after every epoch a checkpoint (model, optimizer, scheduler, best
state, history) is written atomically with its sha256 embedded, and the same call run again continues from it.
Every random draw of an epoch (shuffle, augmentation, dropout) is derived from ``(seed, epoch)`` and, for an
augmented image, from its index too, so a resumed run repeats exactly what the uninterrupted one would have done,
whatever the number of decode workers.  The output, ``<cache>/models/<key>/``, loads without running code
(``model.pt`` is a plain state dict read with ``torch.load(weights_only=True)``; ``model.json`` describes the
architecture; :func:`featx.model.load_model`).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch import nn
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

import featx
from featx import distributed, interrupt
from featx.backbones import Preprocess
from featx.cache import (
    StagePlan,
    atomic_write_bytes,
    atomic_write_json,
    cache_root,
    hash_key,
    read_json,
    sha256_file,
    write_command,
)
from featx.curves import EventLog
from featx.datasets import DEFAULT_MAX_PIXELS, BadImage, open_rgb
from featx.errors import DataError, DivergenceError, IntegrityError, UsageError
from featx.fit import load_fitted, metrics_for
from featx.model import (
    MODEL_FILE,
    MODEL_FORMAT,
    MODEL_META,
    FinetuneNet,
    Group,
    HeadModel,
    build_from_head,
    finetune_command,
    model_json,
    model_problem,
)

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
HISTORY = "history.jsonl"
UNFREEZE_HELP = "none, head, fc, all, gradual or last:N"
AUGMENTS = ("none", "flip", "crop", "resized-crop", "jitter", "sixview")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("step", "plateau", "cosine", "none")
VAL_FRACTION = 0.1  # of each class's train images, held out for model selection when the data has no val split
RECOVER_FACTOR = 0.5  # a diverged epoch is retried at this times the learning rate
# A finite loss that explodes is treated as divergence too (docs/finetune.md, "the guard").  Training: the mean
# loss of the last EXPLODE_WINDOW steps above EXPLODE_FACTOR x the larger of chance level (log k, the loss of a
# uniform guess) and the epoch's first step's loss.  Evaluation: the validation loss above VAL_EXPLODE_FACTOR x
# the larger of log k and the validation loss the epoch started from.
EXPLODE_WINDOW = 5
EXPLODE_FACTOR = 10.0
VAL_EXPLODE_FACTOR = 3.0
_CKPT_MAGIC = b"\nFEATX-SHA256:"  # trailer of a checkpoint: the sha256 of everything before it


# ============================================================================================ images

@dataclass
class ImageRows:
    """The images of a feature set, one per path (views collapsed), with labels and splits."""

    root: Path
    paths: list[str]
    labels: np.ndarray
    splits: np.ndarray

    def select(self, split: str) -> tuple[list[Path], np.ndarray]:
        idx = np.nonzero(self.splits == split)[0]
        return [self.root / self.paths[i] for i in idx], self.labels[idx]


def feature_set_images(fdir: Path, manifest: dict) -> ImageRows:
    """Paths, labels and splits of every image that has rows in the feature set (skipped files have none).

    Raises:
        DataError: the data root is gone, or images are missing or unreadable (the first is named).
    """
    from featx.store import FeatureSet

    fs = FeatureSet(fdir)
    paths = fs.column("path")
    splits = fs.splits()
    labels = fs.labels()
    _, first = np.unique(paths, return_index=True)
    first.sort()  # views of an image are consecutive rows: keep the first, in the feature set's order
    root = Path(manifest["config"]["data"])
    rows = ImageRows(root, [str(p) for p in paths[first]], labels[first], np.asarray(splits[first], dtype=str))
    if not root.is_dir():
        raise DataError(f"the images of feature set {manifest.get('key')} were in {str(root)!r}, which is gone: "
                        f"put the data back there (fine-tuning trains on the images themselves)")
    missing = [p for p in rows.paths if not _readable(root / p)]
    if missing:
        raise DataError(f"{len(missing)} of the {len(rows.paths)} images of feature set {manifest.get('key')} are "
                        f"missing or unreadable, e.g. {str(root / missing[0])!r}: restore them or re-extract")
    _check_unchanged(fdir, root, rows.paths, manifest.get("key"))
    return rows


def _check_unchanged(fdir: Path, root: Path, paths: list[str], key) -> None:
    """Compare each image's size and sha256 with what extraction recorded (``images.json``)."""
    from featx.cache import read_json
    from featx.datasets import fingerprints_of

    rec = read_json(fdir / "images.json")
    if not isinstance(rec, dict):
        logger.warning("feature set %s records no image fingerprints (made by an older featx): "
                       "changed images cannot be detected", key)
        return
    want = {p: (size, digest) for p, size, digest in rec["images"]}
    have = fingerprints_of(root, paths)
    changed = [p for p, size, digest in have if want.get(p) != (size, digest)]
    if changed:
        raise DataError(f"{len(changed)} of the {len(paths)} images of feature set {key} changed since extraction, "
                        f"e.g. {str(root / changed[0])!r}: re-extract (featx extract) and refit the head")


def _readable(p: Path) -> bool:
    try:
        return p.is_file() and os.access(p, os.R_OK)
    except OSError:
        return False


def parse_augment(augment: str | Sequence[str] | None) -> frozenset[str]:
    """``"flip,crop"`` -> ``{"flip", "crop"}``; ``none`` or empty -> no augmentation.

    Raises:
        UsageError: an unknown name, or two ways of cropping at once.
    """
    parts = [augment] if isinstance(augment, str) or augment is None else list(augment)
    names = {s.strip().lower() for p in parts if p for s in str(p).split(",") if s.strip()}
    bad = sorted(names - set(AUGMENTS))
    if bad:
        raise UsageError(f"--augment {bad[0]!r}: use {', '.join(AUGMENTS)} (combine with commas, e.g. flip,crop)")
    names.discard("none")
    crops = names & {"crop", "resized-crop", "sixview"}
    if len(crops) > 1:
        raise UsageError(f"--augment: {' and '.join(sorted(crops))} are two ways of cropping; choose one")
    return frozenset(names)


def augmented_pixels(img, pre: Preprocess, augment: frozenset[str], rng: np.random.Generator) -> torch.Tensor:
    """uint8 ``[3, crop, crop]``: one random training view of a Pillow image.

    ``crop``: a random ``crop`` x ``crop`` window of the image resized as for testing (AlexNet's recipe);
    ``resized-crop``: a random window of 25-100% of the area and aspect 3/4-4/3, resized to the crop;
    ``sixview``: one of six views at random (centre, four corners, the whole image), mirrored half the time;
    ``flip``: mirrored half the time; ``jitter``: brightness, contrast and saturation x [0.6, 1.4], random order.
    Without a cropping augmentation the view is the test's centre crop.
    """
    interp = InterpolationMode(pre.interpolation)
    c = pre.crop
    if "resized-crop" in augment:
        W, H = img.size
        box = None
        for _ in range(10):
            area = W * H * rng.uniform(0.25, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < w <= W and 0 < h <= H:
                box = (int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w)
                break
        if box is None:
            s = min(W, H)
            box = ((H - s) // 2, (W - s) // 2, s, s)
        out = TF.resized_crop(img, *box, [c, c], interpolation=interp, antialias=pre.antialias)
    else:
        r = TF.resize(img, [pre.resize], interpolation=interp, antialias=pre.antialias)
        W, H = r.size
        if "crop" in augment and W >= c and H >= c:
            out = TF.crop(r, int(rng.integers(0, H - c + 1)), int(rng.integers(0, W - c + 1)), c, c)
        elif "sixview" in augment and W >= c and H >= c:
            v = int(rng.integers(0, 6))
            if v == 5:
                out = TF.resize(img, [c, c], interpolation=interp, antialias=pre.antialias)
            else:
                out = TF.five_crop(r, [c, c])[(4, 0, 1, 2, 3)[v]]  # centre first, then the corners
            if rng.random() < 0.5:
                out = TF.hflip(out)
        else:
            out = TF.center_crop(r, [c])
    if "flip" in augment and rng.random() < 0.5:
        out = TF.hflip(out)
    if "jitter" in augment:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
        factors = rng.uniform(0.6, 1.4, size=3)
        for j in rng.permutation(3):
            out = ops[j](out, float(factors[j]))
    return TF.pil_to_tensor(out)


class _TrainSet(torch.utils.data.Dataset):
    """Item i -> (i, uint8 [1, 3, c, c] or None, reason or None); the view is drawn from ``(seed, epoch, i)``."""

    def __init__(self, paths: Sequence[Path], pre: Preprocess, augment: frozenset[str], seed: int,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.paths = list(paths)
        self.pre = pre
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        try:
            img = open_rgb(self.paths[i], max_pixels=self.max_pixels)
            return i, augmented_pixels(img, self.pre, self.augment, rng)[None], None
        except BadImage as e:
            return i, None, str(e)
        except Exception as e:  # one bad file costs that file, not the run
            return i, None, f"cannot decode: {type(e).__name__}: {e}"


def _loader(dataset, batches: list[list[int]], *, workers: int, pin: bool) -> torch.utils.data.DataLoader:
    from featx.datasets.loading import collate

    kw = {"prefetch_factor": 4} if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                       pin_memory=pin, **kw)


def _batches(n: int, batch_size: int, order: np.ndarray | None = None) -> list[list[int]]:
    idx = np.arange(n) if order is None else order
    return [idx[a:a + batch_size].tolist() for a in range(0, n, batch_size)]


# ============================================================================================ training

@dataclass
class FinetuneResult:
    """What :func:`finetune` produced: the model directory, its metrics, and whether it was computed now."""

    path: Path
    metrics: dict
    computed: bool


def parse_unfreeze(unfreeze: str) -> tuple[str, int]:
    """``"last:3"`` -> ``("last", 3)``; the other strategies -> ``(name, 0)``.

    Raises:
        UsageError: an unknown strategy or a bad N.
    """
    s = str(unfreeze).strip().lower()
    if s.startswith("last:"):
        try:
            n = int(s.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"--unfreeze {unfreeze!r}: N in last:N must be a whole number of layers, at least 1")
        return "last", n
    if s in ("none", "head", "fc", "all", "gradual"):
        return s, 0
    raise UsageError(f"--unfreeze {unfreeze!r}: use {UNFREEZE_HELP}")


def trainable_groups(groups: list[Group], strategy: tuple[str, int], epoch: int, gradual_every: int) -> set[int]:
    """Indices of the backbone groups that train in ``epoch`` (1-based) under ``strategy``."""
    name, n = strategy
    top = len(groups)
    if name in ("none", "head"):
        return set()
    if name == "all":
        return set(range(top))
    if name == "fc":
        return {i for i, g in enumerate(groups) if g.kind == "linear"}
    if name == "last":
        return set(range(max(0, top - n), top))
    k = min(top, (epoch - 1) // gradual_every)  # gradual: one more layer from the top every gradual_every epochs
    return set(range(top - k, top))


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch, 7919]).integers(0, 2**62))


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` with its sha256 appended, atomically: a reader sees the old checkpoint or the whole new one."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest().encode()
    atomic_write_bytes(path, data + _CKPT_MAGIC + digest)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint, checking its embedded sha256 first (tensors only: ``weights_only=True``).

    Raises:
        IntegrityError: truncated, modified or unreadable; nothing of it is loaded.
    """
    path = Path(path)
    raw = path.read_bytes()
    cut = raw.rfind(_CKPT_MAGIC)
    digest = raw[cut + len(_CKPT_MAGIC):] if cut >= 0 else b""
    fix = "delete it to restart from epoch 0, or run again with resume=False (--no-resume)"
    if cut < 0 or len(digest) != 64:
        raise IntegrityError(f"checkpoint {path} is corrupt (no sha256 trailer: truncated or not featx's); "
                             f"it was not loaded: {fix}")
    if hashlib.sha256(raw[:cut]).hexdigest().encode() != digest:
        raise IntegrityError(f"checkpoint {path} is corrupt (sha256 differs); it was not loaded: {fix}")
    try:
        return torch.load(io.BytesIO(raw[:cut]), map_location="cpu", weights_only=True)
    except Exception as e:
        raise IntegrityError(f"checkpoint {path} cannot be read ({type(e).__name__}); it was not loaded: {fix}") from None


def _evaluate(net: FinetuneNet, loader, pre: Preprocess, dev: torch.device, index_of: np.ndarray, *,
              amp: bool, ctx: distributed.Context | None = None) -> dict:
    """Loss, accuracy, predictions (class indices) and logits of ``net`` on a loader, in eval mode.  Under
    torchrun each rank's loader holds a consecutive share of the images; the shares are gathered in rank order,
    so every rank gets the result of the whole set, in the single process's order."""
    net.eval()
    logits, labels, bad = [], [], 0
    label_all = loader.dataset.labels
    with torch.inference_mode(), _autocast(dev, amp):
        for idx, pixels, skipped in loader:
            bad += len(skipped)
            if pixels is None:
                continue
            x = pre.normalize(pixels.to(dev, non_blocking=True)).contiguous(memory_format=torch.channels_last)
            logits.append(net(x).float().cpu())
            labels.append(label_all[idx])
    if ctx is not None and ctx.active:
        shares = ctx.all_gather(([z.numpy() for z in logits], [np.asarray(y) for y in labels], bad))
        logits = [torch.from_numpy(z) for share in shares for z in share[0]]
        labels = [y for share in shares for y in share[1]]
        bad = sum(share[2] for share in shares)
    if bad:
        logger.warning("%d image(s) could not be decoded during evaluation and were left out", bad)
    if not logits:
        return {"loss": None, "accuracy": None, "n": 0, "pred": np.zeros(0, int), "y": np.zeros(0, int),
                "logits": np.zeros((0, 0), np.float32)}
    z = torch.cat(logits)
    y = np.concatenate(labels)
    target = torch.from_numpy(index_of[y])
    loss = F.cross_entropy(z, target, ignore_index=-1, reduction="sum").item() / max(1, int((target >= 0).sum()))
    logit_classes = np.nonzero(index_of >= 0)[0][np.argsort(index_of[index_of >= 0])]
    pred = logit_classes[z.argmax(1).numpy()]
    return {"loss": float(loss), "accuracy": float(np.mean(pred == y)), "n": int(len(y)), "pred": pred, "y": y,
            "logits": z.numpy()}


class _EvalSet(torch.utils.data.Dataset):
    """Test-time decoding (the plain preprocessing: centre crop), with the labels beside the paths."""

    def __init__(self, paths: Sequence[Path], labels: np.ndarray, pre: Preprocess,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        from featx.datasets.loading import DecodeSet

        self.inner = DecodeSet(paths, pre, max_pixels)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        return self.inner[i]


def _autocast(dev: torch.device, amp: bool):
    return torch.autocast(dev.type, dtype=torch.float16 if dev.type == "cuda" else torch.bfloat16, enabled=amp)


def _make_optimizer(net: FinetuneNet, *, optimizer: str, lr: float, backbone_lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    # Every parameter is in the optimizer from the start and frozen ones simply get no gradient: SGD and Adam
    # skip a parameter whose .grad is None, so gradual unfreezing needs no new optimizer (nor a state reset).
    groups = [{"params": list(net.head.parameters()), "lr": lr, "name": "head"}]
    bb = [p for g in net.groups for p in g.parameters()]
    if bb:
        groups.append({"params": bb, "lr": backbone_lr, "name": "backbone"})
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)


def _make_scheduler(opt: torch.optim.Optimizer, schedule: str, *, epochs: int, step_size: int, plateau_patience: int):
    if schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=0.1)
    if schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.1, patience=plateau_patience)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    return None


def _better(rec: dict, best: dict | None) -> bool:
    """Higher validation accuracy, or the same with a lower validation loss."""
    if best is None:
        return True
    a, b = rec.get("val_accuracy"), best.get("val_accuracy")
    if a is None or b is None:
        return False
    return a > b or (a == b and rec["val_loss"] < best["val_loss"])


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _check_options(*, epochs, lr, backbone_lr_factor, optimizer, momentum, weight_decay, schedule, batch_size,
                   early_stop, gradual_every, step_size, plateau_patience, clip_grad=None, recover=0) -> None:
    if int(epochs) < 1:
        raise UsageError(f"--epochs {epochs}: train at least 1 epoch")
    if not lr > 0:
        raise UsageError(f"--lr {lr}: the learning rate must be positive")
    if backbone_lr_factor < 0:
        raise UsageError(f"--backbone-lr-factor {backbone_lr_factor}: must be 0 or more")
    if optimizer not in OPTIMIZERS:
        raise UsageError(f"--optimizer {optimizer!r}: use {' or '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise UsageError(f"--schedule {schedule!r}: use {', '.join(SCHEDULES)}")
    if not 0 <= momentum < 1 or weight_decay < 0:
        raise UsageError("--momentum must be in [0, 1) and --weight-decay 0 or more")
    if batch_size < 1 or gradual_every < 1 or step_size < 1 or plateau_patience < 0:
        raise UsageError("--batch-size, --gradual-every and --step-size must be at least 1")
    if early_stop is not None and int(early_stop) < 1:
        raise UsageError(f"--early-stop {early_stop}: give a number of epochs, at least 1 (or leave it out)")
    if clip_grad is not None and not (0 < clip_grad < math.inf):
        raise UsageError(f"--clip-grad {clip_grad}: give a positive gradient norm, e.g. 1.0 (or leave it out)")
    if int(recover) < 0:
        raise UsageError(f"--recover {recover}: give how many times to halve the learning rate, 0 or more")


def finetune(head: str | os.PathLike, *, epochs: int = 10, unfreeze: str = "all", lr: float = 1e-3,
             backbone_lr_factor: float = 0.1, optimizer: str = "sgd", momentum: float = 0.9,
             weight_decay: float = 5e-4, schedule: str = "cosine", augment: str | Sequence[str] = "flip,crop",
             batch_size: int = 32, device: str = "auto", amp: bool = False, early_stop: int | None = None,
             resume: bool | None = None, cache: str | os.PathLike | None = None, workers: int | None = None,
             seed: int = 0, progress: bool | None = None, gradual_every: int = 1, step_size: int = 5,
             plateau_patience: int = 2, clip_grad: float | None = None, recover: int = 3,
             scale_backbone_lr: bool = True, backbone_dropout: bool = False,
             on_epoch: Callable[[int, FinetuneNet, dict], None] | None = None,
             plan: bool = False) -> FinetuneResult | StagePlan:
    """Put a fitted head back on its backbone and train the network end to end on the feature set's images.

    Args:
        head: a head directory (``featx fit`` output) whose feature set came from ``featx extract``.
        epochs: training epochs.
        unfreeze: what trains besides the head: ``head`` (nothing else; ``none`` is the same), ``fc`` (the fully
            connected layers before the head's layer), ``last:N`` (the top N layers with parameters), ``all``,
            ``gradual`` (one more layer from the top every ``gradual_every`` epochs, starting with none).
        lr: learning rate of the head; the backbone's is ``lr * backbone_lr_factor``, times
            :func:`backbone_lr_scale` of the head's features unless ``scale_backbone_lr=False``.
        optimizer: ``sgd`` (with ``momentum``) or ``adam``. weight_decay: L2 penalty of both.
        schedule: ``cosine`` (to 0 over ``epochs``), ``step`` (x0.1 every ``step_size`` epochs), ``plateau``
            (x0.1 after ``plateau_patience`` epochs without a lower validation loss) or ``none``.
        augment: training views, comma-combined: ``none``, ``flip``, ``crop``, ``resized-crop``, ``jitter``,
            ``sixview`` (see :func:`augmented_pixels`). Validation and test images get the plain centre crop.
        batch_size: images per step. workers: decode processes (default: one per core).
        device: ``auto``, ``cpu``, ``cuda``. amp: autocast (fp16 with loss scaling on CUDA, bf16 on CPU).
        early_stop: stop after this many epochs without a better validation accuracy (None: never).
        resume: None (default) continues an interrupted run of the same call from its checkpoint; True insists
            on a checkpoint (UsageError if there is none); False ignores one and starts again.
        cache: cache root. seed: seeds the held-out validation images, shuffling, augmentation and dropout.
        progress: tqdm bar (default: when stderr is a terminal).
        clip_grad: rescale each step's gradient (head and backbone together) to at most this L2 norm; None
            (default): no clipping.
        recover: how many times a diverged epoch (a non-finite loss or gradient, or a loss that explodes: see
            ``EXPLODE_FACTOR``) is retried, from the weights and optimizer state it started with, at half the
            learning rate; when none are left the run stops with :class:`~featx.errors.DivergenceError`.
        scale_backbone_lr: multiply the backbone's learning rate by ``min(1, s**2)``, ``s`` being the median
            train standard deviation of the head's features (:func:`backbone_lr_scale`); 1 for features that
            vary by 1 or more, about 1e-6 for those of random weights.
        backbone_dropout: keep the backbone's Dropout layers active in the layers that train (False, the
            default: off, as when the head's features were extracted, so the head trains on what it was fit on).
        on_epoch: called after each epoch's checkpoint with ``(epoch, net, record)``; an exception it raises
            stops the run with that checkpoint kept (tests use it to stand for a kill).
        plan: train nothing: return a :class:`~featx.cache.StagePlan` saying where the model is and whether it
            is already fine-tuned (the options are checked as for a run).

    Returns:
        :class:`FinetuneResult`: ``<cache>/models/<key>/`` with ``model.pt``, ``model.json``, ``metrics.json``
        (``initial_test_accuracy``, ``head_test_accuracy``, ``test_accuracy``, ``best_epoch``, ``curve``, ...),
        ``history.jsonl``, ``curve.png``, ``confusion.png``.

    Raises:
        UsageError: bad options, a head that cannot become torch layers (RBF SVM). DataError: images missing,
        layer/backbone mismatch. IntegrityError: a corrupt checkpoint (not loaded), changed head or weights file.
        DivergenceError: the loss or a gradient stayed non-finite after ``recover`` halvings of the learning
        rate (nothing of the diverged epoch is written; the previous epoch's checkpoint is left as it was).

    Example:
        >>> finetune("cache/heads/0123abcd", epochs=5, unfreeze="last:2").path  # doctest: +SKIP
    """
    from featx.extract import default_workers, resolve_device

    t_start = time.perf_counter()
    strategy = parse_unfreeze(unfreeze)
    aug = parse_augment(augment)
    optimizer = str(optimizer).lower()
    schedule = str(schedule).lower()
    _check_options(epochs=epochs, lr=lr, backbone_lr_factor=backbone_lr_factor, optimizer=optimizer,
                   momentum=momentum, weight_decay=weight_decay, schedule=schedule, batch_size=batch_size,
                   early_stop=early_stop, gradual_every=gradual_every, step_size=step_size,
                   plateau_patience=plateau_patience, clip_grad=clip_grad, recover=recover)
    dev = resolve_device(device)
    fh = load_fitted(head)
    options = {"epochs": int(epochs), "unfreeze": f"{strategy[0]}:{strategy[1]}" if strategy[0] == "last" else strategy[0],
               "lr": float(lr), "backbone_lr_factor": float(backbone_lr_factor), "optimizer": optimizer,
               "momentum": float(momentum) if optimizer == "sgd" else None, "weight_decay": float(weight_decay),
               "schedule": schedule, "step_size": int(step_size) if schedule == "step" else None,
               "plateau_patience": int(plateau_patience) if schedule == "plateau" else None,
               "gradual_every": int(gradual_every) if strategy[0] == "gradual" else None,
               "augment": sorted(aug), "batch_size": int(batch_size), "amp": bool(amp),
               "early_stop": int(early_stop) if early_stop else None,
               "clip_grad": float(clip_grad) if clip_grad else None, "recover": int(recover),
               "scale_backbone_lr": bool(scale_backbone_lr), "backbone_dropout": bool(backbone_dropout)}
    key = hash_key({"head": fh.meta.get("files"), "features": (fh.meta.get("source") or {}).get("key"),
                    "options": options, "seed": int(seed), "format": MODEL_FORMAT,
                    "featx": featx.__version__.split(".")[0]})
    out = cache_root(cache) / "models" / key
    ctx = distributed.init(dev) if not plan else distributed.Context()  # under torchrun: this rank's place
    if ctx.active:
        return _finetune_ranks(ctx, fh, out, key, options, strategy, aug, ctx.device(dev), seed=int(seed),
                               resume=resume, workers=default_workers() if workers is None else int(workers),
                               progress=progress, on_epoch=on_epoch, t_start=t_start,
                               command=finetune_command(fh.path, options, seed=int(seed), cache=cache_root(cache)))
    done = _finished(out)
    if plan:
        return StagePlan(out, done is not None, {"key": key})
    if done is not None:
        logger.info("model %s is already fine-tuned", key)
        return FinetuneResult(out, done, False)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / ".lock"))
    if lock.is_locked:
        logger.info("another featx process is fine-tuning %s; waiting for it", key)
    with lock:
        done = _finished(out)
        if done is not None:
            return FinetuneResult(out, done, False)
        for stale in out.glob(".tmp-*"):  # left by a killed write; we hold the lock
            stale.unlink(missing_ok=True)
        write_command(out, finetune_command(fh.path, options, seed=int(seed), cache=cache_root(cache)))
        hm = build_from_head(fh, envelope=True)  # features held to the head's train range while training
        fdir = Path(fh.meta["source"]["features"])
        rows = feature_set_images(fdir, hm.manifest)
        metrics = _train(hm, rows, out, key, options, strategy, aug, dev, seed=int(seed), resume=resume,
                         workers=default_workers() if workers is None else int(workers), progress=progress,
                         on_epoch=on_epoch, t_start=t_start)
    return FinetuneResult(out, metrics, True)


def _finetune_ranks(ctx: distributed.Context, fh, out: Path, key: str, options: dict, strategy: tuple[str, int],
                    aug: frozenset[str], dev: torch.device, *, seed: int, resume: bool | None, workers: int,
                    progress: bool | None, on_epoch, t_start: float, command: list[str]) -> FinetuneResult:
    """:func:`finetune` under torchrun: DistributedDataParallel, ``batch_size`` the global batch.

    The ranks first agree on every option (one error otherwise, before anything is written) and on the cache
    being shared; rank 0 holds the model's lock and alone writes checkpoints, history, curves and the model;
    every rank reads the same checkpoint to resume, so a rerun after any rank was killed continues from the
    last finished epoch, with any number of processes.
    """
    ctx.agree({**options, "seed": seed, "head": fh.meta.get("files"),
               "features": (fh.meta.get("source") or {}).get("key")})
    if options["batch_size"] < ctx.world_size:
        raise UsageError(f"--batch-size {options['batch_size']} is the global batch, shared out between the "
                         f"{ctx.world_size} processes: give at least {ctx.world_size}")
    done = ctx.broadcast(_finished(out) if ctx.is_main else None)
    if done is not None:
        logger.info("model %s is already fine-tuned", key)
        return FinetuneResult(out, done, False)
    ctx.check_shared(out.parents[1], what="cache")  # a checkpoint only rank 0 can see would not resume the others
    lock = FileLock(str(out / ".lock"))
    busy = False
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Exception:  # filelock.Timeout: a process outside this job trains the same model
            busy = True
        else:
            for stale in out.glob(".tmp-*"):  # left by a killed write; the job's ranks write nothing before this
                stale.unlink(missing_ok=True)
            write_command(out, command)
    if ctx.broadcast(busy):
        raise UsageError(f"another featx process (not of this torchrun job) is fine-tuning {key} in {out}: let it "
                         f"finish, then run again (the finished model is reused)")
    threads = torch.get_num_threads()
    if dev.type == "cpu":  # torchrun sets OMP_NUM_THREADS=1; the node's cores are shared out between its ranks
        torch.set_num_threads(ctx.cores())
    try:
        hm = build_from_head(fh, envelope=True)  # as in one process: the features held to the head's train range
        rows = feature_set_images(Path(fh.meta["source"]["features"]), hm.manifest)
        metrics = _train(hm, rows, out, key, options, strategy, aug, dev, seed=seed, resume=resume, workers=workers,
                         progress=progress if ctx.is_main else False, on_epoch=on_epoch, t_start=t_start, ctx=ctx)
    finally:
        torch.set_num_threads(threads)
        if ctx.is_main:
            lock.release()
    return FinetuneResult(out, metrics, True)


def _finished(out: Path) -> dict | None:
    done = read_json(out / "metrics.json")
    if isinstance(done, dict) and (out / MODEL_META).exists() and (out / MODEL_FILE).exists():
        problem = model_problem(out)
        if problem is not None:  # damaged: a miss, the same call trains it again
            logger.warning("model %s is damaged (%s): fine-tuning it again", out.name, problem)
            return None
        (out / CHECKPOINT).unlink(missing_ok=True)  # a run killed between finishing and tidying up
        return done
    return None


def _split_rows(rows: ImageRows, seed: int) -> tuple[dict[str, tuple[list[Path], np.ndarray]], str]:
    """train / val / test images; val is the feature set's, or a stratified part of train held out."""
    from featx.datasets.splits import stratified

    parts = {s: rows.select(s) for s in ("train", "val", "test")}
    source = "val split"
    if not len(parts["val"][0]):
        paths, labels = parts["train"]
        assign = np.asarray(stratified(labels.tolist(), {"val": VAL_FRACTION}, seed), dtype=str)
        parts["val"] = ([p for p, a in zip(paths, assign) if a == "val"], labels[assign == "val"])
        parts["train"] = ([p for p, a in zip(paths, assign) if a == "train"], labels[assign == "train"])
        source = f"{VAL_FRACTION:.0%} of each class's train images, held out (seed {seed})"
    if not len(parts["train"][0]):
        raise DataError("the feature set has no train images to fine-tune on")
    if not len(parts["test"][0]):
        raise DataError("the feature set has no test images: the fine-tuned model could not be measured")
    if not len(parts["val"][0]):
        logger.warning("too few train images to hold any out for validation: the last epoch is kept, no early stopping")
        source = "none"
    return parts, source


def _train(hm: HeadModel, rows: ImageRows, out: Path, key: str, options: dict, strategy: tuple[str, int],
           aug: frozenset[str], dev: torch.device, *, seed: int, resume: bool | None, workers: int,
           progress: bool | None, on_epoch, t_start: float, ctx: distributed.Context | None = None) -> dict:
    from tqdm.auto import tqdm

    ctx = ctx or distributed.Context()
    net = hm.net
    pre = hm.preprocess
    k = len(hm.classes)
    index_of = np.full(k, -1, dtype=np.int64)  # class index -> logit index (-1: the head never saw the class)
    index_of[hm.logit_classes] = np.arange(len(hm.logit_classes))
    chance = math.log(max(2, len(hm.logit_classes)))  # the cross-entropy of a uniform guess over the logits
    parts, val_source = _split_rows(rows, seed)
    n_train = len(parts["train"][0])
    logger.info("%s: fine-tuning %s %s head on %s %s (%s weights): %d train, %d val (%s), %d test images, "
                "%d backbone layers, unfreeze %s, device %s", key, hm.head.meta.get("kind"), hm.head.layer,
                hm.manifest["config"]["backbone"], hm.head.layer, hm.weights_id.get("kind"), n_train,
                len(parts["val"][0]), val_source, len(parts["test"][0]), len(net.groups), options["unfreeze"], dev)
    if strategy[0] == "last" and strategy[1] > len(net.groups):
        logger.warning("--unfreeze last:%d: the backbone has only %d layers with parameters; all of them train",
                       strategy[1], len(net.groups))
    net.to(dev).to(memory_format=torch.channels_last)
    pin = dev.type == "cuda"
    train_set = _TrainSet(parts["train"][0], pre, aug, seed)
    train_labels = torch.from_numpy(index_of[parts["train"][1]])
    evals = {s: _loader(_EvalSet(*_share(ctx, *parts[s]), pre), _batches(len(_share(ctx, *parts[s])[0]),
                                                                          options["batch_size"]),
                        workers=workers, pin=pin) for s in ("val", "test") if len(parts[s][0])}
    lr_scale = backbone_lr_scale(hm.feature_spread) if options["scale_backbone_lr"] else 1.0
    backbone_lr = options["lr"] * options["backbone_lr_factor"] * lr_scale
    if net.groups and strategy[0] not in ("none", "head"):
        logger.info("backbone lr %.3g (lr %g x --backbone-lr-factor %g x %.3g: the head's features vary by %s in "
                    "the backbone's units%s), backbone dropout %s", backbone_lr, options["lr"],
                    options["backbone_lr_factor"], lr_scale, _fmt(hm.feature_spread, ".3g"),
                    "" if options["scale_backbone_lr"] else ", not scaled (--no-scale-backbone-lr)",
                    "on" if options["backbone_dropout"] else "off")
    opt = _make_optimizer(net, optimizer=options["optimizer"], lr=options["lr"], backbone_lr=backbone_lr,
                          momentum=options["momentum"] or 0.0, weight_decay=options["weight_decay"])
    sched = _make_scheduler(opt, options["schedule"], epochs=options["epochs"], step_size=options["step_size"] or 1,
                            plateau_patience=options["plateau_patience"] or 0)
    scaler = torch.amp.GradScaler("cuda", enabled=options["amp"] and dev.type == "cuda")
    ckpt_path = out / CHECKPOINT
    state = None
    if resume is not False and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state.get("key") != key:
            raise IntegrityError(f"checkpoint {ckpt_path} belongs to another run ({state.get('key')}); not loaded")
    elif resume is True:
        raise UsageError(f"nothing to resume: {out} holds no checkpoint (run without --resume to start)")
    elif ckpt_path.exists():
        logger.info("resume=False: the existing checkpoint is ignored and will be overwritten after epoch 1")
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        if state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        history, best, initial = state["history"], state["best"], state["initial"]
        start, bad_epochs, stopped = int(state["epoch"]) + 1, int(state["bad_epochs"]), bool(state["stopped"])
        best_state, best_test = state["best_state"], _unpack(state["best_test"])
        partial = state.get("partial")  # stopped mid-epoch (SIGTERM, Ctrl-C): continue at that very step
        retries = list(state.get("recoveries") or [])
        if partial is not None and int(partial["epoch"]) == start:
            logger.info("resuming %s at step %d of epoch %d of %d (checkpoint %s)", key, int(partial["step"]), start,
                        options["epochs"], ckpt_path)
        else:
            partial = None
            logger.info("resuming %s after epoch %d of %d (checkpoint %s)", key, start - 1, options["epochs"], ckpt_path)
    else:
        t0 = time.perf_counter()
        env, net.envelope = net.envelope, None  # before any step the network is exactly the head, unclamped
        test0 = _evaluate(net, evals["test"], pre, dev, index_of, amp=options["amp"], ctx=ctx)
        val0 = _evaluate(net, evals["val"], pre, dev, index_of, amp=options["amp"], ctx=ctx) if "val" in evals else None
        net.envelope = env
        initial = {"test_accuracy": test0["accuracy"], "test_loss": test0["loss"],
                   "val_accuracy": val0["accuracy"] if val0 else None, "val_loss": val0["loss"] if val0 else None,
                   "seconds": round(time.perf_counter() - t0, 3)}
        if test0["accuracy"] is None:
            raise DataError("none of the feature set's test images could be decoded: the model cannot be measured")
        logger.info("before training: test accuracy %.4f (the head's own: %s), val accuracy %s",
                    initial["test_accuracy"], _fmt(_head_test_accuracy(hm)), _fmt(initial["val_accuracy"]))
        history, start, bad_epochs, stopped = [], 1, 0, False
        best = {"epoch": 0, "val_accuracy": initial["val_accuracy"], "val_loss": initial["val_loss"]}
        best_state = _cpu_state(net) if val0 else None
        best_test = test0
        partial, retries = None, []
    # every rank must start from the same place (a model directory only some ranks see would not)
    ctx.agree({"checkpoint": (start, len(history), int(partial["step"]) if partial is not None else None)},
              what="checkpoint (the model directory must be shared)")

    def save_partial(part: dict) -> None:
        # Stopped before step part["step"] of epoch part["epoch"]: the model, optimizer, scheduler and RNG as they
        # are now, so that the next run takes that step exactly as this one would have (written atomically).
        if not ctx.is_main:  # every rank holds the same state (DDP); rank 0 writes it
            return
        _save_checkpoint(ckpt_path, {
            "key": key, "epoch": int(part["epoch"]) - 1, "model": _cpu_state(net), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "best": best, "best_state": best_state, "best_test": _pack(best_test), "bad_epochs": bad_epochs,
            "stopped": stopped, "history": history, "initial": initial, "options": options, "partial": part,
            "recoveries": retries,  # retries of the stopped epoch so far (divergence guard)
            "rng": {"seed": seed, "next_epoch_seed": _epoch_seed(seed, int(part["epoch"]))}})
        logger.info("stopped before step %d of epoch %d: checkpoint %s; the same command continues from there",
                    int(part["step"]) + 1, int(part["epoch"]), ckpt_path)

    events = EventLog(out, first_step=start if state is not None else 0, enabled=ctx.is_main)  # TensorBoard
    if state is None:
        events.write(0, initial, world_size=ctx.world_size)
    show = sys.stderr.isatty() if progress is None else bool(progress)
    for epoch in range(start, options["epochs"] + 1):
        if stopped:
            break
        top = trainable_groups(net.groups, strategy, epoch, options["gradual_every"] or 1)
        # retries of this epoch so far (a run stopped mid-epoch records those it made before the stop)
        retries = list(retries) if partial is not None else []
        snap = _snapshot(net, opt, sched, scaler)
        while True:  # the epoch, retried from its start at a lower learning rate while it diverges
            try:
                rec = _train_epoch(net, train_set, train_labels, opt, scaler, pre, dev, epoch, top, seed=seed,
                                   batch_size=options["batch_size"], workers=workers, pin=pin, amp=options["amp"],
                                   show=show, tqdm=tqdm, partial=partial, save_partial=save_partial, ctx=ctx,
                                   clip_grad=options["clip_grad"], dropout=options["backbone_dropout"], chance=chance)
                results = {s: _evaluate(net, ld, pre, dev, index_of, amp=options["amp"], ctx=ctx)
                           for s, ld in evals.items()}
                for s, r in results.items():
                    if r["loss"] is not None and not math.isfinite(r["loss"]):
                        raise _Diverged(epoch, 0, f"the {'validation' if s == 'val' else s} loss", r["loss"])
                start = history[-1]["val_loss"] if history else initial["val_loss"]  # where this epoch began
                val = results.get("val")
                if val is not None and val["loss"] is not None and start is not None:
                    limit = VAL_EXPLODE_FACTOR * max(chance, start)
                    if val["loss"] > limit:
                        raise _Diverged(epoch, 0, "the validation loss", val["loss"], limit=limit,
                                        why=f"{VAL_EXPLODE_FACTOR:g} x the larger of chance level log(k) = "
                                            f"{chance:.3g} and the validation loss before the epoch, {start:.3g}")
                break
            except _Diverged as d:
                used = sum(len(h.get("recoveries") or []) for h in history) + len(retries)
                if used >= options["recover"]:
                    raise DivergenceError(_diverged_message(d, used, opt, epoch, options)) from None
                _restore(snap, net, opt, sched, scaler)
                lrs = [g["lr"] for g in opt.param_groups]
                _scale_lr(opt, sched, RECOVER_FACTOR)
                snap = _snapshot(net, opt, sched, scaler)
                retries.append({"epoch": d.epoch, "step": d.step, "what": d.what, "value": str(d.value),
                               **({"limit": d.limit} if d.limit is not None else {}),
                               "lr_before": lrs[0], "lr_after": opt.param_groups[0]["lr"]})
                logger.warning("epoch %d, %s: %s is %s; back to the weights and optimizer state the epoch started "
                               "with, retrying it at %g x the learning rate (head %.3g%s); %d more retr%s allowed "
                               "(--recover)", epoch, f"step {d.step}" if d.step else "evaluation", d.what, d.shown,
                               RECOVER_FACTOR, opt.param_groups[0]["lr"],
                               f", backbone {opt.param_groups[1]['lr']:.3g}" if len(lrs) > 1 else "",
                               options["recover"] - used - 1, "y" if options["recover"] - used - 1 == 1 else "ies")
        partial = None
        rec["recoveries"] = retries
        for s, r in results.items():
            rec[f"{s}_loss"], rec[f"{s}_accuracy"] = r["loss"], r["accuracy"]
        rec.setdefault("val_loss", None)
        rec.setdefault("val_accuracy", None)
        if sched is not None:
            if options["schedule"] == "plateau":
                sched.step(rec["val_loss"] if rec["val_loss"] is not None else rec["train_loss"])
            else:
                sched.step()
        rec["unfrozen"] = [net.groups[i].name for i in sorted(top)]
        rec["seconds"] = round(time.perf_counter() - rec.pop("_t0"), 3)
        if "val" not in evals or _better(rec, best):
            best = {"epoch": epoch, "val_accuracy": rec["val_accuracy"], "val_loss": rec["val_loss"]}
            best_state = _cpu_state(net) if "val" in evals else None
            best_test = results["test"]  # the final test measure is this one: no second pass over the images
            bad_epochs = 0
        else:
            bad_epochs += 1
        history.append(rec)
        logger.info("epoch %d/%d: train loss %.4f acc %.4f | val loss %s acc %s | test loss %s acc %s | "
                    "%.1f images/s, lr %.3g, %d backbone layer(s) training", epoch, options["epochs"],
                    rec["train_loss"], rec["train_accuracy"], _fmt(rec["val_loss"]), _fmt(rec["val_accuracy"]),
                    _fmt(rec["test_loss"]), _fmt(rec["test_accuracy"]), rec["train_images_per_s"], rec["lr"], len(top))
        early = options["early_stop"]
        stopped = bool(early and bad_epochs >= early and "val" in evals)
        if stopped:
            logger.info("early stop: %d epoch(s) without a better validation accuracy; keeping epoch %d",
                        bad_epochs, best["epoch"])
        rec["world_size"] = ctx.world_size
        events.write(epoch, rec, world_size=ctx.world_size)  # before the checkpoint: a resume rewrites this epoch
        if ctx.is_main:  # every rank holds the same state (DDP); rank 0 writes it
            _save_checkpoint(ckpt_path, {
                "key": key, "epoch": epoch, "model": _cpu_state(net), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict() if sched is not None else None,
                "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "best": best, "best_state": best_state, "best_test": _pack(best_test), "bad_epochs": bad_epochs,
                "stopped": stopped,
                "history": history, "initial": initial, "options": options,
                # no generator state to carry: every draw of epoch e (shuffle, augmentation, dropout) is seeded
                # from (seed, e), so the next epoch draws the same after a resume as without one
                "rng": {"seed": seed, "next_epoch_seed": _epoch_seed(seed, epoch + 1)}})
            _write_history(out / HISTORY, history)
        if on_epoch is not None:
            on_epoch(epoch, net, rec)
    events.close()
    if best_state is None:  # no validation images: the last epoch
        best = {"epoch": len(history), "val_accuracy": None, "val_loss": None}
    else:
        net.load_state_dict(best_state)
    if best["epoch"] == 0:
        net.envelope = None  # the untouched network, as measured before training: the head itself
        if history and ctx.is_main:
            logger.warning("no epoch did better than the head on validation (accuracy %s before training; after "
                           "epoch%s %s): the model written is the head itself, unchanged; see curve.png",
                           _fmt(initial["val_accuracy"]), "s" if len(history) > 1 else "",
                           ", ".join(_fmt(h["val_accuracy"]) for h in history))
    bad = [k for k, v in net.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # cannot happen past the checks above; never write a model that is not finite
        raise DivergenceError(f"fine-tuning diverged: the kept weights are not finite ({bad[0]}); nothing was written: "
                              f"use a lower --lr or --clip-grad 1.0")
    if not ctx.is_main:
        return ctx.broadcast(None)  # rank 0's metrics, once it has written the model
    return ctx.broadcast(_finish(hm, net, out, key, options, best_test, dev, history, best, initial, val_source, parts,
                                 t_start, world_size=ctx.world_size,
                                 extra={"feature_spread": hm.feature_spread, "backbone_lr_scale": lr_scale}))


def _diverged_message(d: _Diverged, used: int, opt: torch.optim.Optimizer, epoch: int,
                      options: dict | None = None) -> str:
    """The one line a run that gave up on divergence ends with: what happened, what was kept, what to change."""
    lr = opt.param_groups[0]["lr"]
    lrs = ", ".join(f"{g.get('name', 'head')} lr {g['lr']:.3g}" for g in opt.param_groups)
    where = f"step {d.step}" if d.step else "its evaluation"
    again = (f", still after {used} retr{'y' if used == 1 else 'ies'} at {RECOVER_FACTOR:g}x the learning rate"
             if used else "")
    kept = (f"the checkpoint of epoch {epoch - 1} is left as it was" if epoch > 1 else "no epoch had finished")
    options = options or {}
    undo = [f for f, on in (("--no-scale-backbone-lr", options.get("scale_backbone_lr") is False),
                            ("--backbone-dropout", options.get("backbone_dropout"))) if on]
    first = f"without {' and '.join(undo)}, " if undo else ""
    return (f"fine-tuning diverged: {d.what} was {d.shown} at epoch {d.epoch}, {where}{again} ({lrs}); "
            f"nothing of epoch {epoch} was written and {kept}: run again {first}with a lower --lr (e.g. "
            f"{lr / 10:.3g}) or --backbone-lr-factor, --clip-grad 1.0, --unfreeze head, or a larger --recover")


def _pack(r: dict) -> dict:
    """An evaluation's result in checkpoint form (tensors and numbers only)."""
    return {"loss": r["loss"], "accuracy": r["accuracy"], "n": r["n"], "pred": torch.from_numpy(np.asarray(r["pred"])),
            "y": torch.from_numpy(np.asarray(r["y"])), "logits": torch.from_numpy(np.asarray(r["logits"]))}


def _unpack(r: dict) -> dict:
    return {**r, "pred": r["pred"].numpy(), "y": r["y"].numpy(), "logits": r["logits"].numpy()}


def _head_test_accuracy(hm: HeadModel) -> float | None:
    m = read_json(hm.head.path / "metrics.json")
    return float(m["test_accuracy"]) if isinstance(m, dict) and "test_accuracy" in m else None


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def backbone_lr_scale(spread: float | None) -> float:
    """``min(1, spread**2)``: what the backbone's learning rate is multiplied by, ``spread`` being the median
    train standard deviation of the head's features in the backbone's units (:attr:`FeatureStats.spread`).

    A head tells images apart by feature differences of about ``spread``, so it reads the features in units of
    ``spread`` (a ``standard`` scaling divides by exactly that; an ``l2`` or unscaled head learns weights
    of about 1/``spread`` instead).  A backbone step is then amplified twice: the gradient reaching the backbone
    is multiplied by 1/``spread`` and the change of the features it makes is read at 1/``spread`` again.  The
    default learning rates suit features that vary by about 1 (pretrained backbones); features of random weights
    vary by 1e-3 to 1e-2, where the same step moved the head's input by more than its whole train spread and
    collapsed the network to chance within ten steps (docs/finetune.md, "Why fine-tuning diverged").
    """
    if spread is None or not math.isfinite(spread) or spread <= 0:
        return 1.0
    return min(1.0, float(spread) ** 2)


def _train_epoch(net: FinetuneNet, train_set: _TrainSet, train_labels: torch.Tensor, opt, scaler, pre: Preprocess,
                 dev: torch.device, epoch: int, top: set[int], *, seed: int, batch_size: int, workers: int, pin: bool,
                 amp: bool, show: bool, tqdm, partial: dict | None = None,
                 save_partial: Callable[[dict], None] | None = None, ctx: distributed.Context | None = None,
                 clip_grad: float | None = None, dropout: bool = False, chance: float = math.log(2)) -> dict:
    """One epoch of steps; raises :class:`_Diverged` at the first non-finite loss or gradient, or a training loss
    that explodes (``EXPLODE_*``; ``chance``: log k), before stepping."""
    ctx = ctx or distributed.Context()
    t0 = time.perf_counter()
    es = _epoch_seed(seed, epoch)
    order = np.random.default_rng(es).permutation(len(train_set))
    train_set.epoch = epoch
    done = int(partial["step"]) if partial is not None else 0  # steps a stopped run already took this epoch
    batches = _batches(len(train_set), batch_size, order)
    if ctx.active:  # --batch-size is the global batch: each step, every rank takes its consecutive part of it
        batches = [np.array_split(np.asarray(b), ctx.world_size)[ctx.rank].tolist() for b in batches]
    loader = _loader(train_set, batches[done:], workers=workers, pin=pin)
    net.set_trainable(top, dropout=dropout)
    model = _ddp(net, dev) if ctx.active else net  # rebuilt each epoch: what trains may change (gradual)
    loss_sum, correct, seen, bad, norms, losses = 0.0, 0, 0, 0, [], []
    if partial is not None:
        if ctx.is_main:  # the sums of the steps taken, over every rank (the others start from 0; summed at the end)
            loss_sum, correct, seen, bad = float(partial["loss_sum"]), int(partial["correct"]), \
                int(partial["seen"]), int(partial["bad"])
        t0 -= float(partial["train_seconds"])
        norms = [float(v) for v in partial.get("grad_norms") or []]  # the same on every rank (all-reduced)
        losses = [float(v) for v in partial.get("losses") or []]  # the global step losses so far (guard)
    step, stop_rng = done, None
    bar = tqdm(total=sum(map(len, batches)), unit="img", disable=not show, file=sys.stderr, desc=f"epoch {epoch}",
               dynamic_ncols=True)
    devices = [torch.cuda.current_device()] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):  # dropout draws from (seed, epoch), the caller's RNG untouched
            # rank 0 draws dropout as one process does; the others from their own stream
            torch.manual_seed(es if ctx.rank == 0 else int(np.random.default_rng([seed, epoch, 7919, ctx.rank])
                                                              .integers(0, 2**62)))
            steps = iter(loader)  # draws the loader's seed now, before a resumed RNG state is put back
            if partial is not None and ctx.is_main:
                _set_rng_state(partial["rng"], devices)
            for step, (idx, pixels, skipped) in enumerate(steps, done):
                try:
                    if not ctx.active:
                        interrupt.check("finetune.step")
                    else:  # the ranks stop together, at the same step: one alone would leave the others in DDP
                        interrupt.mark("finetune.step")
                        n_global, stops = ctx.all_reduce_sum([len(idx), interrupt.stop_requested() is not None])
                        if stops:
                            raise interrupt.Interrupted(interrupt.stop_requested() or "SIGTERM", "finetune.step")
                except interrupt.Interrupted:
                    stop_rng = _rng_state(devices)  # dropout's generator as step `step` would find it
                    raise
                bad += len(skipped)
                bar.update(len(idx) + len(skipped))
                if ctx.active:  # the global batch's decoded images: the loss is their mean, as in one process
                    n_global = int(n_global)
                    if n_global == 0:
                        continue  # every rank skips the step, as one process would
                    if pixels is None:  # this rank's part is empty or undecodable: it still joins the all-reduce
                        pixels = torch.zeros((0, 3, pre.crop, pre.crop), dtype=torch.uint8)
                elif pixels is None:
                    continue
                y = train_labels[idx].to(dev, non_blocking=True)
                x = pre.normalize(pixels.to(dev, non_blocking=True)).contiguous(memory_format=torch.channels_last)
                with _autocast(dev, amp):
                    z = model(x)
                    if not ctx.active:
                        loss = F.cross_entropy(z.float(), y)
                    else:  # DDP averages the ranks' gradients: x world_size / global count = the global mean's
                        loss = F.cross_entropy(z.float(), y, reduction="sum") * (ctx.world_size / n_global)
                value = float(loss.detach())
                # checked before backward (this step then changes nothing), on the global batch's mean loss, so
                # that under DDP every rank stops at the same step
                mean = value if not ctx.active else ctx.all_reduce_sum([value])[0] / ctx.world_size
                if not math.isfinite(mean):
                    raise _Diverged(epoch, step + 1, "the loss", mean)
                losses.append(mean)
                recent = losses[-EXPLODE_WINDOW:]
                limit = EXPLODE_FACTOR * max(chance, losses[0])
                if sum(recent) / len(recent) > limit:
                    raise _Diverged(epoch, step + 1, f"the training loss (mean of the last {len(recent)} steps)",
                                    sum(recent) / len(recent), limit=limit,
                                    why=f"{EXPLODE_FACTOR:g} x the larger of chance level log(k) = {chance:.3g} "
                                        f"and the epoch's first loss {losses[0]:.3g}")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                norm = _grad_norm(opt, scaler, clip_grad)
                # with fp16 loss scaling an overflowing gradient is expected now and then: the scaler skips that
                # step and lowers its scale, so only an unscaled non-finite gradient is divergence
                if not math.isfinite(norm) and not scaler.is_enabled():
                    raise _Diverged(epoch, step + 1, "the gradient norm", norm)
                scaler.step(opt)
                scaler.update()
                if math.isfinite(norm):
                    norms.append(norm)
                loss_sum += value * (len(idx) if not ctx.active else n_global / ctx.world_size)
                correct += int((z.detach().argmax(1) == y).sum())
                seen += len(idx)
    except interrupt.Interrupted:
        if ctx.active and stop_rng is not None:  # every rank stopped at this step: rank 0 saves the sums of all
            loss_sum, correct, seen, bad = ctx.all_reduce_sum([loss_sum, correct, seen, bad])
        if save_partial is not None and stop_rng is not None:
            save_partial({"epoch": epoch, "step": step, "loss_sum": loss_sum, "correct": correct, "seen": seen,
                          "bad": bad, "train_seconds": time.perf_counter() - t0, "rng": stop_rng,
                          "grad_norms": list(norms), "losses": list(losses)})
        raise
    finally:
        bar.close()
    if ctx.active:  # the epoch's figures over every rank's part
        loss_sum, correct, seen, bad = ctx.all_reduce_sum([loss_sum, correct, seen, bad])
        correct, seen, bad = int(correct), int(seen), int(bad)
    if bad:
        logger.warning("epoch %d: %d training image(s) could not be decoded and were skipped", epoch, bad)
    if not seen:
        raise DataError("no training image could be decoded")
    dt = time.perf_counter() - t0
    g = np.asarray(norms)
    clip = {"clipped_steps": int((g > clip_grad).sum())} if clip_grad else {}
    # what the explosion guard compared: the largest mean of EXPLODE_WINDOW consecutive step losses, and its limit
    windows = [np.mean(losses[max(0, i + 1 - EXPLODE_WINDOW):i + 1]) for i in range(len(losses))]
    guard = {"train_loss_peak": round(float(max(windows)), 4),
             "train_loss_limit": round(EXPLODE_FACTOR * max(chance, losses[0]), 4)} if losses else {}
    return {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
            "lr": float(opt.param_groups[0]["lr"]),
            **({"backbone_lr": float(opt.param_groups[1]["lr"])} if len(opt.param_groups) > 1 else {}),
            "train_images": seen, "train_seconds": round(dt, 3),
            "train_images_per_s": round(seen / dt, 2), "_t0": t0,
            # gradient L2 norms before clipping (head and backbone together): what --clip-grad is compared with
            "grad_norm_median": round(float(np.median(g)), 4) if len(g) else None,
            "grad_norm_max": round(float(g.max()), 4) if len(g) else None, **clip, **guard}


class _Diverged(Exception):
    """A non-finite or exploding loss, or a non-finite gradient, at ``epoch``/``step`` (``step`` 0: in the
    evaluation after the epoch); ``limit`` and ``why``: the threshold an exploding (finite) value passed."""

    def __init__(self, epoch: int, step: int, what: str, value: float, *, limit: float | None = None,
                 why: str = ""):
        self.epoch, self.step, self.what, self.value, self.limit, self.why = epoch, step, what, value, limit, why
        super().__init__(f"{what} is {self.shown} at epoch {epoch}, step {step}")

    @property
    def shown(self) -> str:
        """The value as said in the log and the error: ``nan``, or ``123.4, above 23.03 (10 x ...)``."""
        if self.limit is None or not math.isfinite(self.value):
            return str(self.value)
        return f"{self.value:.4g}, above {self.limit:.4g} ({self.why})"


def _grad_norm(opt: torch.optim.Optimizer, scaler, clip_grad: float | None) -> float:
    """The L2 norm of every gradient of the step (unscaled first under AMP); clipped to ``clip_grad`` if given."""
    params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return 0.0
    if scaler.is_enabled():
        scaler.unscale_(opt)  # clipping and the check must see the true gradients; step() will not unscale twice
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if clip_grad and bool(torch.isfinite(norm)):
        torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm)
    return float(norm)


def _snapshot(net: FinetuneNet, opt: torch.optim.Optimizer, sched, scaler) -> dict:
    """Weights, optimizer, scheduler and loss-scaler state, copied to the CPU: what a diverged epoch returns to."""
    def cpu(v):
        if isinstance(v, torch.Tensor):
            return v.detach().to("cpu", copy=True)
        if isinstance(v, dict):
            return {k: cpu(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(cpu(x) for x in v)
        return v

    return {"model": _cpu_state(net), "optimizer": cpu(opt.state_dict()),
            "scheduler": cpu(sched.state_dict()) if sched is not None else None,
            "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None}


def _restore(snap: dict, net: FinetuneNet, opt: torch.optim.Optimizer, sched, scaler) -> None:
    net.load_state_dict(snap["model"])
    opt.load_state_dict(snap["optimizer"])
    if sched is not None:
        sched.load_state_dict(snap["scheduler"])
    if snap["grad_scaler"]:
        scaler.load_state_dict(snap["grad_scaler"])


def _scale_lr(opt: torch.optim.Optimizer, sched, factor: float) -> None:
    """Multiply every learning rate by ``factor``, for good: the schedule goes on from the lowered rates."""
    for g in opt.param_groups:
        g["lr"] *= factor
        if "initial_lr" in g:
            g["initial_lr"] *= factor
    for attr in ("base_lrs", "_last_lr"):  # the schedulers' closed forms start from these
        if getattr(sched, attr, None):
            setattr(sched, attr, [v * factor for v in getattr(sched, attr)])


def _ddp(net: FinetuneNet, dev: torch.device) -> nn.Module:
    """``net`` in DistributedDataParallel over its parameters that train now (DDP fixes that set when built).
    Building it broadcasts rank 0's parameters, so every rank starts the epoch from the same weights."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)


def _share(ctx: distributed.Context, paths: list, labels: np.ndarray) -> tuple[list, np.ndarray]:
    """This rank's consecutive share of an evaluation set (all of it in a world of one)."""
    if not ctx.active:
        return paths, labels
    idx = np.array_split(np.arange(len(paths)), ctx.world_size)[ctx.rank]
    return [paths[i] for i in idx], labels[idx]


def _rng_state(devices: list[int]) -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": [torch.cuda.get_rng_state(d) for d in devices]}


def _set_rng_state(state: dict, devices: list[int]) -> None:
    torch.set_rng_state(state["cpu"])
    for d, s in zip(devices, state.get("cuda") or []):
        torch.cuda.set_rng_state(s, d)


def _write_history(path: Path, history: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in history).encode())


# ============================================================================================ output

def _finish(hm: HeadModel, net: FinetuneNet, out: Path, key: str, options: dict, r: dict, dev: torch.device,
            history: list[dict], best: dict, initial: dict, val_source: str, parts: dict, t_start: float, *,
            world_size: int = 1, extra: dict | None = None) -> dict:
    """Write the model (the best epoch's weights, already in ``net``) and its metrics (``r``: its test results)."""
    from featx.plots import plot_confusion, plot_curve

    classes = hm.classes
    scores = np.full((len(r["y"]), len(classes)), -np.inf, dtype=np.float32)
    scores[:, hm.logit_classes] = r["logits"]
    m = metrics_for(r["y"], r["pred"], scores, np.arange(len(classes)), classes)
    state = _cpu_state(net)
    torch.save(state, out / (".tmp-" + MODEL_FILE))
    os.replace(out / (".tmp-" + MODEL_FILE), out / MODEL_FILE)
    model_meta = model_json(hm, net, options=options, key=key, best_epoch=best["epoch"])
    model_meta["files"] = {MODEL_FILE: sha256_file(out / MODEL_FILE)}
    atomic_write_json(out / MODEL_META, model_meta, seal=True)
    ips = [h["train_images_per_s"] for h in history]
    head_acc = _head_test_accuracy(hm)
    metrics = {
        "initial_test_accuracy": initial["test_accuracy"], "head_test_accuracy": head_acc,
        "initial_val_accuracy": initial["val_accuracy"], "initial_val_loss": initial["val_loss"],
        "test_accuracy": m["accuracy"], "test_loss": r["loss"],
        "macro_f1": m["macro_f1"], **({"top5_accuracy": m["top5_accuracy"]} if "top5_accuracy" in m else {}),
        "best_epoch": int(best["epoch"]), "best_val_accuracy": best["val_accuracy"], "epochs_run": len(history),
        "stopped_early": len(history) < options["epochs"], "validation": val_source,
        "recoveries": [e for h in history for e in h.get("recoveries") or []],
        "curve": history, "per_class_accuracy": m["per_class_accuracy"], "confusion_matrix": m["confusion"],
        "classes": classes,
        "train_images_per_s": round(float(np.mean(ips)), 2) if ips else None,
        "images": {s: len(parts[s][0]) for s in ("train", "val", "test")},
        "options": options, "head": str(hm.head.path), "head_kind": hm.head.meta.get("kind"),
        "layer": hm.head.layer, "backbone": hm.manifest["config"]["backbone"], "weights": hm.weights_id,
        "features": hm.head.meta["source"].get("features"), "device": str(dev), "world_size": int(world_size),
        "seconds": round(time.perf_counter() - t_start, 3), "featx_version": featx.__version__,
        **(extra or {}),
    }
    title = f"fine-tuned {hm.head.meta.get('kind')} on {hm.head.layer} ({options['unfreeze']})"
    if history:
        plot_curve(history, out / "curve.png", title=title)
    plot_confusion(np.asarray(m["confusion"]), classes, out / "confusion.png",
                   title=f"{title}: test accuracy {m['accuracy']:.3f}")
    atomic_write_json(out / "metrics.json", metrics)  # last: its presence marks the model finished
    (out / CHECKPOINT).unlink(missing_ok=True)
    logger.info("fine-tuned %s: test accuracy %.4f (before: %.4f, head: %s), best epoch %d, %.1f train images/s",
                key, m["accuracy"], initial["test_accuracy"], _fmt(head_acc), best["epoch"],
                metrics["train_images_per_s"] or 0.0)
    return metrics
