"""A damaged lab.db is reported, never papered over: what is wrong, what was saved, and how to recover.

- A missing or empty lab.db beside existing job folders means the history was lost: refused (a fresh
  database would restart ids at 1 and write into the old folders).
- A corrupt file (not a database, a malformed image) is copied aside once and explained, with SQLite's
  own `PRAGMA integrity_check` and the commands that recover what is left.
- A file that cannot be written (permissions, a full disk) is explained the same way.
- A lab.db deleted or replaced while a process had it open ("gone"): that process stops using it (engine.py
  notices at the next transaction); a lab.db missing beside its write-ahead log was deleted in use too.
Every caller shows the one message: the app as a page, the CLI on stderr, the daemon in its log as it exits.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from ..files import JOBS_DIR

_CORRUPT = ("file is not a database", "malformed", "file is encrypted", "not a database")
_UNWRITABLE = ("readonly database", "unable to open database", "disk i/o error", "database or disk is full")
_backups: dict[Path, Path] = {}  # one copy of a damaged file per process


class LabDatabaseError(RuntimeError):
    """lab.db cannot be used; the message says what is wrong and what to do. `kind`: "lost" (missing or
    empty beside job folders or its write-ahead log), "gone" (deleted or replaced while open), "damaged"
    (corrupt), "unwritable" (permissions, a full disk: may pass), "failed" (any other database error)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# Every exception that means "lab.db could not be used": ours, SQLite's, SQLAlchemy's.
DATABASE_ERRORS = (LabDatabaseError, sqlite3.Error, SQLAlchemyError)


def as_lab_error(path: Path, exc: BaseException) -> LabDatabaseError:
    """Any of DATABASE_ERRORS as the one LabDatabaseError that callers show."""
    if isinstance(exc, LabDatabaseError):
        return exc
    return explain(path, getattr(exc, "orig", None) or exc) or failed(path, exc)


def job_folders(home: Path) -> list[int]:
    """Ids of the numbered job folders under SAE_LAB_HOME/jobs."""
    root = home / JOBS_DIR
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def check_history(path: Path) -> None:
    """Refuse a missing or empty lab.db when job folders show there was a history, and a missing one whose
    write-ahead log remains (it was deleted while in use: a new file beside the old log is not a database)."""
    if path.exists() and path.stat().st_size > 0:
        return
    folders = job_folders(path.parent)
    leftovers = [p.name for p in _sidecars(path) if p.exists()]
    if not folders and leftovers and not path.exists():
        raise LabDatabaseError(
            "lost",
            f"{path} is missing but {' and '.join(leftovers)} remain beside it: lab.db was deleted while SAE Lab "
            "was using it. Restore lab.db from a backup; or, to start a new history, stop the app and the "
            f"launcher and move {' and '.join(leftovers)} aside.",
        )
    if not folders:
        return
    state = "empty" if path.exists() else "missing"
    raise LabDatabaseError(
        "lost",
        f"{path} is {state} but {path.parent / JOBS_DIR} holds {len(folders)} job folder(s) (up to job "
        f"{folders[-1]}): the lab's history is not in a database any more. Restore lab.db from a backup; or, "
        f"to start a new history, move {path.parent / JOBS_DIR} aside (its folders are kept as they are).",
    )


def _sidecars(path: Path) -> list[Path]:
    return [path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def file_gone(path: Path) -> LabDatabaseError:
    """The error of a process whose lab.db was deleted or replaced while it had the file open."""
    now = "is missing" if not path.exists() else "is another file now"
    return LabDatabaseError(
        "gone",
        f"{path} was deleted or replaced while SAE Lab had it open ({path.name} {now}). What was written to it "
        "since went into the removed file; so that nothing more is, the launcher stops and this process no "
        "longer uses the database. Restore lab.db from a backup, or, to start a new history, move "
        f"{path.parent / JOBS_DIR} aside; then restart the app (running jobs keep running and are taken up "
        "again).",
    )


def failed(path: Path, exc: BaseException) -> LabDatabaseError:
    """Any other database error, as the one message every caller shows (what SQLite said, in one line)."""
    said = " ".join(str(getattr(exc, "orig", None) or exc).split())[:200]
    return LabDatabaseError(
        "failed",
        f"{path} could not be used ({type(exc).__name__}: {said}). Reload the page; if it persists, restart the "
        "app and look at the launcher's log.",
    )


def explain(path: Path, exc: BaseException) -> LabDatabaseError | None:
    """The LabDatabaseError for a SQLite error that means the file is damaged or cannot be written."""
    text = str(exc).lower()
    if any(marker in text for marker in _CORRUPT):
        backup = _backup(path)
        return LabDatabaseError(
            "damaged",
            f"{path} is damaged ({exc}). PRAGMA integrity_check says: {integrity(path)}. "
            f"A copy of the damaged file was saved as {backup}. To recover what is left: "
            f"`sqlite3 {path} .recover | sqlite3 {path}.recovered`, then move the recovered file to {path.name}; "
            "or move lab.db aside (and jobs/ with it) to start a new history.",
        )
    if any(marker in text for marker in _UNWRITABLE):
        return LabDatabaseError(
            "unwritable",
            f"{path} cannot be written ({exc}): check the permissions of the file and of {path.parent}, "
            "and the free disk space; nothing was changed.",
        )
    return None


def integrity(path: Path) -> str:
    """SQLite's integrity check of the file, in one line (or why it could not run)."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
            rows = [str(row[0]) for row in conn.execute("PRAGMA integrity_check").fetchmany(5)]
        return "; ".join(rows) or "no answer"
    except sqlite3.Error as exc:
        return f"it cannot even be read ({exc})"


def _backup(path: Path) -> Path:
    if path not in _backups:
        backup = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.copy2(path, backup)
        _backups[path] = backup
    return _backups[path]
