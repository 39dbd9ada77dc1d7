"""The SQLite engine of lab.db, set up for several processes (app, launcher daemon, rank 0 of each job).

- WAL so readers never block the writer and the writer never blocks readers.
- A busy timeout so a writer waits for the lock instead of failing at once.
- Write transactions take the write lock up front (BEGIN IMMEDIATE): a read that
  later upgrades to a write is what produces SQLITE_BUSY that no timeout can fix.
- One engine per process and database file; short sessions per operation.
- A damaged file surfaces as one LabDatabaseError that says what to do (health.py), from any query.
- The file opened is the file at the path: every transaction first compares the path's device and inode
  with those of the file the engine opened. A lab.db deleted or replaced under a running process would
  otherwise go on taking its writes (an unlinked inode keeps working) while every other process sees
  another file; it raises LabDatabaseError("gone") instead, for the rest of the process's life.
  Connections open the file without creating it (SQLite's mode=rw), so a deleted lab.db is never
  silently recreated empty beside its old write-ahead log.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, SQLModel, create_engine

from .. import paths
from . import migrations
from .health import LabDatabaseError, check_history, explain, file_gone

BUSY_TIMEOUT_MS = 30_000

_engines: dict[Path, Engine] = {}
_opened: dict[Path, tuple[int, int] | None] = {}  # (device, inode) of the file each engine opened
_engines_lock = threading.Lock()


def _configure_connection(dbapi_conn, _record) -> None:
    # Let SQLAlchemy's pysqlite driver stop issuing its own BEGIN so we control it.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`; None when there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _begin(path: Path, opened: tuple[int, int] | None, conn) -> None:
    if file_identity(path) != opened:
        raise file_gone(path)
    # Default for every transaction: a deferred BEGIN (reads). Writers use write_session().
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write") else "BEGIN")


def _connect_existing(path: Path) -> sqlite3.Connection:
    """A connection to the database file at `path`, which must exist (SQLite's mode=rw never creates it)."""
    uri = f"file:{urllib.parse.quote(str(path))}?mode=rw"
    return sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)


def get_engine(home: Path | None = None) -> Engine:
    """The process's engine for `home`'s lab.db, created (with its tables) on first use.

    Raises LabDatabaseError for a database that is damaged, cannot be written, or is missing beside the
    job folders of an earlier history; and, for good, once the file this process opened was deleted or
    replaced (its write-ahead log beside the path belongs to the old file: opening the new one here could
    replay it into it, so only a new process opens the path again)."""
    path = paths.db_path(home).resolve()
    with _engines_lock:
        engine = _engines.get(path)
        if engine is None:
            engine = _open(path)
        elif file_identity(path) != _opened[path]:
            raise file_gone(path)
    return engine


def _open(path: Path) -> Engine:
    check_history(path)
    new = not path.exists() or path.stat().st_size == 0
    if not path.exists():
        path.touch()  # an empty file is an empty database; connections only open existing files
    opened = file_identity(path)
    engine = create_engine(f"sqlite:///{path}", creator=functools.partial(_connect_existing, path))
    event.listen(engine, "connect", _configure_connection)
    event.listen(engine, "begin", functools.partial(_begin, path, opened))
    event.listen(engine, "handle_error", lambda context: _damage(path, context.original_exception))
    try:
        init_db(engine)
    except (DBAPIError, sqlite3.Error) as exc:
        _damage(path, getattr(exc, "orig", exc))  # raises the explanation when it is the file's fault
        raise
    if new:
        os.chmod(path, paths.file_mode())  # created 0644 whatever the umask allows
    _engines[path], _opened[path] = engine, opened
    return engine


def _damage(path: Path, exc: BaseException | None) -> None:
    """For the handle_error event: a file that is gone, damaged or unwritable is raised as its
    LabDatabaseError."""
    if isinstance(exc, LabDatabaseError):
        return  # already the explanation; SQLAlchemy re-raises it as it is
    if exc is not None and "unable to open database file" in str(exc) and not path.exists():
        raise file_gone(path) from exc  # a connection (mode=rw) to a lab.db deleted meanwhile
    damaged = explain(path, exc) if exc is not None else None
    if damaged is not None:
        raise damaged from exc


def dispose_engines() -> None:
    """Forget every engine (tests switch SAE_LAB_HOME; a forked child must not share sockets)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _opened.clear()


def init_db(engine: Engine) -> None:
    """Create the tables and bring an older schema up to date."""
    migrations.upgrade(engine)


@contextlib.contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    with Session(engine, expire_on_commit=False) as session:
        yield session


@contextlib.contextmanager
def write_session(engine: Engine) -> Iterator[Session]:
    """A session whose transaction starts with BEGIN IMMEDIATE; commits on success."""
    with engine.connect() as conn:
        conn.info["write"] = True
        try:
            with Session(bind=conn, expire_on_commit=False) as session:
                yield session
                session.commit()
        finally:
            conn.info["write"] = False


__all__ = ["LabDatabaseError", "SQLModel", "dispose_engines", "get_engine", "init_db", "read_session", "write_session"]
