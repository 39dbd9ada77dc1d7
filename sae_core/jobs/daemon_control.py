"""Is a launcher daemon serving this SAE_LAB_HOME? Its status file (pid, heartbeat), and starting one.

The daemon (daemon.py) writes SAE_LAB_HOME/daemon.json every pass; any process reads it here. The app
and the CLI call `ensure_daemon` after queueing a job, so something runs the queue.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from .. import db, paths
from ..access import without_secrets
from ..db import snapshots
from ..files import DAEMON_FILE, DAEMON_LOG_FILE
from ..gpu.processes import process_if_same

POLL_S = 0.5  # seconds between the daemon's passes (its default)
STATUS_KEY = "launcher"  # lab.db's copy of the status, written when the status file cannot be
HEARTBEAT_STALE_S = 15.0


@dataclass
class DaemonStatus:
    running: bool  # a daemon process holds this home
    healthy: bool  # ... and its loop beat recently
    pid: int | None
    started_at: float | None
    heartbeat_at: float | None
    message: str
    log_path: str

    def to_dict(self) -> dict:
        return asdict(self)


def _daemon_file(home: Path) -> Path:
    return Path(home) / DAEMON_FILE


def write_daemon_file(home: Path, info: dict) -> None:
    path = _daemon_file(home)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def beat(home: Path, info: dict, engine: Engine | None = None) -> str | None:
    """Publish the daemon's status: its file, or, when that cannot be written (a read-only home, a full
    disk), a row in lab.db that daemon_status() reads instead. Returns the problem, None when all is well."""
    try:
        write_daemon_file(home, info)
        return None
    except OSError as exc:
        problem = f"cannot write {_daemon_file(home)}: {exc.strerror or exc}"
    if engine is not None:
        with contextlib.suppress(Exception):  # the database may be as unwritable as the file
            snapshots.put(engine, STATUS_KEY, time.time(), json.dumps({**info, "problem": problem}))
    return problem


def _status_info(home: Path) -> dict | None:
    """The daemon's last status: its file, else the row it writes when the file cannot be written."""
    try:
        from_file = json.loads(_daemon_file(home).read_text())
    except (OSError, ValueError):
        from_file = None
    if not paths.db_path(home).exists():
        return from_file
    try:
        payload = snapshots.get(db.get_engine(home), STATUS_KEY)
        from_db = json.loads(payload) if payload else None
    except Exception:  # an unreadable database leaves the file's word
        from_db = None
    candidates = [info for info in (from_file, from_db) if isinstance(info, dict)]
    return max(candidates, key=lambda info: info.get("heartbeat") or 0, default=None)


def daemon_status(home: Path | None = None, now: float | None = None) -> DaemonStatus:
    home = Path(home) if home is not None else paths.lab_home()
    now = time.time() if now is None else now
    log_path = str(home / DAEMON_LOG_FILE)
    _reap_spawned()
    info = _status_info(home)
    if info is None:
        return DaemonStatus(False, False, None, None, None, "launcher not running", log_path)
    pid, beat_at = info.get("pid"), info.get("heartbeat")
    alive = info.get("stopped_at") is None and process_if_same(pid, info.get("create_time")) is not None
    if not alive:
        return DaemonStatus(False, False, None, None, beat_at, "launcher not running", log_path)
    stale_after = max(HEARTBEAT_STALE_S, 5 * float(info.get("interval") or POLL_S))
    age = now - (beat_at or 0)
    healthy = age <= stale_after
    message = (
        f"launcher running (pid {pid}, heartbeat {age:.1f} s ago)"
        if healthy
        else f"launcher (pid {pid}) is not responding: last heartbeat {age:.0f} s ago; see {log_path}"
    )
    if info.get("problem"):
        message += f"; {info['problem']}"
    return DaemonStatus(True, healthy, pid, info.get("started_at"), beat_at, message, log_path)


_spawned: list[subprocess.Popen] = []


def _reap_spawned() -> None:
    # A daemon started by this (long-lived) process must not linger as a zombie when it exits.
    for proc in list(_spawned):
        if proc.poll() is not None:
            _spawned.remove(proc)


def ensure_daemon(home: Path | None = None, extra_args: list[str] | None = None, timeout_s: float = 20.0) -> bool:
    """Start the daemon for `home`, detached, if none is running. True when one runs afterwards."""
    home = Path(home).resolve() if home is not None else paths.lab_home()
    if daemon_status(home).running:
        return True
    env = {**without_secrets(os.environ), "SAE_LAB_HOME": str(home)}
    with open(home / DAEMON_LOG_FILE, "ab") as logfile:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sae_core", "serve", *(extra_args or [])],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,
            close_fds=True,
            cwd=str(home),
        )
    _spawned.append(proc)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if daemon_status(home).running:
            return True
        if proc.poll() is not None:  # lost a race to another daemon, or failed: the status file says which
            return daemon_status(home).running
        time.sleep(0.1)
    return daemon_status(home).running
