"""The SQLite engine of lab.db, set up for several processes (app, launcher daemon, rank 0 of each job).

- WAL so readers never block the writer and the writer never blocks readers.
- A busy timeout so a writer waits for the lock instead of failing at once.
- Write transactions take the write lock up front (BEGIN IMMEDIATE): a read that
  later upgrades to a write is what produces SQLITE_BUSY that no timeout can fix.
- One engine per process and database file; short sessions per operation.
- A damaged file surfaces as one LabDatabaseError that says what to do (health.py), from any query.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, SQLModel, create_engine

from .. import paths
from . import migrations
from .health import LabDatabaseError, check_history, explain

BUSY_TIMEOUT_MS = 30_000

_engines: dict[Path, Engine] = {}
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


def _begin(conn) -> None:
    # Default for every transaction: a deferred BEGIN (reads). Writers use write_session().
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write") else "BEGIN")


def get_engine(home: Path | None = None) -> Engine:
    """The process's engine for `home`'s lab.db, created (with its tables) on first use.

    Raises LabDatabaseError for a database that is damaged, cannot be written, or is missing beside the
    job folders of an earlier history."""
    path = paths.db_path(home).resolve()
    with _engines_lock:
        engine = _engines.get(path)
        if engine is None:
            check_history(path)
            new = not path.exists() or path.stat().st_size == 0
            engine = create_engine(
                f"sqlite:///{path}",
                connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_MS / 1000},
            )
            event.listen(engine, "connect", _configure_connection)
            event.listen(engine, "begin", _begin)
            event.listen(engine, "handle_error", lambda context: _damage(path, context.original_exception))
            try:
                init_db(engine)
            except (DBAPIError, sqlite3.Error) as exc:
                _damage(path, getattr(exc, "orig", exc))  # raises the explanation when it is the file's fault
                raise
            if new:
                os.chmod(path, paths.file_mode())  # SQLite creates its file 0644 whatever the umask allows
            _engines[path] = engine
    return engine


def _damage(path: Path, exc: BaseException | None) -> None:
    """For the handle_error event: a damaged or unwritable file is raised as its LabDatabaseError."""
    damaged = explain(path, exc) if exc is not None else None
    if damaged is not None:
        raise damaged from exc


def dispose_engines() -> None:
    """Forget every engine (tests switch SAE_LAB_HOME; a forked child must not share sockets)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


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
