"""How a job ends: settling one whose processes are gone, stopping one without a daemon, and the one
cancel path that the CLI and the Jobs page both use."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path

import psutil

from .. import db, paths
from ..db.tables import FINAL_STATUSES, Job
from ..gpu.processes import process_if_same
from . import daemon_control, store
from .command import finished_marker
from .diagnosis import read_exit_code, root_cause
from .kinds import job_kind
from .logs import log_dir_of
from .metrics import backfill_metrics_from_jsonl
from .processes import job_processes, kill_job_processes, signal_processes

log = logging.getLogger("sae_core.launcher")

GRACE_S = 10.0  # SIGTERM -> SIGKILL on cancel
LOST_MESSAGE = "launcher lost the job"


def outcome(job: Job, exit_code: int | None, log_dir: Path) -> tuple[str, str | None]:
    """(final status, error message) of a job whose processes are gone."""
    marker = finished_marker(job)
    if exit_code == 0 and marker.is_file():
        return "completed", None  # even if a cancel arrived: it came too late to stop anything
    if job.cancel_requested:
        return "cancelled", "cancelled on request"
    if exit_code == 0:
        noun = job_kind(job.kind).noun
        return "failed", f"{noun} exited with code 0 but wrote no {marker.name}"
    if exit_code is None:
        return "failed", LOST_MESSAGE
    return "failed", root_cause(log_dir, exit_code)


def finalize_job(job: Job, home: Path, popen_returncode: int | None = None, engine=None) -> str:
    """Settle a job whose leader has ended (or vanished): kill leftovers, then record its final status
    (GPUs are free only once no process of the job is left). Returns the status recorded."""
    engine = engine if engine is not None else db.get_engine(home)
    killed = kill_job_processes(job, home)
    if killed:
        log.info("job %s: killed %d leftover process(es)", job.id, killed)
    log_dir = log_dir_of(job)
    exit_code = read_exit_code(log_dir)
    if exit_code is None and popen_returncode is not None:
        # jobwrap itself died (e.g. kill -9) before it could record torchrun's code.
        exit_code = popen_returncode
    status, error = outcome(job, exit_code, log_dir)
    with contextlib.suppress(Exception):
        backfill_metrics_from_jsonl(job, engine)
    if store.finish_job(job.id, status, exit_code, error, engine=engine):
        log.info("job %s %s%s", job.id, status, f": {error.splitlines()[0]}" if error else "")
    return status


def terminate_job(job: Job, home: Path, grace_s: float = GRACE_S, engine=None) -> str:
    """Stop a running job without a daemon: SIGTERM its processes, wait up to grace_s for the
    leader, SIGKILL whatever is left, then finalize (status cancelled if it was requested)."""
    engine = engine if engine is not None else db.get_engine(home)
    procs = job_processes(job, home)
    signal_processes(procs, signal.SIGTERM)
    store.mark_term_sent(job.id, time.time(), engine=engine)
    leader = process_if_same(job.pid, job.pid_start_time)
    if leader is not None:
        with contextlib.suppress(psutil.Error):
            leader.wait(grace_s)
    fresh = store.get_job(job.id, engine) or job
    return finalize_job(fresh, home, engine=engine)


def cancel_job(job_id: int, home: Path | None = None, grace_s: float = GRACE_S, wait_s: float = 0.0) -> tuple[Job, str]:
    """Cancel a job from any process (CLI, app). Queued: cancelled at once. Live with a launcher
    running: the launcher is asked (SIGTERM, grace period, SIGKILL); with `wait_s`, wait for it.
    Live with NO launcher: stopped here and now (terminate_job) — otherwise nobody would, and its
    GPUs would stay held. Returns the job and a sentence for the person. Raises store.JobError."""
    home = Path(home) if home is not None else paths.lab_home()
    engine = db.get_engine(home)
    job = store.request_cancel(job_id, engine=engine)
    if job.status == "cancelled":
        return job, f"job {job_id} cancelled (it had not started)"
    if daemon_control.daemon_status(home).running:
        deadline = time.time() + wait_s
        while time.time() < deadline:
            job = store.require_job(job_id, engine)
            if job.status in FINAL_STATUSES:
                return job, f"job {job_id} {job.status}"
            time.sleep(0.2)
        return job, f"cancel requested for job {job_id}; the launcher stops it"
    status = terminate_job(job, home, grace_s, engine)
    return store.require_job(job_id, engine), f"no launcher running: stopped job {job_id} here; it is {status}"
