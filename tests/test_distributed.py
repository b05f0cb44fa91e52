"""torchrun: the rank context, extraction shared between ranks (one node, two "nodes" on c10d), bad input.

The multi-process tests start real ``torchrun`` processes on loopback addresses and are marked ``slow``; the
feature sets they make are compared row for row with a single process's.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featx import distributed
from featx.errors import UsageError
from featx.extract import extract
from featx.store import FeatureSet

HERE = Path(__file__).parent
TINY = ["--weights", "random", "--workers", "0", "--batch-size", "4", "--shard-size", "5"]


# ------------------------------------------------------------------------------------------ the context

def test_context_without_torchrun_is_a_world_of_one(monkeypatch):
    for v in (*distributed.ENV_VARS, "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(v, raising=False)
    import torch

    ctx = distributed.init(torch.device("cpu"))  # starts nothing
    assert (ctx.rank, ctx.world_size, ctx.active, ctx.is_main, ctx.backend) == (0, 1, False, True, None)
    assert ctx.all_gather("x") == ["x"] and ctx.broadcast(3) == 3 and ctx.all_reduce_sum([1, 2]) == [1.0, 2.0]
    ctx.agree({"layers": ["pool5"]})
    ctx.check_shared(Path("/nonexistent/never/made"), what="cache")  # a no-op: nothing to share with
    assert not Path("/nonexistent/never/made").exists()


def test_context_reads_torchruns_variables(monkeypatch):
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "TORCHELASTIC_RESTART_COUNT": "2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ctx = distributed.from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size, ctx.restart_count) == (3, 4, 1, 2, 2)
    assert ctx.active and not ctx.is_main
    cores = len(os.sched_getaffinity(0))
    assert distributed.cores_per_process() == max(1, cores // 2)  # the node's cores shared out between its 2 ranks
    for v in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    import torch

    with pytest.raises(UsageError, match="WORLD_SIZE=4 is set but MASTER_ADDR and MASTER_PORT not"):
        distributed.init(torch.device("cpu"))  # a stray WORLD_SIZE: one line, not torch's traceback
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UsageError, match="inconsistent torchrun environment"):
        distributed.from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(UsageError, match="RANK='x'"):
        distributed.from_env()


# ------------------------------------------------------------------------------------------ torchrun runs

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nnodes: int = 1, nproc: int = 2, port: int | None = None, script: str | None = None,
             max_restarts: int = 0, env: dict | None = None) -> subprocess.Popen:
    """Start ``torchrun`` (one "node") running featx with ``args``; the c10d rendezvous on a loopback port."""
    port = port or _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"featx-test-{port}",
           "--local-addr", "127.0.0.1", "--max-restarts", str(max_restarts), "--monitor-interval", "0.2"]
    cmd += [str(HERE / script)] if script else ["-m", "featx"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)


def finish(*procs: subprocess.Popen, timeout: float = 300) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, so, se))
    return out


def _same_rows(a: Path, b: Path, layers=("pool5",)) -> None:
    fa, fb = FeatureSet(a), FeatureSet(b)
    for layer in layers:
        np.testing.assert_array_equal(fa.load(layer), fb.load(layer))
    for col in ("path", "split", "view"):
        assert list(fa.column(col)) == list(fb.column(col))
    np.testing.assert_array_equal(fa.labels(), fb.labels())
    ma, mb = fa.manifest, fb.manifest
    assert ma is not None and mb is not None
    assert {k for k in ma if ma[k] != mb[k]} <= {"timings", "created", "digest"}  # all else the same
    assert sorted(p.name for p in a.glob("shard-*.h5")) == sorted(p.name for p in b.glob("shard-*.h5"))


@pytest.fixture(scope="module")
def data20(tmp_path_factory):
    """20 real digits (10 classes): 4 shards of 5 images."""
    from featx.datasets.digits import write_digits

    return write_digits(tmp_path_factory.mktemp("d20") / "digits", limit=20)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_and_a_kill_minus_9_restarts_only_the_missing_shards(data20, tmp_path):
    single = extract(data20, cache=tmp_path / "one", weights="random", workers=0, batch_size=4, shard_size=5)
    # rank 1 is killed (SIGKILL) right after its first shard; torchrun restarts both ranks once
    p = torchrun("extract", str(data20), *TINY, "--cache", str(tmp_path / "two"), script="featx_killed_once.py",
                 max_restarts=1, env={"KILL_RANK": "1", "KILL_AT": "extract.shard"})
    (rc, out, err), = finish(p)
    assert rc == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == str(tmp_path / "two" / "features" / single.path.name)
    todo = [int(n) for n in re.findall(r"(\d+) to compute by 2 ranks", err)]
    assert len(todo) == 4 and todo[:2] == [4, 4] and max(todo[2:]) < 4, err  # the restart computed fewer shards
    assert err.count("by this one (1") == 1  # shard 1, rank 1's finished one, was kept, not computed again
    assert not list((tmp_path / "two" / "features" / single.path.name).glob(".tmp-*"))
    _same_rows(single.path, tmp_path / "two" / "features" / single.path.name)


@pytest.mark.slow
def test_two_nodes_on_the_c10d_rendezvous_equal_one_process(data20, tmp_path):
    # --normalize dataset: the train split's statistics are measured by both ranks and still equal one process's
    args = ["extract", str(data20), *TINY, "--layer", "pool5", "--layer", "fc7", "--normalize", "dataset", "--split",
            "test=0.3", "--cache", str(tmp_path / "two")]
    port = _free_port()
    nodes = [torchrun(*args, nnodes=2, nproc=1, port=port) for _ in range(2)]
    results = finish(*nodes)
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    single = extract(data20, layers=["pool5", "fc7"], normalize="dataset", split="test=0.3", cache=tmp_path / "one",
                     weights="random", workers=0, batch_size=4, shard_size=5)
    assert results[0][1].strip().splitlines()[-1] == str(tmp_path / "two" / "features" / single.path.name)
    _same_rows(single.path, tmp_path / "two" / "features" / single.path.name, layers=("pool5", "fc7"))


@pytest.mark.slow
def test_ranks_that_disagree_stop_with_one_error_and_write_nothing(data20, tmp_path):
    port = _free_port()
    cache = tmp_path / "c"
    a = torchrun("extract", str(data20), *TINY, "--layer", "pool5", "--cache", str(cache), nnodes=2, nproc=1, port=port)
    b = torchrun("extract", str(data20), *TINY, "--layer", "fc7", "--cache", str(cache), nnodes=2, nproc=1, port=port)
    for rc, _, err in finish(a, b):
        assert rc != 0
        assert "featx: error: the 2 torchrun ranks disagree on layers: rank 0" in err, err[-3000:]
        assert "['pool5']" in err and "['fc7']" in err and "nothing was written" in err
        # featx's own error is one line with no traceback; torchrun's agent then reports the failed rank with a
        # traceback of its own (torch.distributed.run's ChildFailedError), which holds no frame of featx's
        assert err.count("featx: error") == 1 and not re.search(r'File "[^"]*/featx/', err), err[-3000:]
    assert not (cache / "features").exists()


@pytest.mark.slow
def test_a_cache_that_is_not_shared_between_nodes_is_detected(data20, tmp_path):
    port = _free_port()
    env = {"FEATX_SHARED_WAIT": "1"}
    a = torchrun("extract", str(data20), *TINY, "--cache", str(tmp_path / "node-a"), nnodes=2, nproc=1, port=port,
                 env=env)
    b = torchrun("extract", str(data20), *TINY, "--cache", str(tmp_path / "node-b"), nnodes=2, nproc=1, port=port,
                 env=env)
    for rc, _, err in finish(a, b):
        assert rc != 0
        assert "is not shared between the torchrun ranks: rank 1" in err, err[-3000:]
    assert not list((tmp_path / "node-a").rglob("*-*")) and not list((tmp_path / "node-b").rglob("*-*"))


# ------------------------------------------------------------------------------------------ TensorBoard

@pytest.fixture(scope="module")
def tiny_head(digits_dir, tmp_path_factory):
    """15 digits of 3 classes (9 train, 3 val, 3 test) -> pool5 -> logreg head."""
    import shutil

    from featx.fit import fit_head

    root = tmp_path_factory.mktemp("dist-tiny")
    for c in range(3):
        (root / "data" / str(c)).mkdir(parents=True)
        for p in sorted((digits_dir / str(c)).glob("*.png"))[:5]:
            shutil.copy(p, root / "data" / str(c) / p.name)
    fs = extract(root / "data", split="test=0.2,val=0.2", cache=root / "c", weights="random", workers=0,
                 batch_size=20)
    return fit_head(fs.path, "logreg", cache=root / "c").path


def _scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in ``directory``'s event files, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_curves_continue_after_a_kill_without_duplicates(tiny_head, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import featx.finetune as ft
    import featx.finetune.loop as loop

    kw = dict(epochs=3, augment="none", batch_size=5, workers=0, schedule="cosine", progress=False, cache=tmp_path)
    save = loop.save_checkpoint

    def killed_before_epoch_2s_checkpoint(path, checkpoint):
        if checkpoint.progress.epoch == 2:
            raise KeyboardInterrupt  # as a kill: epoch 2's points are on disk, its checkpoint is not
        save(path, checkpoint)

    monkeypatch.setattr(loop, "save_checkpoint", killed_before_epoch_2s_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(tiny_head, **kw)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    res = ft.finetune(tiny_head, **kw)  # resumes after epoch 1
    curve = res.metrics["curve"]
    assert [r["epoch"] for r in curve] == [1, 2, 3]
    tb = _scalars(res.path)
    assert list(res.path.glob("events.out.tfevents.*")) and len(list(res.path.glob("events.out.tfevents.*"))) == 2
    assert {"loss/train", "loss/val", "loss/test", "accuracy/train", "accuracy/val", "accuracy/test", "lr",
            "world_size"} <= set(tb)
    assert [s for s, _ in tb["loss/train"]] == [1, 2, 3]  # epoch 2 once: the killed run's point was purged
    assert [s for s, _ in tb["accuracy/test"]] == [0, 1, 2, 3]  # step 0: the network before training
    for tag, key in (("loss/train", "train_loss"), ("accuracy/val", "val_accuracy"), ("lr", "lr")):
        np.testing.assert_allclose([v for s, v in tb[tag] if s > 0], [r[key] for r in curve], rtol=1e-6)
    assert tb["accuracy/test"][0][1] == pytest.approx(res.metrics["initial_test_accuracy"])
    assert [v for _, v in tb["world_size"]] == [1.0] * 4


# ------------------------------------------------------------------------------------------ DDP fine-tuning

@pytest.mark.slow
def test_ddp_two_processes_give_one_process_curve_and_resume_after_kill_minus_9_and_sigterm(tiny_head, tmp_path):
    """Tolerance: the two runs do the same float32 arithmetic except for the order of summation (two partial
    gradients all-reduced instead of one backward over the batch), measured at <= 2e-5 relative on these curves;
    rtol 1e-3 leaves room for other CPUs' kernels, while one epoch of training changes the train loss by > 5%
    here, so a wrong gradient scale (a local instead of global mean, a rank that sees the whole batch) or a rank
    training on other images cannot pass."""
    import shutil

    from featx.finetune import finetune

    # 9 train images in global batches of 4: 4, 4, 1; the last step leaves rank 1 an empty part (it still joins)
    opts = dict(epochs=2, augment="none", batch_size=4, lr=0.01, schedule="cosine")
    cache = tmp_path / "one"
    shutil.copytree(tiny_head.parents[1], cache)  # the head and its features, so both caches hold the same set
    single = finetune(cache / "heads" / tiny_head.name, workers=0, progress=False, **opts)
    cli = ["finetune", str(tiny_head), "--epochs", "2", "--augment", "none", "--batch-size", "4", "--lr", "0.01",
           "--schedule", "cosine", "--workers", "0", "--cache", str(tmp_path / "two")]
    # rank 1 is killed (SIGKILL) right after its 4th step, the first of epoch 2: epoch 1's checkpoint is written
    (rc, out, err), = finish(torchrun(*cli, script="featx_killed_once.py",
                                      env={"KILL_RANK": "1", "KILL_AT": "finetune.step:4"}))
    assert rc != 0 and "exitcode  : -9" in err, err[-3000:]
    # then a SIGTERM to every rank at its 2nd training step (the 2nd of epoch 2): they stop together, rank 0
    # checkpoints that step with the loss sums of both ranks
    (rc, out, err), = finish(torchrun(*cli, env={"FEATX_STOP_AT": "finetune.step:2:SIGTERM"}))
    assert rc != 0 and "after epoch 1 of 2" in err, err[-3000:]
    assert "stopped before step 2 of epoch 2" in err and "exitcode  : 143" in err, err[-3000:]
    (rc, out, err), = finish(torchrun(*cli))
    assert rc == 0, err[-3000:]
    assert "resuming" in err and "at step 1 of epoch 2 of 2" in err, err[-3000:]
    model = Path(out.strip().splitlines()[-1])
    assert model.name == single.path.name  # the key does not depend on the number of processes
    m = __import__("json").loads((model / "metrics.json").read_text())
    assert m["world_size"] == 2 and [r["epoch"] for r in m["curve"]] == [1, 2]
    assert m["curve"][1]["train_loss"] < 0.95 * m["curve"][0]["train_loss"]  # training moves the curve
    for key in ("train_loss", "val_loss", "test_loss"):
        np.testing.assert_allclose([r[key] for r in m["curve"]], [r[key] for r in single.metrics["curve"]],
                                   rtol=1e-3, err_msg=key)
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert [r[key] for r in m["curve"]] == [r[key] for r in single.metrics["curve"]]
    if __import__("importlib").util.find_spec("tensorboard"):  # rank 0's curves, continued after the kill
        tb = _scalars(model)
        assert [s for s, _ in tb["loss/train"]] == [1, 2] and [s for s, _ in tb["accuracy/test"]] == [0, 1, 2]
        assert [v for _, v in tb["world_size"]] == [2.0] * 3
