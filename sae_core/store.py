"""Job and metric operations on lab.db: one short session per operation.

Who writes what (the store is the only channel between processes):
- the app and the CLI insert queued jobs and set `cancel_requested`;
- the launcher daemon moves jobs through starting/running to a final status;
- rank 0 of a running job appends MetricPoint rows through `SqliteMetricsSink`.

Every write goes through `db.write_session` (BEGIN IMMEDIATE), so a
read-then-write never turns into a lock upgrade that fails with SQLITE_BUSY.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, text
from sqlalchemy.engine import Engine
from sqlmodel import select

from . import db, paths
from .config import ConfigError, TrainConfig
from .models import ACTIVE_STATUSES, FINAL_STATUSES, JOB_STATUSES, Job, MetricPoint

if TYPE_CHECKING:
    import pandas as pd

# A queued job that has waited this long keeps later jobs off its GPUs (see plan_starts).
RESERVE_AFTER_S = 600.0
MAX_CPU_PROCS = 512

METRIC_FIELDS = ("loss", "mse", "fvu", "l0", "dead_fraction", "lr", "tokens_per_s", "aux_loss")
METRIC_COLUMNS = ("step", "tokens", *METRIC_FIELDS, "peak_mem", "peak_mem_max", "time")


class JobError(ValueError):
    """A job operation that cannot be done, phrased for a person."""


def _engine(engine: Engine | None) -> Engine:
    return engine if engine is not None else db.get_engine()


def engine_home(engine: Engine) -> Path:
    """The SAE_LAB_HOME an engine's lab.db lives in."""
    return Path(engine.url.database).resolve().parent


# --------------------------------------------------------------------------- submission


def parse_gpu_ids(gpu_ids: Sequence[int] | str | None) -> list[int]:
    """'0,1' or [0, 1] -> [0, 1]; rejects negatives, duplicates and junk with a clear message."""
    if gpu_ids is None:
        return []
    items = [p.strip() for p in gpu_ids.split(",")] if isinstance(gpu_ids, str) else list(gpu_ids)
    if isinstance(gpu_ids, str) and gpu_ids.strip() == "":
        return []
    out: list[int] = []
    for item in items:
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise JobError(f"gpus: {item!r} is not a GPU index (use e.g. 0,1)") from None
        if value < 0:
            raise JobError(f"gpus: GPU index must be 0 or more, got {value}")
        if value in out:
            raise JobError(f"gpus: GPU {value} is listed twice")
        out.append(value)
    return out


def check_placement(cfg: TrainConfig, gpu_ids: Sequence[int] | str | None, cpu_procs: int | None) -> list[int]:
    """Exactly one of GPUs / CPU processes, and a batch that splits across the ranks. Returns the GPU list."""
    gpus = parse_gpu_ids(gpu_ids)
    if gpus and cpu_procs is not None:
        raise JobError("choose either GPUs or CPU processes for a job, not both")
    if not gpus:
        if cpu_procs is None:
            raise JobError("a job needs GPUs (gpus: e.g. 0,1) or a number of CPU processes (cpu_procs)")
        if not isinstance(cpu_procs, int) or not 1 <= cpu_procs <= MAX_CPU_PROCS:
            raise JobError(f"cpu_procs: must be an integer from 1 to {MAX_CPU_PROCS}, got {cpu_procs!r}")
    world_size = len(gpus) or cpu_procs
    cfg.per_rank_batch(world_size)  # raises ConfigError naming both numbers
    return gpus


def submit_job(
    cfg: TrainConfig,
    gpu_ids: Sequence[int] | str | None,
    cpu_procs: int | None,
    name: str = "",
    submitted_by: str = "",
    resumed_from: int | None = None,
    engine: Engine | None = None,
) -> Job:
    """Queue a job (status 'queued'); its output dir is SAE_LAB_HOME/jobs/<id>."""
    gpus = check_placement(cfg, gpu_ids, cpu_procs)
    engine = _engine(engine)
    jobs_root = paths.jobs_dir(engine_home(engine))
    with db.write_session(engine) as session:
        job = Job(
            name=name.strip(),
            submitted_by=submitted_by,
            config_json=cfg.model_dump_json(),
            gpu_ids=",".join(str(g) for g in gpus),
            cpu_procs=None if gpus else cpu_procs,
            status="queued",
            created_at=time.time(),
            total_steps=cfg.total_steps,
            resumed_from=resumed_from,
        )
        session.add(job)
        session.flush()  # assigns the id inside this same transaction
        job.out_dir = str(jobs_root / str(job.id))
        if not job.name:
            job.name = f"job-{job.id}"
        session.add(job)
    return job


# Above this size the submission checks the dataset's structure only; rank 0 still scans every
# value when the job starts (a full NaN scan of a huge set would freeze the web form).
FULL_SCAN_MAX_BYTES = 2 * 2**30


def _dataset_bytes(source: str) -> int:
    path = Path(source)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.is_file() else 0


def validate_submission(
    cfg: TrainConfig, gpu_ids: Sequence[int] | str | None, cpu_procs: int | None, statuses=None
) -> list[str]:
    """Everything checked before a job is queued: placement, the dataset (data.check_dataset) and the
    GPU selection (availability.validate against `statuses_for_queueing()`: a GPU that another SAE
    Lab job holds is fine, the job waits for it). Returns the problems; empty means it may be queued."""
    try:
        gpus = check_placement(cfg, gpu_ids, cpu_procs)
    except (JobError, ConfigError) as exc:
        return [str(exc)]
    problems: list[str] = []
    if not gpus and cfg.device == "cuda":
        problems.append("device: 'cuda' cannot run as a CPU job; choose GPUs, or device 'auto' or 'cpu'")
    from .data import DatasetError, check_dataset

    try:
        scan = _dataset_bytes(cfg.activation_source) <= FULL_SCAN_MAX_BYTES
        check_dataset(cfg, len(gpus) or cpu_procs, scan_values=scan)
    except (DatasetError, ConfigError, OSError) as exc:
        problems.append(str(exc))
    if gpus:
        from . import availability

        if statuses is None:
            statuses = statuses_for_queueing()
        problems += availability.validate(gpus, cfg, statuses=statuses)
    return problems


def statuses_for_queueing(engine: Engine | None = None) -> list:
    """GPU statuses as seen by a job queued now: GPUs held by SAE Lab jobs are NOT busy (the queue
    waits for them), and the memory their ranks use counts as free (it is freed before this job
    starts). Foreign processes, lost GPUs and MIG still make a GPU unusable. -> list[GpuStatus]"""
    from . import availability, gpus, history

    engine = _engine(engine)
    probe = history.latest_probe(engine)
    if probe is None or time.time() - probe.t > availability.SNAPSHOT_MAX_AGE_S:
        probe = gpus.probe(gpus.job_of_pid_from_store(engine))
    statuses = availability.statuses_from(probe, holders={})
    for status in statuses:
        info = probe.gpu(status.index)
        ours = sum(p.gpu_memory or 0 for p in (info.processes or []) if p.job_id is not None) if info else 0
        if ours and status.memory_free is not None:
            status.memory_free += ours
    return statuses


# --------------------------------------------------------------------------- queries


def get_job(job_id: int, engine: Engine | None = None) -> Job | None:
    with db.read_session(_engine(engine)) as session:
        return session.get(Job, job_id)


def require_job(job_id: int, engine: Engine | None = None) -> Job:
    job = get_job(job_id, engine)
    if job is None:
        raise JobError(f"no job with id {job_id}")
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
        query = query.where(Job.status.in_(statuses))
    query = query.order_by(Job.id.desc() if newest_first else Job.id)
    if limit is not None:
        query = query.limit(limit)
    with db.read_session(_engine(engine)) as session:
        return list(session.exec(query).all())


def live_gpu_holders(engine: Engine | None = None) -> dict[int, Job]:
    """GPU index -> the starting/running job that holds it. Queued jobs hold nothing yet."""
    holders: dict[int, Job] = {}
    for job in list_jobs(ACTIVE_STATUSES, newest_first=False, engine=engine):
        for gpu in job.gpu_list:
            holders[gpu] = job
    return holders


def job_to_dict(job: Job) -> dict:
    """A JSON-ready view of a job (for --json and the pages)."""
    data = job.model_dump()
    data["gpu_ids"] = job.gpu_list
    data["world_size"] = job.world_size
    data["config"] = json.loads(job.config_json)
    del data["config_json"]
    return data


# --------------------------------------------------------------------------- queue decisions


def plan_starts(
    queued: Sequence[Job],
    active: Sequence[Job],
    cpu_budget: int,
    now: float,
    reserve_after_s: float = RESERVE_AFTER_S,
) -> list[Job]:
    """Which queued jobs may start now, in submission order, given the active ones. Pure.

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
    for job in sorted(queued, key=lambda j: j.id or 0):
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
    engine = _engine(engine)
    with db.read_session(engine) as session:  # cheap early-out without the write lock
        if session.exec(select(Job.id).where(Job.status == "queued").limit(1)).first() is None:
            return []
    with db.write_session(engine) as session:
        queued = session.exec(select(Job).where(Job.status == "queued").order_by(Job.id)).all()
        active = session.exec(select(Job).where(Job.status.in_(ACTIVE_STATUSES))).all()
        # Read the clock only now, holding the write lock: started_at must not predate the claim.
        now = time.time() if now is None else now
        chosen = plan_starts(queued, active, cpu_budget, now, reserve_after_s)
        for job in chosen:
            job.status = "starting"
            job.started_at = now
            session.add(job)
    return chosen


# --------------------------------------------------------------------------- lifecycle updates


def mark_running(job_id: int, pid: int, pid_start_time: float, engine: Engine | None = None) -> None:
    with db.write_session(_engine(engine)) as session:
        job = session.get(Job, job_id)
        if job is not None and job.status == "starting":
            job.status = "running"
            job.pid = pid
            job.pid_start_time = pid_start_time
            session.add(job)


def mark_term_sent(job_id: int, when: float, engine: Engine | None = None) -> None:
    with db.write_session(_engine(engine)) as session:
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
    with db.write_session(_engine(engine)) as session:
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
    with db.write_session(_engine(engine)) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobError(f"no job with id {job_id}")
        if job.status in FINAL_STATUSES:
            raise JobError(f"job {job_id} is already {job.status}")
        job.cancel_requested = True
        if job.status == "queued":
            job.status = "cancelled"
            job.finished_at = time.time()
            job.error = "cancelled before it started"
        session.add(job)
    return job


# --------------------------------------------------------------------------- resume


def resumable_checkpoint(job: Job) -> Path | None:
    """The last complete checkpoint in the job's output dir, or None."""
    from . import checkpoint  # the training side's definition of "complete"

    return checkpoint.latest_checkpoint(job.out_dir) if job.out_dir else None


def resume_job(job_id: int, submitted_by: str = "", engine: Engine | None = None) -> Job:
    """Queue a job that continues a failed or cancelled one from its last complete checkpoint."""
    engine = _engine(engine)
    old = require_job(job_id, engine)
    if old.status not in ("failed", "cancelled"):
        raise JobError(f"job {job_id} is {old.status}; only failed or cancelled jobs can be resumed")
    # A resume that died before its first checkpoint continues from its own source's checkpoint.
    source = old
    while resumable_checkpoint(source) is None and source.resumed_from is not None:
        source = require_job(source.resumed_from, engine)
    if resumable_checkpoint(source) is None:
        raise JobError(f"job {job_id} has no complete checkpoint in {old.out_dir}/checkpoints to resume from")
    cfg = TrainConfig.model_validate_json(old.config_json)
    return submit_job(
        cfg,
        old.gpu_list,
        old.cpu_procs if old.is_cpu_job else None,
        name=f"{old.name} (resumed)" if not old.name.endswith("(resumed)") else old.name,
        submitted_by=submitted_by or old.submitted_by,
        resumed_from=source.id,
        engine=engine,
    )


# --------------------------------------------------------------------------- metrics


def _num(value) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def metric_point_from_record(job_id: int, record: dict) -> MetricPoint | None:
    """A metrics record -> row; None for records that are not per-step metrics (events, junk)."""
    if "event" in record or record.get("step") is None:
        return None
    peak = record.get("peak_mem") or []
    if not isinstance(peak, list | tuple):
        peak = [peak]
    return MetricPoint(
        job_id=job_id,
        step=int(record["step"]),
        tokens=int(record.get("tokens") or 0),
        peak_mem_json=json.dumps([int(p) if p is not None else None for p in peak]),
        time=_num(record.get("time")) or time.time(),
        **{name: _num(record.get(name)) for name in METRIC_FIELDS},
    )


def write_metric_points(job_id: int, points: Sequence[MetricPoint], engine: Engine | None = None) -> None:
    """Append rows and update the job's progress, in one write transaction."""
    if not points:
        return
    with db.write_session(_engine(engine)) as session:
        session.add_all(points)
        job = session.get(Job, job_id)
        if job is not None:
            last = max(points, key=lambda p: p.step)
            if last.step >= job.last_step:
                job.last_step = last.step
                if last.tokens_per_s is not None:
                    job.tokens_per_s = last.tokens_per_s
            job.last_metric_at = time.time()
            session.add(job)


def backfill_metrics_from_jsonl(job: Job, engine: Engine | None = None) -> int:
    """Copy records of metrics.jsonl that never reached the database (e.g. it was locked when the job
    ended) into it. Returns the number of rows added. Called by the launcher when a job ends."""
    path = Path(job.out_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    engine = _engine(engine)
    with db.read_session(engine) as session:
        have = set(session.exec(select(MetricPoint.step).where(MetricPoint.job_id == job.id)).all())
    points = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed job
        point = metric_point_from_record(job.id, record) if isinstance(record, dict) else None
        if point is not None and point.step not in have:
            have.add(point.step)
            points.append(point)
    write_metric_points(job.id, points, engine)
    return len(points)


def metric_count(job_id: int, engine: Engine | None = None) -> int:
    with db.read_session(_engine(engine)) as session:
        return session.exec(select(func.count()).select_from(MetricPoint).where(MetricPoint.job_id == job_id)).one()


def metrics_frame(job_id: int, max_points: int | None = None, engine: Engine | None = None) -> pd.DataFrame:
    """A job's metrics in step order: columns METRIC_COLUMNS (`peak_mem` a per-rank list, `peak_mem_max`
    its max). With `max_points`, evenly thinned, always keeping the first and the last row.

    The thinning happens in SQL (row numbers over the (job_id, step) index), and rows come back as
    plain tuples: a 100k-step job's chart must not build 100k ORM objects on every page refresh."""
    columns = ("step", "tokens", *METRIC_FIELDS, "time", "peak_mem_json")
    select_cols = ", ".join(columns)
    engine = _engine(engine)
    with engine.connect() as conn:
        n = metric_count(job_id, engine) if max_points is not None else 0
        if max_points is not None and n > max_points >= 2:
            last = n - 1
            keep = sorted({round(i * last / (max_points - 1)) for i in range(max_points)})
            query = text(
                f"SELECT {select_cols} FROM metric_point WHERE id IN ("
                " SELECT id FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY step, id) - 1 AS rn"
                "  FROM metric_point WHERE job_id = :job) WHERE rn IN (SELECT value FROM json_each(:keep)))"
                " ORDER BY step, id"
            )
            rows = conn.execute(query, {"job": job_id, "keep": json.dumps(keep)}).fetchall()
        else:
            query = text(f"SELECT {select_cols} FROM metric_point WHERE job_id = :job ORDER BY step, id")
            rows = conn.execute(query, {"job": job_id}).fetchall()
    records = []
    for row in rows:
        record = dict(zip(columns, row, strict=True))
        peak = json.loads(record.pop("peak_mem_json") or "[]")
        record["peak_mem"] = peak
        record["peak_mem_max"] = max((p for p in peak if p is not None), default=None)
        records.append(record)
    import pandas as pd  # imported here: the daemon and the ranks never need it

    return pd.DataFrame.from_records(records, columns=list(METRIC_COLUMNS))


class SqliteMetricsSink:
    """Metrics sink of rank 0: `write()` only appends to a memory buffer; a background thread
    writes the buffer in batches (one transaction per flush), so a slow or locked database
    never stalls training. If a flush fails it is retried with the next one; `close()` waits
    at most `close_timeout_s` (metrics.jsonl keeps everything, and the launcher back-fills
    what did not reach the database when the job ends)."""

    def __init__(
        self,
        job_id: int,
        home: Path | None = None,
        flush_interval_s: float = 1.0,
        close_timeout_s: float = 5.0,
        max_buffer: int = 100_000,
        engine: Engine | None = None,
    ):
        self.job_id = job_id
        self.flush_interval_s = flush_interval_s
        self.close_timeout_s = close_timeout_s
        self._engine = engine if engine is not None else db.get_engine(home)
        self._buffer: deque[dict] = deque(maxlen=max_buffer)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self.flushes = 0
        self.failed_flushes = 0
        self.dropped = 0  # malformed records
        self.last_error: str | None = None
        self._close_deadline = math.inf
        self._thread = threading.Thread(target=self._run, name=f"metrics-sink-{job_id}", daemon=True)
        self._thread.start()

    def write(self, record: dict) -> None:
        if "event" in record or record.get("step") is None:
            return
        with self._lock:  # a shallow copy only: rows are built in the flush thread, off the training loop
            self._buffer.append(dict(record))

    def flush(self) -> None:
        """Ask the background thread to write now (does not wait)."""
        self._wake.set()

    def close(self) -> None:
        self._close_deadline = time.monotonic() + self.close_timeout_s
        self._closing.set()
        self._wake.set()
        self._thread.join(self.close_timeout_s)

    def pending(self) -> int:
        with self._lock:
            return len(self._buffer)

    def _take(self) -> list[dict]:
        with self._lock:
            batch = list(self._buffer)
            self._buffer.clear()
        return batch

    def _put_back(self, batch: list[dict]) -> None:
        with self._lock:
            self._buffer.extendleft(reversed(batch))

    def _rows(self, batch: list[dict]) -> tuple[list[dict], list[MetricPoint]]:
        """Valid records and their rows; a malformed record is dropped (it would fail every retry)."""
        kept, points = [], []
        for record in batch:
            try:
                point = metric_point_from_record(self.job_id, record)
            except (TypeError, ValueError):
                self.dropped += 1
                continue
            if point is not None:
                kept.append(record)
                points.append(point)
        return kept, points

    def _run(self) -> None:
        wait_s = self.flush_interval_s
        while True:
            self._wake.wait(wait_s)
            self._wake.clear()
            closing = self._closing.is_set()
            records, points = self._rows(self._take())
            try:
                write_metric_points(self.job_id, points, self._engine)
                if points:
                    self.flushes += 1
                wait_s = self.flush_interval_s
            except Exception as exc:  # locked past the busy timeout, disk full...: keep them and retry
                self.failed_flushes += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._put_back(records)
                wait_s = min(max(wait_s, 0.1) * 2, 10.0)
                if closing and time.monotonic() < self._close_deadline:
                    wait_s = 0.2
                    continue
            if closing and (not self.pending() or time.monotonic() >= self._close_deadline):
                return


__all__ = [
    "JobError",
    "SqliteMetricsSink",
    "backfill_metrics_from_jsonl",
    "check_placement",
    "claim_runnable",
    "engine_home",
    "finish_job",
    "get_job",
    "job_to_dict",
    "list_jobs",
    "live_gpu_holders",
    "mark_running",
    "mark_term_sent",
    "metric_count",
    "metrics_frame",
    "parse_gpu_ids",
    "plan_starts",
    "request_cancel",
    "require_job",
    "resume_job",
    "resumable_checkpoint",
    "statuses_for_queueing",
    "submit_job",
    "validate_submission",
]
