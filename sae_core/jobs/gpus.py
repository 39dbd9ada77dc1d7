"""The GPUs as the queue sees them: which SAE Lab job each GPU process belongs to, which live jobs hold
which GPU, and every GPU's status for a job submitted now.

gpu/ knows GPUs and processes but not jobs; this module joins them with the job table.
"""

from __future__ import annotations

import time

from sqlalchemy.engine import Engine
from sqlmodel import col, select

from .. import db
from ..db.tables import LIVE_STATUSES, Job
from ..gpu.availability import GpuStatus, JobRef, statuses_from
from ..gpu.history import latest_probe
from ..gpu.nvml import probe
from ..gpu.processes import JobIndex
from ..gpu.types import Probe

SNAPSHOT_MAX_AGE_S = 10.0  # older sampler snapshots are replaced by a live probe


def job_index(engine: Engine) -> JobIndex:
    """The live jobs' leaders (pid, start time), read once: GPU processes are matched against them."""
    # A Core query on a plain connection: the sampler runs this every second.
    live = col(Job.status).in_(LIVE_STATUSES)
    query = select(Job.id, Job.pid, Job.pid_start_time).where(live, col(Job.pid).is_not(None))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return JobIndex({job_id: (pid, started) for job_id, pid, started in rows})


def current_probe(engine: Engine) -> Probe:
    """The sampler's snapshot when it is fresh, else a live probe (no daemon, or a stalled one)."""
    snapshot = latest_probe(engine)
    if snapshot is not None and time.time() - snapshot.t <= SNAPSHOT_MAX_AGE_S:
        return snapshot
    return probe(job_index(engine))


def gpu_holders(engine: Engine) -> dict[int, list[JobRef]]:
    """GPU index -> the queued/starting/running jobs that hold it."""
    query = select(Job.id, Job.name, Job.status, Job.gpu_ids).where(
        col(Job.status).in_(LIVE_STATUSES), Job.gpu_ids != ""
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    holders: dict[int, list[JobRef]] = {}
    for job_id, name, status, gpu_ids in rows:
        for part in gpu_ids.split(","):
            if part.strip().isdigit():
                holders.setdefault(int(part), []).append(JobRef(job_id, name, status))
    return holders


def gpu_statuses(engine: Engine | None = None, snapshot: Probe | None = None) -> list[GpuStatus]:
    """Every GPU's status for a job submitted now: busy with foreign work or not, which SAE Lab jobs it
    would queue behind. `snapshot` defaults to `current_probe`."""
    engine = engine if engine is not None else db.get_engine()
    return statuses_from(snapshot if snapshot is not None else current_probe(engine), gpu_holders(engine))
