"""The launcher daemon, `python -m sae_core serve`: the queue loop and the GPU sampler of one SAE_LAB_HOME.

How a job runs
  daemon ──Popen(start_new_session)──► jobwrap (process-group leader; Job.pid) ──► torchrun ──► ranks
  jobwrap records torchrun's exit code in jobs/<id>/logs/exit_code, so a daemon restarted later (no
  longer the parent) still learns how an adopted job ended. torchrun starts each rank in a session of
  its own, so "every process of the job" is found by (a) the leader's descendants and (b) a scan for
  processes whose environment carries this job's SAE_LAB_JOB_ID and SAE_LAB_HOME — (b) also finds
  ranks orphaned when torchrun itself was killed.

Daemon loop (every ~0.5 s): look at every starting/running job — adopt it if this daemon does not
know it yet and its leader is alive (pid AND process start time), finalize it if its leader has ended
(exit code → status; root cause from torchrun's error files or the log tail; leftovers SIGKILLed
first), advance a requested cancel (SIGTERM, grace period, SIGKILL) — then start runnable queued
jobs, claimed in one BEGIN IMMEDIATE transaction (scheduler.claim_runnable).

One daemon per SAE_LAB_HOME: it holds SAE_LAB_HOME/launcher.lock (filelock) for its lifetime and
writes SAE_LAB_HOME/daemon.json (pid, process start time, heartbeat) for daemon_status(). SIGTERM
stops it cleanly; jobs keep running (own sessions) and are re-adopted by the next daemon.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from .. import db, paths
from ..db.health import DATABASE_ERRORS, LabDatabaseError
from ..db.tables import ACTIVE_STATUSES, Job
from ..files import DAEMON_LOCK_FILE
from ..gpu import host
from ..gpu.history import Sampler
from ..gpu.processes import process_if_same
from ..log_backoff import ProblemLog
from . import store
from .command import build_command, write_job_config
from .daemon_control import POLL_S, beat, daemon_status
from .gpus import job_index
from .lifecycle import GRACE_S, finalize_job
from .logs import log_dir_of
from .processes import job_processes, kill_job_processes, run_job, signal_processes
from .scheduler import claim_runnable

log = logging.getLogger("sae_core.launcher")


def torch_build_has_cuda() -> bool | None:
    """Read torch/version.py without importing torch: a CPU-only build says `cuda = None`."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return None
    try:
        text = Path(spec.origin).with_name("version.py").read_text()
    except OSError:
        return None
    match = re.search(r"^cuda\s*(?::[^=]*)?=\s*(.+)$", text, re.MULTILINE)
    return None if match is None else match.group(1).strip() != "None"


def cuda_available(python: str = sys.executable) -> bool:
    """Whether a job can use CUDA here. A CPU-only torch build answers at once; otherwise a child
    process asks torch (so the daemon itself never loads CUDA). SAE_LAB_CUDA=0/1 overrides."""
    forced = os.environ.get("SAE_LAB_CUDA")
    if forced in ("0", "1"):
        return forced == "1"
    if python == sys.executable and torch_build_has_cuda() is False:
        return False
    env = dict(os.environ, PYTORCH_NVML_BASED_CUDA_CHECK="1")
    try:
        result = subprocess.run(
            [python, "-c", "import torch; print(int(torch.cuda.is_available()))"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        return result.stdout.strip().endswith("1")
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass
class Tracked:
    """A job this daemon watches: its own child (proc) or one adopted after a restart (proc None)."""

    job_id: int
    pid: int
    start_time: float
    proc: subprocess.Popen | None = None
    kill_sent: bool = False

    def has_ended(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is not None
        return process_if_same(self.pid, self.start_time) is None


class Launcher:
    """The queue and the job watcher; `tick()` is one pass of the daemon loop."""

    def __init__(
        self,
        home: Path,
        grace_s: float = GRACE_S,
        cpu_budget: int | None = None,
        gpu_available: bool | None = None,
        python: str = sys.executable,
        clock=time.time,
    ):
        self.home = Path(home).resolve()
        self.engine = db.get_engine(self.home)
        self.grace_s = grace_s
        self.cpu_budget = cpu_budget or host.cpu_budget()  # ValueError for a bad SAE_LAB_CPU_BUDGET
        self._gpu_available = gpu_available
        self.python = python
        self.clock = clock
        self.tracked: dict[int, Tracked] = {}

    def gpu_available(self) -> bool:
        if self._gpu_available is None:
            self._gpu_available = cuda_available(self.python)
            log.info("CUDA available to jobs: %s", self._gpu_available)
        return self._gpu_available

    # -- one pass
    def tick(self) -> None:
        active = store.list_jobs(ACTIVE_STATUSES, newest_first=False, engine=self.engine)
        for job in active:
            tracked = self.tracked.get(job.id) or self._adopt(job)
            if tracked is None:
                continue
            if tracked.has_ended():
                finalize_job(job, self.home, tracked.proc.returncode if tracked.proc else None, self.engine)
                self.tracked.pop(job.id, None)
            elif job.cancel_requested:
                self._advance_cancel(job, tracked)
        self._forget_settled({job.id for job in active})
        self._start_runnable()

    def _adopt(self, job: Job) -> Tracked | None:
        """A job this daemon does not know: re-adopt it if its leader lives, else settle it now."""
        leader = process_if_same(job.pid, job.pid_start_time) if job.status == "running" else None
        if leader is not None and job.pid_start_time is not None:
            log.info("job %s: re-adopted (pid %s)", job.id, leader.pid)
            tracked = Tracked(job.id, leader.pid, job.pid_start_time)
            self.tracked[job.id] = tracked
            return tracked
        # Gone while no launcher watched (or lost between claim and start): its exit file, if any, tells.
        finalize_job(job, self.home, engine=self.engine)
        return None

    def _forget_settled(self, active_ids: set[int]) -> None:
        # Jobs settled by someone else (CLI cancel without a daemon): reap our child, stop tracking.
        for job_id in [j for j in self.tracked if j not in active_ids]:
            tracked = self.tracked[job_id]
            if tracked.has_ended():
                del self.tracked[job_id]

    def _advance_cancel(self, job: Job, tracked: Tracked) -> None:
        now = self.clock()
        if job.term_sent_at is None:
            log.info("job %s: cancel requested, SIGTERM", job.id)
            signal_processes(job_processes(job, self.home), signal.SIGTERM)
            store.mark_term_sent(job.id, now, engine=self.engine)
        elif now - job.term_sent_at >= self.grace_s and not tracked.kill_sent:
            log.info("job %s: still alive %.0f s after SIGTERM, SIGKILL", job.id, now - job.term_sent_at)
            signal_processes(job_processes(job, self.home), signal.SIGKILL)
            tracked.kill_sent = True

    def _start_runnable(self) -> None:
        for job in claim_runnable(self.cpu_budget, engine=self.engine):
            try:
                self._start(job)
            except Exception as exc:
                log.exception("job %s: could not start", job.id)
                # Popen may have succeeded before the failure (e.g. the database stayed locked):
                # nothing of a job marked failed may keep running and holding its GPUs.
                kill_job_processes(job, self.home)
                self.tracked.pop(job.id, None)
                store.finish_job(job.id, "failed", error=f"could not start: {type(exc).__name__}: {exc}")

    def _start(self, job: Job) -> None:
        write_job_config(job)
        argv, env = build_command(job, self.home, self.python, self.gpu_available() if job.gpu_list else False)
        proc = run_job(argv, env, log_dir_of(job))
        start_time = psutil.Process(proc.pid).create_time()
        store.mark_running(job.id, proc.pid, start_time, engine=self.engine)
        self.tracked[job.id] = Tracked(job.id, proc.pid, start_time, proc)
        log.info("job %s: started %d rank(s), pid %s", job.id, job.world_size, proc.pid)


# --------------------------------------------------------------------------- daemon status file


def _start_sampler(engine, stop: threading.Event, interval_s: float) -> threading.Thread:
    def run() -> None:
        try:
            Sampler(engine, interval_s=interval_s, job_index=lambda: job_index(engine)).run(stop)
        except Exception:
            log.exception("GPU sampler stopped with an error; jobs are unaffected")

    thread = threading.Thread(target=run, name="gpu-sampler", daemon=True)
    thread.start()
    return thread


def serve(
    home: Path | None = None,
    interval_s: float = POLL_S,
    once: bool = False,
    grace_s: float = GRACE_S,
    cpu_budget: int | None = None,
    sampler_interval_s: float | None = 1.0,
    stop: threading.Event | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT (or `stop` is set, or after one pass with `once`)."""
    home = Path(home).resolve() if home is not None else paths.lab_home()
    lock = FileLock(str(home / DAEMON_LOCK_FILE))
    try:
        lock.acquire(timeout=2.0)
    except Timeout:
        print(f"another launcher already serves {home}: {daemon_status(home).message}", file=sys.stderr)
        return 3
    stop = stop or threading.Event()
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
        try:
            launcher = Launcher(home, grace_s=grace_s, cpu_budget=cpu_budget)
        except (LabDatabaseError, ValueError) as exc:
            log.error("launcher cannot start: %s", exc)
            return 1
        return _serve_loop(launcher, home, interval_s, once, sampler_interval_s, stop)
    finally:
        lock.release()


def _serve_loop(
    launcher: Launcher, home: Path, interval_s: float, once: bool, sampler_interval_s: float | None, stop
) -> int:
    me = psutil.Process()
    info = {"pid": me.pid, "create_time": me.create_time(), "started_at": time.time(), "interval": interval_s}
    info.update(home=str(home), heartbeat=time.time())
    problem = _report(beat(home, info, launcher.engine), None)
    log.info("launcher serving %s (pid %s)", home, me.pid)
    sampler = _start_sampler(launcher.engine, stop, sampler_interval_s) if sampler_interval_s and not once else None
    code = 0
    problems = ProblemLog(log, "launcher pass", expected=(OSError, *DATABASE_ERRORS))
    while True:
        try:
            launcher.tick()
            problems.succeeded()
        except LabDatabaseError as exc:
            if exc.kind != "unwritable":  # damaged, lost, deleted or replaced: no pass can succeed, say why and stop
                log.error("launcher stops: %s", exc)
                code = 1
                break
            problems.failed(exc)
        except Exception as exc:  # a locked database or a full disk must not end the daemon
            problems.failed(exc)
        info["heartbeat"] = time.time()
        problem = _report(beat(home, info, launcher.engine), problem)
        if once or stop.wait(interval_s):
            break
    if sampler is not None:
        stop.set()
        sampler.join(5)
    info["stopped_at"] = time.time()
    beat(home, info, launcher.engine)
    log.info("launcher stopped; running jobs keep running and are re-adopted on the next start")
    return code


def _report(problem: str | None, before: str | None) -> str | None:
    """Log a status-file problem when it appears, changes or clears (not on every pass)."""
    if problem != before:
        if problem:
            log.warning("%s; the status goes to lab.db meanwhile, and the file is tried again every pass", problem)
        else:
            log.info("the status file is written again")
    return problem
