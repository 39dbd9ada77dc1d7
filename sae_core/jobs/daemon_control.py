"""Is a launcher daemon serving this SAE_LAB_HOME? Its status file (pid, heartbeat), and starting one.

The daemon (daemon.py) writes SAE_LAB_HOME/daemon.json every pass; any process reads it here. The app
and the CLI call `ensure_daemon` after queueing a job, so something runs the queue.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import paths
from ..files import DAEMON_FILE, DAEMON_LOG_FILE
from ..gpu.processes import process_if_same

POLL_S = 0.5  # seconds between the daemon's passes (its default)
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


def daemon_status(home: Path | None = None, now: float | None = None) -> DaemonStatus:
    home = Path(home) if home is not None else paths.lab_home()
    now = time.time() if now is None else now
    log_path = str(home / DAEMON_LOG_FILE)
    _reap_spawned()
    try:
        info = json.loads(_daemon_file(home).read_text())
    except (OSError, ValueError):
        return DaemonStatus(False, False, None, None, None, "launcher not running", log_path)
    pid, beat = info.get("pid"), info.get("heartbeat")
    alive = info.get("stopped_at") is None and process_if_same(pid, info.get("create_time")) is not None
    if not alive:
        return DaemonStatus(False, False, None, None, beat, "launcher not running", log_path)
    stale_after = max(HEARTBEAT_STALE_S, 5 * float(info.get("interval") or POLL_S))
    age = now - (beat or 0)
    healthy = age <= stale_after
    message = (
        f"launcher running (pid {pid}, heartbeat {age:.1f} s ago)"
        if healthy
        else f"launcher (pid {pid}) is not responding: last heartbeat {age:.0f} s ago; see {log_path}"
    )
    return DaemonStatus(True, healthy, pid, info.get("started_at"), beat, message, log_path)


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
    env = dict(os.environ, SAE_LAB_HOME=str(home))
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
