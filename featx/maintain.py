"""``featx ls``, ``featx verify`` and ``featx prune``: the cache as a managed store.

The cache holds one folder per kind of output (``features/``, ``heads/``, ``models/``, ``studies/``, ``runs/``,
``predictions/``, ``evaluations/``), one item per key in each.  An item is *finished* when the file its stage
writes last is there (a feature set's ``manifest.json``, a head's or model's ``metrics.json``, ...), *in use*
while a stage holds one of its locks (the ``.lock`` files of :mod:`featx.locks`, in the item or beside it), and
*unfinished* otherwise.  ``.tmp-*`` entries are what a killed write left behind.

Verification reads every byte that carries a check: every shard past its fletcher32 checksums, every sealed JSON
against its digest, every head and model file against its recorded sha256; only a file that fails is reported.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from featx import interrupt
from featx.cache import cache_root, read_json, read_sealed_json, repair_hint
from featx.errors import FeatxError, IntegrityError, UsageError

logger = logging.getLogger(__name__)

KINDS = {  # folder -> (item kind, the file whose presence marks the item finished; None: always finished)
    "features": ("features", "manifest.json"),
    "heads": ("head", "metrics.json"),
    "models": ("model", "metrics.json"),
    "studies": ("study", None),
    "runs": ("run", None),
    "predictions": ("prediction", "summary.json"),
    "evaluations": ("evaluation", "metrics.json"),
}
TMP_PREFIX = ".tmp-"
TMP_GRACE_S = 600.0  # a temporary entry untouched this long, outside a locked item, is a killed run's leftover
DAY_S = 24 * 3600.0


@dataclass
class Item:
    """One entry of the cache."""

    kind: str            # features, head, model, study, run, prediction, evaluation, temporary
    path: Path
    size: int            # bytes, everything under it
    date: float          # modification time: of the file that finished it, else of its newest file
    status: str          # finished, unfinished, in use, temporary
    headline: str = ""
    info: dict = field(default_factory=dict)
    finished: bool = False

    @property
    def key(self) -> str:
        return self.path.name

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["date"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.date))
        d["key"] = self.key
        return d


# ============================================================================================== listing

def _tree(path: Path) -> tuple[int, float]:
    """(bytes, newest mtime) of everything under ``path``.

    A ``*.lock`` file's date is left out: most filelock releases truncate the lock file on every attempt to take it,
    so its date says when the lock was last tried (by :func:`in_use` too), not when the item was written.
    """
    try:
        st = path.lstat()
    except OSError:
        return 0, 0.0
    if not path.is_dir() or path.is_symlink():
        return st.st_size, st.st_mtime
    size, newest = 0, st.st_mtime
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                s = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            size += s.st_size
            if not name.endswith(".lock"):
                newest = max(newest, s.st_mtime)
    return size, newest


def in_use(path: Path) -> bool:
    """True while a featx process holds one of the item's locks (``*.lock`` directly in it, or beside it: see
    :mod:`featx.locks`)."""
    from featx.locks import is_held

    if not path.is_dir():  # a study journal: Optuna's open() lock is a file that exists while held
        return path.with_name(path.name + ".lock").exists()
    return any(is_held(lock) for lock in [*path.glob("*.lock"), path.with_name(path.name + ".lock")])


def _finished_marker(kind: str, path: Path, marker: str | None) -> Path | None:
    if marker is None:
        return path
    if kind == "model":  # featx.model's MODEL_META and MODEL_FILE, named here so that listing never imports torch
        need = [path / marker, path / "model.json", path / "model.pt"]
    elif kind == "head":
        need = [path / marker, path / "featx-head.json"]
    else:
        need = [path / marker]
    return need[0] if all(p.exists() for p in need) else None


def _fmt_acc(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def _headline(kind: str, path: Path) -> tuple[str, dict]:
    """A short description of a finished item, and the figures behind it (never raises)."""
    try:
        if kind == "features":
            m = read_json(path / "manifest.json") or {}
            c = m.get("config", {})
            info = {"rows": m.get("n_rows"), "layers": c.get("layers"), "backbone": c.get("backbone"),
                    "format_version": m.get("format_version", 1), "classes": len(m.get("classes", []))}
            return (f"{info['rows']} rows, {info['classes']} classes, {c.get('backbone')} "
                    f"{','.join(c.get('layers') or [])}, format {info['format_version']}"), info
        if kind in ("head", "model"):
            m = read_json(path / "metrics.json") or {}
            info = {"test_accuracy": m.get("test_accuracy")}
            if kind == "head":
                info.update(kind=m.get("kind"), layer=m.get("layer"))
                what = f"{m.get('kind')} on {m.get('layer')}" + (" (search)" if "search" in m else "")
            else:
                info.update(kind=m.get("head_kind"), layer=m.get("layer"), before=m.get("initial_test_accuracy"))
                what = f"fine-tuned {m.get('head_kind')} on {m.get('backbone')} {m.get('layer')}"
            return f"{what}: test accuracy {_fmt_acc(info['test_accuracy'])}", info
        if kind == "prediction":
            m = read_json(path / "summary.json") or {}
            return f"{m.get('n_images')} images, {m.get('n_errors')} errors", {"images": m.get("n_images")}
        if kind == "evaluation":
            m = read_json(path / "metrics.json") or {}
            return f"accuracy {_fmt_acc(m.get('accuracy'))} on {m.get('n')} {m.get('split')} rows", \
                {"accuracy": m.get("accuracy")}
        if kind == "run":
            return _run_headline(path)
        if kind == "study":
            names = _journal_studies(path) if path.is_file() and path.suffix in (".journal", ".log") else None
            if names is not None:
                return f"optuna journal: {len(names)} stud{'y' if len(names) == 1 else 'ies'}", {"studies": names}
            return "optuna storage", {}
    except Exception as e:  # a listing must list, whatever one item holds
        return f"(unreadable: {type(e).__name__})", {}
    return "", {}


def _run_headline(path: Path) -> tuple[str, dict]:
    res = read_json(path / "results.json") if path.is_dir() else None
    if not isinstance(res, dict):
        n = sum(1 for _ in path.iterdir()) if path.is_dir() else 1
        return f"{n} file(s), no results.json", {}
    got = res.get("rows")
    rows: list = got if isinstance(got, list) else []
    accs: list[float] = [r["test_accuracy"] for r in rows
            if isinstance(r, dict) and isinstance(r.get("test_accuracy"), (int, float))]
    failed = len([r for r in rows if isinstance(r, dict) and r.get("status") == "failed"])
    head = f"{res.get('pipeline') or 'run'}: {len(rows)} case(s)"
    if accs:
        head += f", best test accuracy {max(accs):.4f}"
    if failed:
        head += f", {failed} failed"
    return head, {"cases": len(rows), "best_test_accuracy": max(accs) if accs else None, "failed": failed}


def _journal_studies(path: Path) -> list[str]:
    names = []
    with open(path, "rb") as f:
        for line in f:
            try:
                op = json.loads(line)
            except ValueError:
                continue
            if isinstance(op, dict) and op.get("op_code") == 0 and "study_name" in op:  # CREATE_STUDY
                names.append(str(op["study_name"]))
    return names


def items(cache: str | os.PathLike | None = None) -> list[Item]:
    """Every item of the cache (temporary leftovers included), sorted by kind then date."""
    root = cache_root(cache)
    out: list[Item] = []
    for folder, (kind, marker) in KINDS.items():
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.iterdir()):
            if path.name.endswith(".lock"):
                continue
            size, newest = _tree(path)
            if path.name.startswith(TMP_PREFIX):
                out.append(Item("temporary", path, size, newest, "temporary", f"left in {folder}/ by a killed write"))
                continue
            if kind != "study" and not path.is_dir():
                continue
            done = _finished_marker(kind, path, marker)
            busy = in_use(path)
            status = "in use" if busy else ("finished" if done is not None else "unfinished")
            date = done.stat().st_mtime if done is not None and done.is_file() else newest
            head, info = _headline(kind, path) if done is not None else ("", {})
            out.append(Item(kind, path, size, date, status, head, info, finished=done is not None))
            if path.is_dir():
                for tmp in sorted(path.glob(TMP_PREFIX + "*")):
                    s, t = _tree(tmp)
                    out.append(Item("temporary", tmp, s, t, "in use" if busy else "temporary",
                                    f"left in {kind} {path.name} by a killed write"))
    return out


def ls(cache: str | os.PathLike | None = None) -> list[Item]:
    """:func:`items` without the temporary leftovers inside items (they are counted in their item's size)."""
    return [it for it in items(cache) if not (it.kind == "temporary" and it.path.parent.parent != cache_root(cache))]


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_table(its: Sequence[Item]) -> str:
    """Items as a fixed-width table: kind, key, size, date, status, headline."""
    rows = [("KIND", "KEY", "SIZE", "DATE", "STATUS", "HEADLINE")]
    for it in its:
        rows.append((it.kind, it.key, human_size(it.size), time.strftime("%Y-%m-%d %H:%M", time.localtime(it.date)),
                     it.status, it.headline))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows) + "\n"


# ============================================================================================== verify

@dataclass
class Problem:
    """A damaged item: where, what, and the command that repairs it."""

    path: Path
    kind: str
    what: str

    def line(self) -> str:
        return f"damaged {self.kind} {self.path}: {self.what}"


@dataclass
class VerifyReport:
    checked: list[Item]
    problems: list[Problem]
    unverified: list[str]  # items that carry no checks (format 1 feature sets)


def _check_features(path: Path) -> list[str]:
    from featx.store import read_manifest, shard_problem

    try:
        m = read_manifest(path)
    except IntegrityError as e:
        return [str(e)]
    if m is None:
        return []
    fix = repair_hint(path, verb="recompute it")
    layers = list(m.get("config", {}).get("layers", []))
    return [f"{path / s['file']} is {'missing' if why == 'missing' else 'damaged (' + why + ')'}: {fix}"
            for s in m.get("shards", [])
            if (why := shard_problem(path / s["file"], layers, int(s["rows"]))) is not None]


def _check_json_files(path: Path, names: Iterable[str]) -> list[str]:
    out = []
    for name in names:
        try:
            read_sealed_json(path / name, fix=repair_hint(path))
        except IntegrityError as e:
            out.append(str(e))
    return out


def _check_study(path: Path) -> list[str]:
    if path.suffix in (".db", ".sqlite", ".sqlite3"):
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
                ok = con.execute("PRAGMA integrity_check").fetchone()[0]
        except sqlite3.Error as e:
            return [f"{path} is damaged ({e})"]
        return [] if ok == "ok" else [f"{path} is damaged (sqlite: {ok})"]
    if path.is_file():
        with open(path, "rb") as f:
            for i, line in enumerate(f, 1):
                try:
                    json.loads(line)
                except ValueError:
                    return [f"{path} is damaged (line {i} is not a complete journal record)"]
    return []


def check_item(it: Item) -> list[str]:
    """The problems of one finished item (empty: intact)."""
    p = it.path
    if it.kind == "features":
        return _check_features(p)
    if it.kind == "head":
        from featx.fit import head_problem

        why = head_problem(p)
        return [] if why is None else [f"{why}: {repair_hint(p, verb='fit it again')}"] + \
            _check_json_files(p, ["metrics.json"])
    if it.kind == "model":
        from featx.model import model_problem

        why = model_problem(p)
        return ([] if why is None else [f"{why}: {repair_hint(p, verb='fine-tune it again')}"]) + \
            _check_json_files(p, ["metrics.json"])
    if it.kind == "study":
        return _check_study(p)
    if it.kind in ("prediction", "evaluation", "run"):
        names = sorted(q.name for q in p.glob("*.json")) if p.is_dir() else []
        return _check_json_files(p, names)
    return []


def _resolve(target: str | os.PathLike, cache: str | os.PathLike | None) -> tuple[list[Item], bool]:
    """Items a PATH (cache root, kind folder, item, or a key) names; and whether it was the whole cache."""
    t = Path(target).expanduser().absolute()
    if t.exists() and any((t / k).is_dir() for k in KINDS) and t.name not in KINDS:
        return items(t), True
    if t.exists() and t.name in KINDS and t.is_dir():
        return [it for it in items(t.parent) if it.path.parent == t], False
    if t.exists():
        found = [it for it in items(t.parent.parent) if it.path == t]
        if found:
            return found, False
        if t.suffix == ".h5":  # a single HDF5 feature file made elsewhere
            size, date = _tree(t)
            return [Item("features-file", t, size, date, "finished", finished=True)], False
        raise UsageError(f"{t} is not an item of a featx cache: give the cache, a folder such as heads/, "
                         f"or an item's directory")
    keyed = [it for it in items(cache) if it.key == str(target)]
    if keyed:
        return keyed, False
    raise UsageError(f"{target}: no such file, folder or key in {cache_root(cache)}")


def verify(target: str | os.PathLike | None = None, *, cache: str | os.PathLike | None = None) -> VerifyReport:
    """Check everything under the cache (``target`` None or the cache root), a kind folder, or one item.

    Returns:
        :class:`VerifyReport`; its ``problems`` name each damaged item and the command that repairs it.

    Example:
        >>> rep = verify(cache="cache"); [p.line() for p in rep.problems]  # doctest: +SKIP
    """
    its, _ = (items(cache), True) if target is None else _resolve(target, cache)
    report = VerifyReport([], [], [])
    for it in its:
        interrupt.check("verify.item")  # between items: what was checked is reported, nothing is half-done
        if not it.finished or it.kind == "temporary":
            continue
        if it.status == "in use" and it.kind == "features":
            continue  # being extracted: its shards are not all written
        if it.kind == "features-file":
            from featx.store import shard_problem

            why = shard_problem(it.path, [])
            report.checked.append(it)
            if why:
                report.problems.append(Problem(it.path, "features", f"{it.path} is damaged ({why})"))
            continue
        report.checked.append(it)
        if it.kind == "features" and it.info.get("format_version", 2) < 2:
            report.unverified.append(f"feature set {it.path} is in format 1: its shards carry no checksums, only "
                                     f"their structure was checked (extract it again to get checksums)")
        for what in check_item(it):
            report.problems.append(Problem(it.path, it.kind, what))
    return report


# ============================================================================================== prune

@dataclass
class Pruned:
    """One entry prune removed (or would remove, with ``--dry-run``), or kept because it is in use."""

    path: Path
    size: int
    reason: str
    action: str  # removed, would remove (--dry-run), kept (in use)


def prune(names: Sequence[str] = (), *, cache: str | os.PathLike | None = None, dry_run: bool = False,
          older_than: float = DAY_S, now: float | None = None) -> list[Pruned]:
    """Remove what ``names`` name (items by path or key), or else what nothing finished depends on.

    Without names: ``.tmp-*`` leftovers of killed writes untouched for :data:`TMP_GRACE_S` seconds, and unfinished
    items (no finishing file) whose newest file is older than ``older_than`` seconds (a day).  Runs and studies are
    only removed when named.  Never an item in use (a stage holds its lock): it is reported as kept.

    Returns:
        each entry with its ``action``: ``removed``, ``would remove`` (``dry_run``) or ``kept`` (in use).
    """
    now = time.time() if now is None else now
    chosen: list[tuple[Item, str]] = []
    if names:
        for name in names:
            found, whole = _resolve(name, cache)
            if whole:
                raise UsageError(f"{name} is the whole cache: name items (a directory, a key) or remove it yourself")
            chosen += [(it, "named") for it in found]
    else:
        for it in items(cache):
            if it.kind == "temporary":
                if it.status != "in use" and now - it.date > TMP_GRACE_S:
                    chosen.append((it, "temporary leftover of a killed write"))
            elif not it.finished and it.kind not in ("run", "study") and now - it.date > older_than:
                chosen.append((it, f"unfinished, untouched for {(now - it.date) / 3600:.0f} h"))
    out: list[Pruned] = []
    for it, why in chosen:
        target = it.path
        busy = it.status == "in use" or in_use(target) or (it.kind == "temporary" and in_use(target.parent))
        if busy:
            out.append(Pruned(target, it.size, "in use (a featx process holds its lock)", "kept"))
            logger.warning("%s is in use: kept", target)
            continue
        if not dry_run:
            try:
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise FeatxError(f"cannot remove {target}: {e.strerror or e}") from None
        out.append(Pruned(target, it.size, why, "would remove" if dry_run else "removed"))
    return out
