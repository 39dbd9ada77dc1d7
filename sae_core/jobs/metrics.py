"""Training metrics in lab.db: rank 0's buffered sink, the rows it writes, the launcher's back-fill from
metrics.jsonl, and the frames the Jobs page charts."""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, text
from sqlalchemy.engine import Engine
from sqlmodel import select

from .. import db
from ..db.tables import Job, MetricPoint
from ..files import METRICS_FILE
from ..outputs import plain_file, sweep_members
from .store import engine_or_default

if TYPE_CHECKING:
    import pandas as pd

METRIC_FIELDS = (
    "loss",
    "mse",
    "fvu",
    "l0",
    "dead_fraction",
    "lr",
    "tokens_per_s",
    "aux_loss",
    "data_wait",
    "disk_bytes",
)
METRIC_COLUMNS = ("member", "step", "tokens", *METRIC_FIELDS, "peak_mem", "peak_mem_max", "time")
# An architecture's loss terms become frame columns named "loss: <term>"; its stats keep their own names.
LOSS_COLUMN_PREFIX = "loss: "


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
    member = record.get("member")
    point = MetricPoint(
        job_id=job_id,
        member=str(member)[:200] if member is not None else None,
        step=int(record["step"]),
        tokens=int(record.get("tokens") or 0),
        peak_mem_json=json.dumps([int(p) if p is not None else None for p in peak]),
        time=_num(record.get("time")) or time.time(),
    )
    for name in METRIC_FIELDS:
        setattr(point, name, _num(record.get(name)))
    point.losses_json = _named_json(record.get("losses"))
    point.stats_json = _named_json(record.get("stats"))
    return point


def _named_json(values) -> str | None:
    """A record's figures by name ({"mse": 1.2, ...}) as the column stores them; None when there are none."""
    if not isinstance(values, dict) or not values:
        return None
    return json.dumps({str(name)[:100]: _num(value) for name, value in values.items()})


def write_metric_points(job_id: int, points: Sequence[MetricPoint], engine: Engine | None = None) -> None:
    """Append rows and update the job's progress, in one write transaction."""
    if not points:
        return
    with db.write_session(engine_or_default(engine)) as session:
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
    ended) into it. Returns the number of rows added. Called by the launcher when a job ends. A sweep's
    run folder (it holds sweep.json) has a metrics.jsonl per member folder: each is read, its records
    stored with the member's name; a row is known by (member, step)."""
    engine = engine_or_default(engine)
    with db.read_session(engine) as session:
        rows = session.exec(select(MetricPoint.member, MetricPoint.step).where(MetricPoint.job_id == job.id)).all()
    have = {(member, step) for member, step in rows}
    points = []
    for member, path in _metrics_files(Path(job.out_dir)):
        for record in _records(path):
            if member is not None:
                record["member"] = member
            point = metric_point_from_record(job.id, record)
            if point is not None and (point.member, point.step) not in have:
                have.add((point.member, point.step))
                points.append(point)
    write_metric_points(job.id, points, engine)
    return len(points)


def _metrics_files(out_dir: Path) -> list[tuple[str | None, Path]]:
    """(member or None, metrics.jsonl) of a run folder: its own, or each member's of a sweep."""
    members = sweep_members(out_dir)
    if not members:
        return [(None, out_dir / METRICS_FILE)]
    return [(m.name, m.folder / METRICS_FILE) for m in members]


def _records(path: Path) -> list[dict]:
    if not plain_file(path):
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a killed job
        if isinstance(record, dict):
            records.append(record)
    return records


def metric_count(job_id: int, engine: Engine | None = None) -> int:
    with db.read_session(engine_or_default(engine)) as session:
        return session.exec(select(func.count()).select_from(MetricPoint).where(MetricPoint.job_id == job_id)).one()


def metrics_frame(job_id: int, max_points: int | None = None, engine: Engine | None = None) -> pd.DataFrame:
    """A job's metrics in step order: columns METRIC_COLUMNS (`peak_mem` a per-rank list, `peak_mem_max`
    its max), then a column per named loss term ("loss: mse") and stat of the architecture (named_columns).
    With `max_points`, evenly thinned, always keeping the first and the last row.

    The thinning happens in SQL (row numbers over the (job_id, step) index), and rows come back as
    plain tuples: a 100k-step job's chart must not build 100k ORM objects on every page refresh."""
    columns = ("member", "step", "tokens", *METRIC_FIELDS, "time", "peak_mem_json", "losses_json", "stats_json")
    select_cols = ", ".join(columns)
    engine = engine_or_default(engine)
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
    records, named = [], {}
    for row in rows:
        record = dict(zip(columns, row, strict=True))
        peak = json.loads(record.pop("peak_mem_json") or "[]")
        record["peak_mem"] = peak
        record["peak_mem_max"] = max((p for p in peak if p is not None), default=None)
        for prefix, column in ((LOSS_COLUMN_PREFIX, "losses_json"), ("", "stats_json")):
            for name, value in json.loads(record.pop(column) or "{}").items():
                record[prefix + name] = named[prefix + name] = value
        records.append(record)
    import pandas as pd  # imported here: the daemon and the ranks load this module but never need pandas

    return pd.DataFrame.from_records(records, columns=[*METRIC_COLUMNS, *named])


def named_columns(frame: pd.DataFrame) -> list[str]:
    """The columns of `metrics_frame` that an architecture named (its loss terms and stats)."""
    return [column for column in frame.columns if column not in METRIC_COLUMNS]


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
