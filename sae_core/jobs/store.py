"""Job rows in lab.db: insert, read, and every lifecycle update, one short session per operation.

Who writes what (the store is the only channel between processes):
- the app and the CLI insert queued jobs (through the submission gate, jobs/submission.py) and set
  `cancel_requested`;
- the launcher daemon moves jobs through starting/running to a final status;
- rank 0 of a running job appends MetricPoint rows (jobs/metrics.py).

Every write goes through `db.write_session` (BEGIN IMMEDIATE), so a read-then-write never turns into a
lock upgrade that fails with SQLITE_BUSY.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from .. import db, paths
from ..config import JobConfig
from ..db.health import job_folders
from ..db.tables import FINAL_STATUSES, JOB_STATUSES, Job
from ..sweep import Sweep
from ..text import brief
from .errors import JobError
from .kinds import job_kind, kind_of
from .placement import Submission, check_placement

log = logging.getLogger("sae_core.jobs")


def engine_or_default(engine: Engine | None) -> Engine:
    return engine if engine is not None else db.get_engine()


def engine_home(engine: Engine) -> Path:
    """The SAE_LAB_HOME an engine's lab.db lives in."""
    return Path(str(engine.url.database)).resolve().parent


# --------------------------------------------------------------------------- insert


def submit_job(cfg: JobConfig | Sweep, submission: Submission, engine: Engine | None = None) -> Job:
    """Insert a queued job of the config's kind (kinds.py: a training, an extraction, an evaluation); its output dir
    is SAE_LAB_HOME/jobs/<id>. Only its placement is checked here (a row must name a valid one); people
    submit through the gate (submission.py), which checks all."""
    gpus = check_placement(cfg, submission.gpu_ids, submission.cpu_procs)
    engine = engine_or_default(engine)
    home = engine_home(engine)
    jobs_root = paths.jobs_dir(home)
    with db.write_session(engine) as session:
        job = Job(
            id=_next_free_id(session, home),
            name=submission.name.strip(),
            submitted_by=submission.submitted_by,
            config_json=cfg.model_dump_json(),
            gpu_ids=",".join(str(g) for g in gpus),
            cpu_procs=None if gpus else submission.cpu_procs,
            status="queued",
            created_at=time.time(),
            total_steps=kind_of(cfg).total(cfg),  # steps, or rows, or contexts
            resumed_from=submission.resumed_from,
            kind=kind_of(cfg).name,
            depends_on=submission.depends_on,
        )
        session.add(job)
        session.flush()  # assigns the id inside this same transaction
        job.out_dir = str(jobs_root / str(job.id))
        if not job.name:
            job.name = f"job-{job.id}"
        session.add(job)
    return job


def _next_free_id(session, home: Path) -> int:
    """The next job id whose folder does not exist yet: a job never writes into an older job's folder (left
    by an earlier history, or made by hand). Read inside the write transaction, so racing submits agree."""
    next_row = (session.exec(select(func.max(Job.id))).one() or 0) + 1
    folders = job_folders(home)
    if folders and folders[-1] >= next_row:
        log.warning(
            "job folders up to %s exist without rows in lab.db; new jobs start at %d", folders[-1], folders[-1] + 1
        )
        return folders[-1] + 1
    return next_row


def job_config(job: Job):
    """The config a job was submitted with, as its kind's class."""
    return job_kind(job.kind).config.model_validate_json(job.config_json)


# --------------------------------------------------------------------------- queries


MAX_JOB_ID = 2**63 - 1  # SQLite's largest integer: anything beyond names no row (and would overflow a query)


def is_job_id(job_id: object) -> bool:
    """Whether `job_id` can name a stored job at all (a whole number SQLite can hold)."""
    return isinstance(job_id, int) and not isinstance(job_id, bool) and 1 <= job_id <= MAX_JOB_ID


def get_job(job_id: int, engine: Engine | None = None) -> Job | None:
    if not is_job_id(job_id):
        return None
    with db.read_session(engine_or_default(engine)) as session:
        return session.get(Job, job_id)


def require_job(job_id: int, engine: Engine | None = None) -> Job:
    job = get_job(job_id, engine)
    if job is None:
        raise JobError(f"no job with id {brief(job_id, 30)}")
    return job


def list_jobs(
    statuses: Iterable[str] | None = None,
    limit: int | None = None,
    newest_first: bool = True,
    engine: Engine | None = None,
) -> list[Job]:
    query = select(Job)
    if statuses is not None:
        statuses = list(statuses)
        unknown = set(statuses) - set(JOB_STATUSES)
        if unknown:
            raise JobError(f"status: unknown {sorted(unknown)}; allowed: {', '.join(JOB_STATUSES)}")
        query = query.where(col(Job.status).in_(statuses))
    query = query.order_by(col(Job.id).desc() if newest_first else col(Job.id))
    if limit is not None:
        query = query.limit(limit)
    with db.read_session(engine_or_default(engine)) as session:
        return list(session.exec(query).all())


def job_to_dict(job: Job) -> dict:
    """A JSON-ready view of a job (for --json and the pages)."""
    data = job.model_dump()
    data["gpu_ids"] = job.gpu_list
    data["world_size"] = job.world_size
    data["config"] = json.loads(job.config_json)
    del data["config_json"]
    return data


# --------------------------------------------------------------------------- lifecycle updates


def mark_running(job_id: int, pid: int, pid_start_time: float, engine: Engine | None = None) -> None:
    with db.write_session(engine_or_default(engine)) as session:
        job = session.get(Job, job_id)
        if job is not None and job.status == "starting":
            job.status = "running"
            job.pid = pid
            job.pid_start_time = pid_start_time
            session.add(job)


def mark_term_sent(job_id: int, when: float, engine: Engine | None = None) -> None:
    with db.write_session(engine_or_default(engine)) as session:
        job = session.get(Job, job_id)
        if job is not None and job.term_sent_at is None:
            job.term_sent_at = when
            session.add(job)


def finish_job(
    job_id: int,
    status: str,
    exit_code: int | None = None,
    error: str | None = None,
    engine: Engine | None = None,
    now: float | None = None,
) -> bool:
    """Move a job to a final status; False if it already was final (callers may race: daemon, CLI)."""
    if status not in FINAL_STATUSES:
        raise ValueError(f"status {status!r} is not final ({', '.join(FINAL_STATUSES)})")
    with db.write_session(engine_or_default(engine)) as session:
        job = session.get(Job, job_id)
        if job is None or job.status in FINAL_STATUSES:
            return False
        job.status = status
        job.exit_code = exit_code
        job.error = error
        job.finished_at = time.time() if now is None else now
        session.add(job)
    return True


def request_cancel(job_id: int, engine: Engine | None = None) -> Job:
    """Cancel a job: a queued one is cancelled at once (no daemon needed); a starting/running
    one gets `cancel_requested`, which the launcher acts on. Final jobs raise JobError."""
    with db.write_session(engine_or_default(engine)) as session:
        job = session.get(Job, job_id) if is_job_id(job_id) else None
        if job is None:
            raise JobError(f"no job with id {brief(job_id, 30)}")
        if job.status in FINAL_STATUSES:
            raise JobError(f"job {job_id} is already {job.status}")
        job.cancel_requested = True
        if job.status == "queued":
            job.status = "cancelled"
            job.finished_at = time.time()
            job.error = "cancelled before it started"
        session.add(job)
    return job
