"""A read-only cache: fit into another cache, predict, ls, verify and run --dry-run read it without writing; a
command that must write says so in one line (exit code 73).

As root, ``chmod -R a-w`` does not stop a write: the cache is then also seen through a read-only bind mount (or
the test is skipped, saying why)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import run_cli
from test_run import DIGITS, TINY

from featx.errors import ReadOnlyCacheError
from featx.extract import extract
from featx.fit import fit_head

KW = dict(weights="random", seed=0, workers=0, batch_size=16)


def _read_only(cache: Path, view: Path) -> Path:
    """``cache`` made read-only: chmod -R a-w, and as root a read-only bind mount at ``view`` (returned)."""
    subprocess.run(["chmod", "-R", "a-w", str(cache)], check=True)
    if os.geteuid() != 0:
        return cache
    view.mkdir()
    for cmd in (["mount", "--bind", str(cache), str(view)], ["mount", "-o", "remount,bind,ro", str(view)]):
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            subprocess.run(["umount", "-l", str(view)], check=False)
            pytest.skip(f"running as root, where chmod does not stop writes, and a read-only bind mount is not "
                        f"possible here: {p.stderr.strip()}")
    return view


@pytest.fixture(scope="module")
def ro(tmp_path_factory, digits_dir):
    """A cache holding a feature set and a head, read-only; yields (cache as seen read-only, features, head)."""
    base = tmp_path_factory.mktemp("ro")
    cache = base / "cache"
    fs = extract(digits_dir, layers=["pool5"], cache=cache, **KW)
    head = fit_head(fs.path, "logreg", params={"C": 1.0}, cache=cache)
    view = _read_only(cache, base / "view")
    yield view, view / "features" / fs.path.name, view / "heads" / head.path.name
    if view != cache:
        subprocess.run(["umount", "-l", str(view)], check=False)
    subprocess.run(["chmod", "-R", "u+w", str(cache)], check=False)


def _ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def _refused(p: subprocess.CompletedProcess) -> str:
    lines = [line for line in p.stderr.splitlines() if line.startswith("featx: error")]
    assert p.returncode == ReadOnlyCacheError.exit_code, p.stderr[-2000:]
    assert len(lines) == 1 and "is read-only" in lines[0] and "Traceback" not in p.stderr
    return lines[0]


def test_the_cache_cannot_be_written(ro):
    cache, _, _ = ro
    with pytest.raises(OSError):
        (cache / "probe").write_text("x")


def test_ls_and_verify_read_a_read_only_cache(ro):
    cache, features, head = ro
    out = _ok(run_cli("ls", "--cache", str(cache)))
    assert features.name in out and head.name in out
    _ok(run_cli("verify", str(cache), "--cache", str(cache)))


def test_fit_on_read_only_features_into_another_cache(ro, tmp_path):
    from featx.fit import head_problem

    _, features, _ = ro
    out = _ok(run_cli("fit", "logreg", str(features), "--cache", str(tmp_path / "mine"), "--quiet"))
    made = Path(out.strip().splitlines()[-1])
    assert made.parent == tmp_path / "mine" / "heads" and head_problem(made) is None


def test_predict_with_a_read_only_head(ro, tmp_path, digits_dir):
    _, _, head = ro
    image = next(digits_dir.rglob("*.png"))
    out = _ok(run_cli("predict", str(head), str(image), "--cache", str(tmp_path / "mine"), "--device", "cpu"))
    assert str(image) in out
    line = _refused(run_cli("predict", str(head), str(image), "--cache", str(head.parents[1]), "--device", "cpu"))
    assert str(head.parents[1]) in line


def test_run_dry_run_on_a_read_only_cache(ro, digits_dir):
    cache, _, _ = ro
    out = _ok(run_cli("run", str(DIGITS), "--dry-run", "--data", str(digits_dir), "--weights", "random",
                      "--cache", str(cache), *[a for s in TINY for a in ("--set", s)]))
    assert "results would go to" in out


def test_commands_that_must_write_say_so_in_one_line(ro, digits_dir):
    cache, features, _ = ro
    _refused(run_cli("extract", str(digits_dir), "--weights", "random", "--layer", "fc6", "--workers", "0",
                     "--cache", str(cache)))
    _refused(run_cli("fit", "logreg", str(features), "--C", "0.5", "--cache", str(cache)))
