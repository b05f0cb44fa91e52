"""featx ls / verify / prune on a cache built by hand: what is listed, what is removed, what is kept."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from filelock import FileLock

from featx.cache import atomic_write_json
from featx.cli import main
from featx.errors import UsageError
from featx.maintain import TMP_GRACE_S, items, ls, prune, verify

OLD = time.time() - 3 * 24 * 3600  # three days ago


def _age(path: Path, when: float = OLD) -> None:
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (when, when))


@pytest.fixture
def cache(tmp_path) -> Path:
    """A finished feature set and head, a run, a study journal, an old unfinished feature set, an old unfinished
    model, a fresh unfinished head, and two leftovers of killed writes (one old, one fresh)."""
    c = tmp_path / "cache"
    fs = c / "features" / "aaaa"
    atomic_write_json(fs / "manifest.json", {"key": "aaaa", "format_version": 2, "n_rows": 120, "classes": ["a", "b"],
                                             "config": {"layers": ["pool5", "fc7"], "backbone": "alexnet"},
                                             "shards": []}, seal=True)
    head = c / "heads" / "hhhh"
    atomic_write_json(head / "featx-head.json", {"kind": "svm", "files": {}}, seal=True)
    atomic_write_json(head / "metrics.json", {"kind": "svm", "layer": "pool5", "test_accuracy": 0.8125})
    run = c / "runs" / "rrrr"
    atomic_write_json(run / "results.json", {"pipeline": "quick", "rows": [{"test_accuracy": 0.5},
                                                                           {"test_accuracy": 0.75}]})
    (c / "studies").mkdir()
    record = {"op_code": 0, "worker_id": "w", "study_name": "s1"}
    (c / "studies" / "featx.journal").write_text(json.dumps(record) + "\n")
    old_fs = c / "features" / "bbbb"
    atomic_write_json(old_fs / "plan.json", {"n_items": 3})
    (old_fs / ".lock").touch()
    _age(old_fs)
    old_model = c / "models" / "mmmm"
    (old_model / "checkpoint.pt").parent.mkdir(parents=True)
    (old_model / "checkpoint.pt").write_bytes(b"x" * 100)
    (old_model / ".lock").touch()
    _age(old_model)
    fresh_head = c / "heads" / "ffff"
    fresh_head.mkdir()
    (fresh_head / "scaler.npz").write_bytes(b"y")
    old_tmp = c / "heads" / ".tmp-zzzz.partial-abc"
    old_tmp.mkdir()
    (old_tmp / "head.npz").write_bytes(b"z" * 10)
    _age(old_tmp)
    (fs / ".tmp-shard-00000.h5-xyz").write_bytes(b"t")
    _age(fs / ".tmp-shard-00000.h5-xyz")
    fresh_tmp = c / "heads" / ".tmp-yyyy.partial-def"
    fresh_tmp.mkdir()
    return c


def test_ls_lists_every_item_with_size_date_status_and_headline(cache):
    by_key = {it.key: it for it in ls(cache)}
    assert {"aaaa", "hhhh", "rrrr", "featx.journal", "bbbb", "mmmm", "ffff", ".tmp-zzzz.partial-abc"} <= set(by_key)
    assert ".tmp-shard-00000.h5-xyz" not in by_key  # inside an item: counted in its size
    fs = by_key["aaaa"]
    assert fs.kind == "features" and fs.status == "finished"
    assert "120 rows" in fs.headline and "pool5,fc7" in fs.headline
    assert by_key["hhhh"].headline == "svm on pool5: test accuracy 0.8125"
    run = by_key["rrrr"]
    assert run.kind == "run" and "2 case(s)" in run.headline and "0.7500" in run.headline
    assert by_key["featx.journal"].kind == "study" and "1 study" in by_key["featx.journal"].headline
    assert by_key["bbbb"].status == "unfinished" and by_key["mmmm"].status == "unfinished"
    assert by_key["mmmm"].size == 100 and by_key["bbbb"].date < time.time() - 2 * 24 * 3600
    r = CliRunner().invoke(main, ["ls", "--cache", str(cache), "--json"])
    assert r.exit_code == 0
    rows = json.loads(r.output)
    assert {"kind", "key", "path", "size", "date", "status", "headline"} <= set(rows[0])
    table = CliRunner().invoke(main, ["ls", "--cache", str(cache)]).output
    assert table.splitlines()[0].split()[:5] == ["KIND", "KEY", "SIZE", "DATE", "STATUS"] and "0.8125" in table


def test_prune_dry_run_removes_nothing_then_prune_removes_only_old_leftovers(cache):
    before = sorted(p for p in cache.rglob("*"))
    plan = prune(cache=cache, dry_run=True)
    assert sorted(p.path.name for p in plan) == sorted([".tmp-zzzz.partial-abc", ".tmp-shard-00000.h5-xyz", "bbbb",
                                                        "mmmm"])
    assert all(p.action == "would remove" for p in plan) and sorted(p for p in cache.rglob("*")) == before
    r = CliRunner().invoke(main, ["prune", "--dry-run", "--cache", str(cache)])
    assert r.exit_code == 0 and r.output.count("would remove ") == 4 and sorted(cache.rglob("*")) == before

    done = prune(cache=cache)
    assert all(p.action == "removed" for p in done) and len(done) == 4
    left = {it.key for it in items(cache)}
    assert {"aaaa", "hhhh", "rrrr", "featx.journal", "ffff", ".tmp-yyyy.partial-def"} <= left  # finished, fresh
    assert not left & {"bbbb", "mmmm", ".tmp-zzzz.partial-abc", ".tmp-shard-00000.h5-xyz"}
    assert (cache / "features" / "aaaa" / "manifest.json").exists()


def test_trying_an_items_lock_does_not_make_it_look_fresh(cache):
    # filelock truncates a lock file when it tries to take it (most releases do), which sets the file's date to now
    old = cache / "models" / "mmmm"
    os.utime(old / ".lock")
    assert {it.key: it.status for it in ls(cache)}["mmmm"] == "unfinished"
    assert "mmmm" in {p.path.name for p in prune(cache=cache, dry_run=True)}


def test_prune_never_removes_an_item_in_use(cache):
    lock = FileLock(str(cache / "models" / "mmmm" / ".lock"))
    with lock:
        assert {it.key: it.status for it in ls(cache)}["mmmm"] == "in use"
        done = {p.path.name: p for p in prune(cache=cache)}
        assert done["mmmm"].action == "kept" and (cache / "models" / "mmmm" / "checkpoint.pt").exists()
        assert done["bbbb"].action == "removed"
        named = prune(["mmmm"], cache=cache)  # named: still kept while in use
        assert named[0].action == "kept" and (cache / "models" / "mmmm").exists()
    assert prune(["mmmm"], cache=cache)[0].action == "removed" and not (cache / "models" / "mmmm").exists()


def test_prune_removes_what_is_named_by_path_or_key(cache):
    assert [p.action for p in prune([str(cache / "heads" / "hhhh")], cache=cache)] == ["removed"]
    assert [p.action for p in prune(["rrrr"], cache=cache)] == ["removed"]
    assert not (cache / "heads" / "hhhh").exists() and not (cache / "runs" / "rrrr").exists()
    with pytest.raises(UsageError, match="no such file"):
        prune(["nothing-here"], cache=cache)
    with pytest.raises(UsageError, match="whole cache"):
        prune([str(cache)], cache=cache)


def test_a_fresh_leftover_is_kept_for_its_grace_period(cache):
    fresh = cache / "heads" / ".tmp-yyyy.partial-def"
    assert fresh.name not in {p.path.name for p in prune(cache=cache, dry_run=True)}
    later = time.time() + TMP_GRACE_S + 60
    assert fresh.name in {p.path.name for p in prune(cache=cache, dry_run=True, now=later)}


def test_verify_lists_a_damaged_manifest_run_and_journal_and_exits_non_zero(cache):
    assert verify(cache=cache).problems == []
    m = cache / "features" / "aaaa" / "manifest.json"
    m.write_text(m.read_text().replace("120", "121"))  # edited: still JSON
    (cache / "runs" / "rrrr" / "results.json").write_text('{"rows": [')  # torn
    with open(cache / "studies" / "featx.journal", "a") as f:
        f.write('{"op_code": 4, "worker')  # a record cut off
    rep = verify(cache=cache)
    assert {p.path.name for p in rep.problems} == {"aaaa", "rrrr", "featx.journal"}
    assert [p.path.name for p in verify(cache / "runs" / "rrrr").problems] == ["rrrr"]
    r = CliRunner().invoke(main, ["verify", "--cache", str(cache)])
    assert r.exit_code == 1 and "manifest.json" in r.output


def test_a_head_being_saved_is_in_use(cache):
    """A head's lock lies beside it (heads/<key>.lock: the finished directory replaces the temporary one whole)."""
    from featx.locks import hold

    with hold(cache / "heads" / "hhhh.lock", what="head hhhh"):
        assert {it.key: it.status for it in ls(cache)}["hhhh"] == "in use"
        assert prune(["hhhh"], cache=cache)[0].action == "kept"
    assert "hhhh.lock" not in {it.key for it in ls(cache)}  # the lock file is no item
    assert prune(["hhhh"], cache=cache)[0].action == "removed"
