"""A throw-away PostgreSQL server for tests and benchmarks: ``initdb`` + ``pg_ctl`` in a temporary folder.

PostgreSQL refuses to run as root, and the tests run as root on CI: the server then runs as the unprivileged
``postgres`` user (Debian's package creates it) through ``runuser``, in a folder that user owns. It listens on
127.0.0.1 on a free port only (its unix socket stays in that folder), runs with ``fsync=off`` (nothing here
must survive a crash of the machine) and is stopped with ``pg_ctl stop -m immediate`` whatever happens.

    with running_server() as srv:
        url = srv.new_database("mine")   # postgresql://postgres@127.0.0.1:PORT/mine
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")


def server_bindir() -> Path | None:
    """The folder of PostgreSQL's server programs: ``pg_config --bindir``, else where ``pg_ctl`` is on PATH."""
    candidates = []
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=30).stdout
            candidates.append(Path(out.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        candidates.append(Path(pg_ctl).resolve().parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for d in candidates:
        if all((d / p).exists() for p in SERVER_PROGRAMS):
            return d
    return None


def why_unavailable() -> str | None:
    """None when a server can be started here, else the reason (for ``pytest.skip``)."""
    if server_bindir() is None:
        return "no PostgreSQL server programs (initdb, pg_ctl, postgres) on PATH or under pg_config --bindir"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no unprivileged 'postgres' user to run the server"
        if not shutil.which("runuser") and not shutil.which("setpriv"):
            return "running as root and neither runuser nor setpriv exists to drop privileges"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            return "no PostgreSQL driver: pip install 'featx[postgres]'"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    port: int
    folder: Path

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def sql(self, statement: str, database: str = "postgres") -> None:
        """Run one statement outside a transaction (CREATE DATABASE needs that)."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(f"postgresql://postgres@127.0.0.1:{self.port}/{database}",
                                          isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as c:
            c.execute(sqlalchemy.text(statement))
        engine.dispose()

    def new_database(self, name: str) -> str:
        """A fresh, empty database; its URL."""
        self.sql(f'DROP DATABASE IF EXISTS "{name}"')
        self.sql(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@contextlib.contextmanager
def running_server(max_connections: int = 100) -> Iterator[Server]:
    """Start a server in a temporary folder; stop it and remove the folder on exit, whatever happens."""
    reason = why_unavailable()
    if reason:
        raise RuntimeError(reason)
    bindir = server_bindir()
    assert bindir is not None
    root = os.geteuid() == 0
    # under /tmp (world-traversable), never under a folder the postgres user may not enter
    folder = Path(tempfile.mkdtemp(prefix="featx-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
    prefix: list[str] = []
    if root:
        pw = pwd.getpwnam("postgres")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else \
            ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]
    data, log = folder / "data", folder / "server.log"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(prefix + list(args), cwd=folder, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "LC_ALL": "C", "PGTZ": "UTC"})

    started = False
    try:
        p = run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                "--locale=C", "--no-sync")
        if p.returncode:
            raise RuntimeError(f"initdb failed: {p.stderr.strip()[-2000:]}")
        for _attempt in range(5):  # a free port can be taken between our probe and the server's bind: retry
            port = _free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={folder} "
                    f"-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                    f"-c max_connections={max_connections}")
            p = run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start")
            if p.returncode == 0:
                started = True
                break
            time.sleep(0.2)
        if not started:
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {p.stderr.strip()[-1000:]} {tail}")
        yield Server(port, folder)
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def open_storage_at_barrier(url: str, barrier, results) -> None:  # pragma: no cover - a spawned process
    """Wait for the others, then open featx's storage on ``url``; put "ok" or the error on ``results``. Lives
    here, not in a test module, so that the spawned process imports little."""
    from featx.studies import open_storage

    barrier.wait()  # every process creates the schema at the same instant
    try:
        open_storage(url)
        results.put("ok")
    except Exception as e:
        results.put(f"{type(e).__name__}: {e}")
