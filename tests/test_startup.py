"""Each command imports only what it uses: no torch for the numpy heads, no scikit-learn to fit, evaluate or
save them, no Optuna outside search, matplotlib only when a plot is drawn, and a bare ``featx --help``.

Every check runs the real CLI in a fresh interpreter and reads ``sys.modules`` at its end: deterministic (what
was imported, never how long it took).  The MLP fit is the control that shows the probe does see torch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    from benchmarks.synth import make_pool5_like, write_h5
except ImportError:  # benchmarks/ is a plain folder; make it importable when pytest did not put the root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.synth import make_pool5_like, write_h5

ROOT = Path(__file__).resolve().parents[1]
WATCHED = ("torch", "torchvision", "optuna", "matplotlib", "sklearn", "sklearn.metrics", "h5py")

# Runs featx's CLI in this interpreter, then prints which watched modules were imported, as JSON on stderr's
# last line (stdout stays the command's own).
_PROBE = f"""
import json, sys
from featx.cli import main
code = 0
try:
    main(sys.argv[1:], prog_name="featx")
except SystemExit as e:
    code = e.code or 0
print(json.dumps({{"code": code, "modules": [m for m in {WATCHED!r} if m in sys.modules]}}), file=sys.stderr)
"""


def imported(*args: str) -> set[str]:
    """The watched modules that ``featx ARGS`` imported; fails the test if the command failed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    report = json.loads(p.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, p.stderr[-2000:]
    return set(report["modules"])


@pytest.fixture(scope="module")
def feats(tmp_path_factory) -> Path:
    X, y = make_pool5_like(n=120, d=72, k=3, seed=0, class_sep=2.0)
    path = tmp_path_factory.mktemp("startup") / "f.h5"
    write_h5(path, X, y, seed=0)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("args", [["--help"], ["fit", "svm", "--help"], ["search", "--help"]], ids=" ".join)
def test_help_imports_nothing_heavy(args):
    assert imported(*args) & {"torch", "torchvision", "optuna", "matplotlib", "sklearn", "h5py"} == set()


@pytest.mark.parametrize("kind", ["svm", "logreg"])
def test_fit_linear_head_without_torch_or_optuna(feats, cache, kind):
    mods = imported("fit", kind, str(feats), "--cache", str(cache), "--device", "auto", "-q")
    assert "torch" not in mods and "optuna" not in mods
    assert "sklearn" not in mods  # the heads speak scikit-learn's protocol without it; the metrics are numpy
    assert "matplotlib" in mods  # it draws confusion.png


def test_evaluate_without_torch_or_optuna(feats, cache):
    out = subprocess.run([sys.executable, "-m", "featx", "fit", "svm", str(feats), "--cache", str(cache), "-q"],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    mods = imported("evaluate", out, str(feats), "--cache", str(cache), "-q")
    assert "torch" not in mods and "optuna" not in mods and "sklearn" not in mods


def test_search_linear_head_without_torch(feats, cache):
    mods = imported("search", "logreg", str(feats), "--trials", "2", "--cv", "2", "--cache", str(cache), "-q")
    assert "torch" not in mods
    assert "optuna" in mods


def test_fit_mlp_does_import_torch(feats, cache):
    """The control: the probe sees torch when a command really uses it."""
    mods = imported("fit", "mlp", str(feats), "--epochs", "2", "--hidden", "8", "--cache", str(cache), "-q")
    assert "torch" in mods and "optuna" not in mods


def test_numpy_metrics_match_sklearn():
    from sklearn.metrics import confusion_matrix, f1_score

    from featx.metrics import confusion, macro_f1

    rng = np.random.default_rng(0)
    for k in (2, 5, 12):
        y = rng.integers(0, k, 300)
        pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, k - 1, 300))  # class k-1 rarely predicted
        y[y == 1] = 0  # class 1 never true
        cm = confusion(y, pred, k)
        np.testing.assert_array_equal(cm, confusion_matrix(y, pred, labels=np.arange(k)))
        assert macro_f1(cm) == pytest.approx(f1_score(y, pred, labels=np.arange(k), average="macro", zero_division=0))


def test_device_type_without_torch():
    from featx.devices import resolve_device_type
    from featx.errors import UsageError

    assert resolve_device_type("cpu") == "cpu"
    assert resolve_device_type("auto") in ("cpu", "cuda")
    with pytest.raises(UsageError, match="use auto, cpu or cuda"):
        resolve_device_type("tpu")


def test_extract_lists_and_hashes_the_images_before_importing_torch():
    """Importing featx.extract imports neither torch nor torchvision: extract() starts hashing the images first,
    so that the hash runs while they are imported."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = "import sys, featx.extract; print([m for m in ('torch', 'torchvision') if m in sys.modules])"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert p.stdout.strip() == "[]"
