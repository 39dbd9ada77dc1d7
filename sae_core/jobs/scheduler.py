"""The queue's decisions: which queued jobs may start now (pure), and claiming them atomically.

A job that depends on another (a training on an extraction's output) waits while that one has not
completed, and is cancelled, with the reason, when that one fails or is cancelled."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from sqlalchemy.engine import Engine
from sqlmodel import col, select

from .. import db
from ..db.tables import ACTIVE_STATUSES, Job
from ..text import brief
from .store import engine_or_default

# A queued job that has waited this long keeps later jobs off its GPUs (see plan_starts).
RESERVE_AFTER_S = 600.0


def plan_starts(
    queued: Sequence[Job],
    active: Sequence[Job],
    cpu_budget: int,
    now: float,
    reserve_after_s: float = RESERVE_AFTER_S,
    parent_status: Mapping[int, str] | None = None,
) -> list[Job]:
    """Which queued jobs may start now, in submission order, given the active ones. Pure.

    - A job that depends on another starts only once `parent_status` says that one completed; until
      then it holds nothing (later jobs may use its GPUs).
    - GPU jobs start when none of their GPUs is held by an active job or by a job
      chosen earlier in this pass; a job waiting for GPU 1 does not block a later
      job that only needs GPU 0 (backfill).
    - Against starvation of wide jobs: a job that has waited `reserve_after_s`
      reserves its GPUs, so later jobs can no longer backfill onto them.
    - CPU jobs run concurrently while the sum of their processes fits `cpu_budget`;
      one CPU job may always run alone, however wide. The same aging rule applies.
    """
    busy = {g for job in active for g in job.gpu_list}
    reserved: set[int] = set()
    cpu_used = sum(job.world_size for job in active if job.is_cpu_job)
    cpu_running = any(job.is_cpu_job for job in active)
    cpu_reserved = False
    chosen: list[Job] = []
    parent_status = parent_status or {}
    for job in sorted(queued, key=lambda j: j.id or 0):
        if job.depends_on is not None and parent_status.get(job.depends_on) != "completed":
            continue
        waited_long = now - job.created_at >= reserve_after_s
        if job.is_cpu_job:
            fits = cpu_used + job.world_size <= cpu_budget or not cpu_running
            if fits and not cpu_reserved:
                chosen.append(job)
                cpu_used += job.world_size
                cpu_running = True
            elif waited_long:
                cpu_reserved = True
            continue
        gpus = set(job.gpu_list)
        if gpus & (busy | reserved):
            if waited_long:
                reserved |= gpus
            continue
        chosen.append(job)
        busy |= gpus
    return chosen


def claim_runnable(
    cpu_budget: int,
    engine: Engine | None = None,
    now: float | None = None,
    reserve_after_s: float = RESERVE_AFTER_S,
) -> list[Job]:
    """Pick the jobs that may start and mark them 'starting', in ONE write transaction.

    BEGIN IMMEDIATE makes the check (no active job holds the GPUs) and the mark
    atomic against every other process, so a GPU is never given to two jobs.
    """
    engine = engine_or_default(engine)
    with db.read_session(engine) as session:  # cheap early-out without the write lock
        if session.exec(select(Job.id).where(Job.status == "queued").limit(1)).first() is None:
            return []
    with db.write_session(engine) as session:
        queued = session.exec(select(Job).where(Job.status == "queued").order_by(col(Job.id))).all()
        active = session.exec(select(Job).where(col(Job.status).in_(ACTIVE_STATUSES))).all()
        # Read the clock only now, holding the write lock: started_at must not predate the claim.
        now = time.time() if now is None else now
        parents = {p.id: p for p in _parents(session, queued)}
        queued = [job for job in queued if not _cancel_orphan(session, job, parents, now)]
        status = {job_id: parent.status for job_id, parent in parents.items()}
        chosen = plan_starts(queued, active, cpu_budget, now, reserve_after_s, status)
        for job in chosen:
            job.status = "starting"
            job.started_at = now
            session.add(job)
    return chosen


def _parents(session, queued: Sequence[Job]) -> list[Job]:
    ids = {job.depends_on for job in queued if job.depends_on is not None}
    return list(session.exec(select(Job).where(col(Job.id).in_(ids))).all()) if ids else []


def _cancel_orphan(session, job: Job, parents: Mapping[int, Job], now: float) -> bool:
    """Cancel a queued job whose parent failed or was cancelled (or is gone); True if it was."""
    if job.depends_on is None:
        return False
    parent = parents.get(job.depends_on)
    if parent is not None and parent.status not in ("failed", "cancelled"):
        return False
    why = f"job {job.depends_on} it depends on is gone"
    if parent is not None:
        cause = f": {brief(parent.error.splitlines()[0], 200)}" if parent.error else ""
        why = f"job {parent.id} ({parent.kind}) it depends on {parent.status}{cause}"
    job.status, job.finished_at, job.error = "cancelled", now, why
    session.add(job)
    return True
