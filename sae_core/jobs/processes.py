"""The processes of a job: starting its command under jobwrap, finding every process it has, signalling them.

The thin layer under the command builder: `run_job` is the only place that starts a job's process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

import psutil

from ..db.tables import Job
from ..files import EXIT_FILE, STDERR_LOG, STDOUT_LOG
from ..gpu.processes import process_if_same

JOBWRAP = Path(__file__).with_name("jobwrap.py")


def run_job(argv: list[str], env: Mapping[str, str], log_dir: Path) -> subprocess.Popen:
    """Start `argv` under jobwrap in a new session, output to log_dir/stdout.log and stderr.log."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / EXIT_FILE).unlink(missing_ok=True)
    wrapped = [argv[0], str(JOBWRAP), "--exit-file", str(log_dir / EXIT_FILE), "--", *argv]
    with open(log_dir / STDOUT_LOG, "ab") as out, open(log_dir / STDERR_LOG, "ab") as err:
        return subprocess.Popen(
            wrapped,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            close_fds=True,
            cwd=str(log_dir.parent),
        )


def _same_home(a: str | None, b: Path) -> bool:
    if not a:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def job_processes(job: Job, home: Path) -> list[psutil.Process]:
    """Every live process of the job: the leader's tree plus any process tagged with its id and home."""
    found: dict[int, psutil.Process] = {}
    leader = process_if_same(job.pid, job.pid_start_time)
    if leader is not None:
        found[leader.pid] = leader
        with contextlib.suppress(psutil.Error):
            for child in leader.children(recursive=True):
                found[child.pid] = child
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid in found or proc.pid == me:
            continue
        try:
            env = proc.environ()
            ours = env.get("SAE_LAB_JOB_ID") == str(job.id) and _same_home(env.get("SAE_LAB_HOME"), home)
            if ours and proc.status() != psutil.STATUS_ZOMBIE:
                found[proc.pid] = proc
        except (psutil.Error, OSError):
            continue
    return list(found.values())


def signal_processes(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)  # psutil refuses if the pid was reused meanwhile


def kill_job_processes(job: Job, home: Path, wait_s: float = 5.0) -> int:
    """SIGKILL every process of the job and wait for them to vanish; returns how many were killed."""
    procs = job_processes(job, home)
    signal_processes(procs, signal.SIGKILL)
    psutil.wait_procs(procs, timeout=wait_s)
    return len(procs)
