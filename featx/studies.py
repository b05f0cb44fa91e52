"""Optuna study storage for ``featx search``: opening it (journal file, SQLite, PostgreSQL, MySQL), and trials
whose process died.

* **Many workers on an empty database.** Every worker that opens an Optuna RDB storage creates its tables; on
  PostgreSQL, ``CREATE TABLE IF NOT EXISTS`` run at the same instant by several sessions fails with
  ``UniqueViolation ... pg_type_typname_nsp_index`` (optuna/optuna#1092, #3865). featx creates the schema under a
  PostgreSQL advisory lock (one worker creates, the others wait and then find the tables); on other databases it
  retries after a short random pause when the tables appeared under it.
* **Zombie trials.** A worker killed with kill -9 (or a node that vanished) leaves its trial RUNNING for ever.
  Every trial records its owner (node, host, pid, the process's start time) in its system attrs when it starts
  running. Whenever featx opens a study, and before each trial, the RUNNING trials owned by *this* node whose
  process is gone are marked FAIL (``fail_reason`` "process died ...") and queued again once with the same
  parameters. On an RDB storage (SQLite, PostgreSQL, MySQL) Optuna's heartbeats also fail the trials of other
  nodes whose heartbeat stopped for a grace period (3 heartbeats), and those are queued again too. A journal file
  has no heartbeat: a trial left RUNNING by another machine stays RUNNING there (see docs/search.md).
"""
from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from featx import cache as featx_cache
from featx.cache import cache_root, disk_full_error, is_disk_full, writing
from featx.errors import FeatxError, UsageError

logger = logging.getLogger(__name__)

HEARTBEAT = 60  # seconds between heartbeats of a running trial on a database storage
GRACE_HEARTBEATS = 3  # a trial whose last heartbeat is older than this many heartbeats is failed
MAX_RETRY = 2  # a trial whose process died is queued again at most this many times (it may be the cause)
OWNER = "featx_owner"  # trial system attr: who runs it
_PG_SCHEMA_LOCK = 0x66656174_78  # advisory lock key ("featx") that serialises creating Optuna's tables


# ------------------------------------------------------------------------------------------------ owners

def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) of a process, from /proc; None where unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[19])


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def node_id() -> str:
    """Who can judge whether a pid is alive: host name + boot id + pid namespace (two containers that share a
    host name but not a pid namespace are different nodes). ``FEATX_NODE_ID`` overrides it (tests use it to
    play another machine)."""
    if os.environ.get("FEATX_NODE_ID"):
        return os.environ["FEATX_NODE_ID"]
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{socket.gethostname()}/{_read('/proc/sys/kernel/random/boot_id')}/{pidns}"


def owner() -> dict[str, Any]:
    """This process as the owner of a trial (JSON, kept in the trial's system attrs)."""
    stat = _proc_stat(os.getpid())
    return {"node": node_id(), "host": socket.gethostname(), "pid": os.getpid(),
            "started": stat[1] if stat else None}


def process_alive(pid: int, started: int | None) -> bool:
    """Whether process ``pid`` of this node still runs and is the one that started at ``started`` (a pid reused
    by a later process does not count; a killed process its parent has not reaped yet is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, run by another user
    stat = _proc_stat(pid)
    if stat is None:  # no /proc (macOS): existence is all we can tell
        return True
    state, start = stat
    if state in ("Z", "X"):
        return False
    return started is None or start == started


# ------------------------------------------------------------------------------------------------ storages

def _starts_running(template_trial) -> bool:
    return template_trial is None or template_trial.state.name == "RUNNING"


class _OwnedTrials:
    """Mixin for an Optuna storage: a trial that starts running records its owner, in the same breath."""

    def set_trial_state_values(self, trial_id: int, state, values=None) -> bool:
        done = super().set_trial_state_values(trial_id, state, values)  # type: ignore[misc]
        if done and state.name == "RUNNING":  # a queued (WAITING) trial popped by this process
            self.set_trial_system_attr(trial_id, OWNER, owner())  # type: ignore[attr-defined]
        return done


def _storage_classes():
    from optuna.storages import JournalStorage, RDBStorage

    class FeatxJournalStorage(_OwnedTrials, JournalStorage):
        """Optuna's journal storage whose trials record their owner."""

        def create_new_trial(self, study_id: int, template_trial=None) -> int:
            trial_id = super().create_new_trial(study_id, template_trial)
            if _starts_running(template_trial):
                self.set_trial_system_attr(trial_id, OWNER, owner())
            return trial_id

    class FeatxRDBStorage(_OwnedTrials, RDBStorage):
        """Optuna's RDB storage whose trials record their owner, and say why a heartbeat failed them."""

        def _create_new_trial(self, study_id: int, template_trial=None):
            # both create_new_trial and Optuna's cache layer come through here
            frozen = super()._create_new_trial(study_id, template_trial)
            if _starts_running(template_trial):
                me = owner()
                self.set_trial_system_attr(frozen._trial_id, OWNER, me)
                frozen.system_attrs[OWNER] = me
            return frozen

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            # Optuna fails these next without a word; leave the reason on the trial first
            import optuna

            ids = super()._get_stale_trial_ids(study_id)
            grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
            for trial_id in ids:
                try:
                    self.set_trial_user_attr(trial_id, "fail_reason",
                                             f"no heartbeat for {grace} s: its process or machine died")
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass
            return ids

    return FeatxJournalStorage, FeatxRDBStorage


_CLASSES: tuple | None = None


def storage_classes():
    """(journal storage class, RDB storage class), made once (they subclass Optuna's, imported lazily)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _storage_classes()
    return _CLASSES


def default_storage(cache: str | os.PathLike | None) -> str:
    """A journal file under the cache: safe for several local processes (file locks, no 'database is locked')."""
    path = cache_root(cache) / "studies" / "featx.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)


def _database_url(url: str) -> str:
    """A plain ``postgresql://`` URL means SQLAlchemy's default driver: psycopg (3) since SQLAlchemy 2.1,
    psycopg2 before. Use whichever of the two is installed, so that both ``featx[postgres]`` and an older
    psycopg2 set-up work with the same URL."""
    import sqlalchemy

    u = sqlalchemy.engine.make_url(url)
    if u.drivername != "postgresql":
        return url
    for module, driver in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        try:
            __import__(module)
        except ImportError:
            continue
        return u.set(drivername=driver).render_as_string(hide_password=False)
    raise UsageError(f"cannot open the study storage {u.render_as_string()!r}: no PostgreSQL driver is installed; "
                     "install one with: pip install 'featx[postgres]'")


def _create_rdb(url: str, heartbeat: int):
    import optuna
    import sqlalchemy

    _, rdb = storage_classes()
    dialect = sqlalchemy.engine.make_url(url).get_backend_name()
    if dialect == "sqlite":
        engine: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:  # a dropped connection is noticed and replaced; an unreachable server fails within 30 s
        engine = {"pool_pre_ping": True}
        if dialect == "postgresql":
            engine["connect_args"] = {"connect_timeout": 30}

    def make():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # heartbeats let a study on a shared database mark trials of killed workers as failed, and retry them
            return rdb(url, engine_kwargs=engine, heartbeat_interval=heartbeat,
                       grace_period=GRACE_HEARTBEATS * heartbeat, heartbeat_stale_trial_callback=retry_trial)

    if dialect == "postgresql":
        # One worker creates the tables while the others wait on the lock, then find them (optuna#1092, #3865).
        # The lock is per database and is released when this connection closes, even if the process dies.
        lock = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, isolation_level="AUTOCOMMIT",
                                        connect_args={"connect_timeout": 30})
        try:
            with lock.connect() as c:
                c.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_SCHEMA_LOCK})
                try:
                    return make()
                finally:
                    c.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_SCHEMA_LOCK})
        finally:
            lock.dispose()
    for attempt in range(6):  # SQLite, MySQL: the tables may appear between the check and the create; retry
        try:
            return make()
        except sqlalchemy.exc.DBAPIError as e:
            racing = isinstance(e, sqlalchemy.exc.IntegrityError) or "already exists" in str(e)
            if not racing or attempt == 5:
                raise
            time.sleep(random.uniform(0.1, 0.5))


def _journal_backend(base):
    """Optuna's journal file backend whose append never leaves a torn line: a write that fails (a full disk) is
    cut off again while the journal's lock is still held, so the journal keeps every finished record and reads
    back, and the failure is a :class:`~featx.errors.DiskFullError`."""

    class FeatxJournalFileBackend(base):
        def __init__(self, path: str, lock) -> None:
            super().__init__(path, lock_obj=lock)
            self.featx_path, self.featx_lock = path, lock

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
            self.featx_lock.acquire()
            try:
                with writing(self.featx_path, needs=len(data)), open(self.featx_path, "ab", buffering=0) as f:
                    start = os.fstat(f.fileno()).st_size
                    try:
                        featx_cache.write_out(f, data)  # through the module: the tests make it fail
                    except BaseException:
                        os.ftruncate(f.fileno(), start)
                        raise
            finally:
                self.featx_lock.release()

    return FeatxJournalFileBackend


def open_storage(url: str, *, heartbeat: int = HEARTBEAT):
    """An Optuna storage from a URL (``sqlite:///``, ``postgresql://``, ``mysql://``) or a journal file path
    (``*.journal``, ``*.log``, or ``journal:PATH``).

    Its trials record their owner (see :func:`fail_dead_trials`); on a database, running trials send a heartbeat
    every ``heartbeat`` seconds and a trial silent for 3 heartbeats is failed and queued again.

    Raises:
        UsageError: the storage cannot be opened (unreachable server, missing driver, unwritable folder), in
            one line.
    """
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if heartbeat < 1:
        raise UsageError(f"--heartbeat {heartbeat}: use a whole number of seconds >= 1")
    try:
        if "://" not in url or url.startswith("journal:"):
            path = Path(url[len("journal:"):] if url.startswith("journal:") else url).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            # open() locks work on every filesystem the journal may live on, NFS included
            backend = _journal_backend(JournalFileBackend)(str(path), JournalFileOpenLock(str(path)))
            return storage_classes()[0](backend)
        return _create_rdb(_database_url(url), heartbeat)
    except FeatxError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise disk_full_error(url) from None
        raise UsageError(f"cannot open the study storage {url!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None


# ------------------------------------------------------------------------------------------------ dead trials

def retry_trial(study, trial) -> None:
    """Queue ``trial``'s parameters again as a WAITING trial (the next worker to ask runs it), at most
    :data:`MAX_RETRY` times per original trial. Also Optuna's heartbeat-stale callback. The attrs follow
    :class:`optuna.storages.RetryHeartbeatStaleTrialCallback` (``failed_trial``, ``retry_history``)."""
    import optuna

    history = list(trial.system_attrs.get("retry_history", [])) + [trial.number]
    if len(history) > MAX_RETRY:
        logger.info("trial %d died again; not retried (%d retries of trial %d)", trial.number, MAX_RETRY, history[0])
        return
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k != "fail_reason"},
        system_attrs={"failed_trial": history[0], "retry_history": history}))


def fail_dead_trials(study) -> list[int]:
    """Mark FAIL the RUNNING trials of ``study`` owned by a process of this node that is gone, with
    ``fail_reason`` "process died ...", and queue each again (:func:`retry_trial`). Trials of other nodes are
    left to heartbeats (database storages). Returns the numbers of the trials failed here."""
    import optuna

    S = optuna.trial.TrialState
    storage = study._storage  # Optuna has no public call that fails another process's trial by id
    me = node_id()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(S.RUNNING,)):
        o = t.system_attrs.get(OWNER)
        if not isinstance(o, dict) or o.get("node") != me or process_alive(int(o["pid"]), o.get("started")):
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason",
                                        f"process died (pid {o['pid']} on {o.get('host', '?')})")
            if storage.set_trial_state_values(t._trial_id, state=S.FAIL):
                failed.append(t)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process failed it first; it queues the retry
    for t in failed:
        logger.info("trial %d was left running by a process that died (pid %s); marked failed and queued again",
                    t.number, t.system_attrs[OWNER]["pid"])
        retry_trial(study, storage.get_trial(t._trial_id))
    return [t.number for t in failed]


def hold_for_tests(trial) -> None:
    """Test hook: with ``FEATX_TRIAL_HOLD="DIR:N"``, trial number N writes its pid to ``DIR/trial-N.pid`` and
    waits until ``DIR/release-N`` exists, so that a test can kill its process at a known point. Unset: nothing."""
    spec = os.environ.get("FEATX_TRIAL_HOLD")
    if not spec:
        return
    folder, _, number = spec.rpartition(":")
    if not number.isdigit() or trial.number != int(number):
        return
    d = Path(folder)
    tmp = d / f".trial-{number}.pid.{os.getpid()}"
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, d / f"trial-{number}.pid")
    while not (d / f"release-{number}").exists():
        time.sleep(0.05)
