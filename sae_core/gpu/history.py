"""GPU and host history in lab.db: the sampler that writes it (one per SAE_LAB_HOME) and the queries pages read.

The launcher daemon runs `Sampler.run` in a thread (never one sampler per browser tab). Each tick
probes NVML once and writes, in one short write transaction: a `gpu_sample` row per GPU, a
`host_sample` row, and the full probe as the `snapshot` row "probe" (so pages show processes and
details without calling NVML per viewer).

Retention (`compact`, run about once a minute, not every tick):
- every complete minute is summarised as per-minute mean and max (`gpu_minute`, `host_sample`
  with resolution 'minute');
- raw rows are kept for the last hour (`RAW_KEEP_S`, plus a minute), for the 5 min / 1 h views;
- per-minute rows older than 7 days (`MINUTE_KEEP_S`) are deleted.
Eight GPUs at 1 Hz thus keep ~29k raw + ~81k minute rows, whatever the uptime.

Queries bucket by time inside SQLite (GROUP BY an integer bucket number), so a 7-day window costs
one aggregate over the range of the `t` index, not millions of rows in Python, and every series has
at most `max_points` points. Bucket widths are "nice" (1 s, 10 s, 3 min, ...) and aligned to the
epoch, so points do not shift when the page re-queries two seconds later.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
from sqlalchemy import insert, text
from sqlalchemy.engine import Engine

from .. import db
from ..db import snapshots
from ..db.health import DATABASE_ERRORS
from ..db.tables import GpuSample, HostSample
from ..log_backoff import ProblemLog
from .nvml import probe
from .processes import JobIndex
from .types import Probe

log = logging.getLogger(__name__)

RAW_KEEP_S = 3600.0
MINUTE_KEEP_S = 7 * 86400.0
COMPACT_EVERY_S = 60.0
SNAPSHOT_KEY = "probe"
WINDOWS: dict[str, float] = {"5m": 300.0, "1h": 3600.0, "24h": 86400.0, "7d": 7 * 86400.0}
# Candidate bucket widths (seconds); beyond the last, whole days.
NICE_WIDTHS = (1, 2, 5, 10, 15, 30, 60, 120, 180, 300, 600, 900, 1200, 1800, 3600, 7200, 10800, 21600, 43200, 86400)

Prober = Callable[[JobIndex | None], Probe]


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------
class Sampler:
    """Samples every GPU and the host into lab.db every `interval_s` seconds.

    `clock` gives the timestamp of each sample (tests pass a fake clock to walk through days);
    `prober(job_index)` returns a `Probe` (default: NVML through `nvml.probe`); `job_index()` says which
    SAE Lab job each GPU process belongs to (the daemon reads it from the job table; None: unattributed)."""

    def __init__(
        self,
        engine: Engine,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        prober: Prober | None = None,
        job_index: Callable[[], JobIndex | None] | None = None,
        compact_every_s: float = COMPACT_EVERY_S,
        raw_keep_s: float = RAW_KEEP_S,
        minute_keep_s: float = MINUTE_KEEP_S,
    ):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.engine = engine
        self.interval_s = interval_s
        self.clock = clock
        self.prober = prober or probe
        self.job_index = job_index
        self.compact_every_s = compact_every_s
        self.raw_keep_s = raw_keep_s
        self.minute_keep_s = minute_keep_s
        self._last_compaction = -math.inf
        self.ticks = 0
        expected = (OSError, *DATABASE_ERRORS)  # a full disk, a locked or vanished lab.db: one line, not a trace
        self._problems = ProblemLog(log, "GPU sample", expected)
        self._job_index_problems = ProblemLog(log, "reading live jobs for the GPU sample", expected)

    def tick(self) -> Probe:
        """One sample: probe, write rows and snapshot, compact when a minute has passed."""
        now = self.clock()
        result = self.prober(self._job_index())
        result.t = now
        write_probe(self.engine, result)
        if now - self._last_compaction >= self.compact_every_s:
            compact(self.engine, now, self.raw_keep_s, self.minute_keep_s)
            self._last_compaction = now
        self.ticks += 1
        return result

    def run(self, stop_event: threading.Event) -> None:
        """Tick until `stop_event` is set. A failed tick (database locked, NVML hiccup) is logged and
        the next one tried: the sampler thread must outlive transient trouble."""
        while not stop_event.is_set():
            started = time.monotonic()
            try:
                self.tick()
                self._problems.succeeded()
            except Exception as exc:
                self._problems.failed(exc)
            stop_event.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def _job_index(self) -> JobIndex | None:
        if self.job_index is None:
            return None
        try:
            index = self.job_index()
        except Exception as exc:
            self._job_index_problems.failed(exc)
            return None
        self._job_index_problems.succeeded()
        return index


def write_probe(engine: Engine, result: Probe) -> None:
    """Rows for one probe, in one short write transaction."""
    gpu_rows = [
        {
            "t": result.t,
            "gpu_index": g.index,
            "util_gpu": g.util_gpu,
            "util_mem": g.util_mem,
            "mem_used": g.memory_used,
            "mem_total": g.memory_total,
            "temperature": g.temperature,
            "power_w": g.power_w,
            "power_limit_w": g.power_limit_w,
        }
        for g in result.gpus
        if g.error is None  # a lost GPU leaves a gap in its chart, not zeros
    ]
    host = result.host
    host_row = {
        "t": result.t,
        "resolution": "raw",
        "cpu_percent": host.cpu_percent,
        "cpu_percent_max": host.cpu_percent,
        "ram_used": host.ram_used,
        "ram_total": host.ram_total,
    }
    payload = json.dumps(result.to_dict(), separators=(",", ":"))
    with db.write_session(engine) as session:
        conn = session.connection()  # Core executemany: the ORM's bulk path costs more than the rows
        if gpu_rows:
            conn.execute(insert(GpuSample), gpu_rows)
        conn.execute(insert(HostSample), [host_row])
        conn.execute(snapshots.upsert(SNAPSHOT_KEY, result.t, payload))


def compact(engine: Engine, now: float, raw_keep_s: float = RAW_KEEP_S, minute_keep_s: float = MINUTE_KEEP_S) -> None:
    """Every complete minute not yet summarised becomes per-minute rows; raw rows older than
    `raw_keep_s` and minute rows older than `minute_keep_s` go.

    Minutes are summarised as soon as they end (raw rows stay an hour for the fine-grained views),
    so a long window reads minute rows plus at most a minute or two of raw rows. A minute is always
    summarised from all of its samples at once: the sampler compacts right after its own write."""
    params = {
        "current": math.floor(now / 60.0) * 60.0,  # start of the minute still being sampled
        # raw rows are kept a minute beyond raw_keep_s, so an hour-long window always reads raw rows
        "raw_cutoff": math.floor((now - raw_keep_s) / 60.0) * 60.0 - 60.0,
        "oldest": now - minute_keep_s,
    }
    with db.write_session(engine) as session:
        session.execute(
            text(
                "INSERT INTO gpu_minute (t, gpu_index, util_gpu_mean, util_gpu_max, mem_used_mean, mem_used_max,"
                " mem_total, temperature_mean, temperature_max, power_w_mean, power_w_max)"
                " SELECT CAST(t / 60 AS INTEGER) * 60.0 AS minute, gpu_index, AVG(util_gpu), MAX(util_gpu),"
                " AVG(mem_used), MAX(mem_used), MAX(mem_total), AVG(temperature), MAX(temperature),"
                " AVG(power_w), MAX(power_w) FROM gpu_sample"
                f" WHERE t >= ({_GPU_SUMMARISED_UNTIL}) AND t < :current GROUP BY minute, gpu_index"
            ),
            params,
        )
        session.execute(text("DELETE FROM gpu_sample WHERE t < :raw_cutoff"), params)
        session.execute(text("DELETE FROM gpu_minute WHERE t < :oldest"), params)
        session.execute(
            text(
                "INSERT INTO host_sample (t, resolution, cpu_percent, cpu_percent_max, ram_used, ram_total)"
                " SELECT CAST(t / 60 AS INTEGER) * 60.0 AS minute, 'minute', AVG(cpu_percent),"
                " MAX(COALESCE(cpu_percent_max, cpu_percent)), CAST(AVG(ram_used) AS INTEGER), MAX(ram_total)"
                f" FROM host_sample WHERE resolution = 'raw' AND t >= ({_HOST_SUMMARISED_UNTIL}) AND t < :current"
                " GROUP BY minute"
            ),
            params,
        )
        session.execute(text("DELETE FROM host_sample WHERE resolution = 'raw' AND t < :raw_cutoff"), params)
        session.execute(text("DELETE FROM host_sample WHERE resolution = 'minute' AND t < :oldest"), params)


# The end of the last summarised minute (-1e18 when none): raw rows from there on are not in minute rows yet.
_GPU_SUMMARISED_UNTIL = "SELECT COALESCE(MAX(t) + 60.0, -1e18) FROM gpu_minute"
_HOST_SUMMARISED_UNTIL = "SELECT COALESCE(MAX(t) + 60.0, -1e18) FROM host_sample WHERE resolution = 'minute'"


# ---------------------------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------------------------
def window_seconds(window: str | float) -> float:
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"window {window!r} is not one of {', '.join(WINDOWS)}")
        return WINDOWS[window]
    if not window > 0:
        raise ValueError(f"window must be a positive number of seconds, got {window!r}")
    return float(window)


def bucket_width(window_s: float, max_points: int, raw_keep_s: float = RAW_KEEP_S) -> float:
    """The smallest nice width that keeps a window at most `max_points` buckets. A window reaching
    past the raw hour uses at least a minute: older data exists only per minute."""
    needed = window_s / max(1, max_points - 1)  # epoch-aligned buckets can add one partial bucket
    if window_s > raw_keep_s:
        needed = max(needed, 60.0)
    for width in NICE_WIDTHS:
        if width >= needed:
            return float(width)
    return float(math.ceil(needed / 86400.0) * 86400)


_PER_GPU_COLUMNS = [
    "b",
    "gpu",
    "util_gpu",
    "util_gpu_max",
    "mem_used",
    "mem_used_max",
    "mem_total",
    "temperature",
    "power_w",
]
SERIES_COLUMNS = ["t", *_PER_GPU_COLUMNS[1:]]


def _gpu_points_sql(width: float) -> str:
    """The points of a range. Sub-minute buckets read raw rows (kept for the hour such windows span);
    coarser buckets read minute rows plus the raw rows of minutes not summarised yet, reduced to
    one row per minute, so every minute weighs the same."""
    if width < 60:
        return (
            "SELECT t, gpu_index, util_gpu, util_gpu, mem_used, mem_used, mem_total, temperature, power_w"
            " FROM gpu_sample WHERE t >= :start AND t <= :now"
        )
    minute = (
        "SELECT t, gpu_index, util_gpu_mean, util_gpu_max, mem_used_mean, mem_used_max, mem_total,"
        " temperature_mean, power_w_mean FROM gpu_minute WHERE t >= :start AND t <= :now"
    )
    recent = (
        "SELECT CAST(t / 60 AS INTEGER) * 60.0 AS minute, gpu_index, AVG(util_gpu), MAX(util_gpu),"
        " AVG(mem_used), MAX(mem_used), MAX(mem_total), AVG(temperature), AVG(power_w) FROM gpu_sample"
        f" WHERE t >= MAX(:start, ({_GPU_SUMMARISED_UNTIL})) AND t <= :now GROUP BY minute, gpu_index"
    )
    return f"{minute} UNION ALL {recent}"


def _per_gpu_sql(width: float) -> str:
    return (
        f"WITH pts(t, gpu_index, u, u_max, m, m_max, mt, temp, p) AS ({_gpu_points_sql(width)})"
        " SELECT CAST(t / :width AS INTEGER) AS b, gpu_index AS gpu, AVG(u) AS util_gpu, MAX(u_max) AS util_gpu_max,"
        " AVG(m) AS mem_used, MAX(m_max) AS mem_used_max, MAX(mt) AS mem_total, AVG(temp) AS temperature,"
        " AVG(p) AS power_w FROM pts GROUP BY b, gpu_index"
    )


def _aggregated_sql(width: float) -> str:
    # Across GPUs: mean utilization, summed memory and power, hottest temperature.
    return (
        "SELECT b, -1 AS gpu, AVG(util_gpu), MAX(util_gpu_max), SUM(mem_used), SUM(mem_used_max),"
        f" SUM(mem_total), MAX(temperature), SUM(power_w) FROM ({_per_gpu_sql(width)}) GROUP BY b"
    )


def query_series(
    engine: Engine,
    window: str | float,
    aggregate: bool,
    now: float | None = None,
    max_points: int = 500,
) -> pd.DataFrame:
    """GPU history over `window` ("5m", "1h", "24h", "7d" or seconds), long format.

    Columns: t (UTC datetime, bucket start), gpu (NVML index; -1 when aggregated), util_gpu (mean %),
    util_gpu_max, mem_used (mean bytes), mem_used_max, mem_total, temperature, power_w (W).
    Aggregated: mean utilization, summed memory and power, hottest temperature across GPUs.
    At most `max_points` rows per series. `now=None` is a live view: buckets already complete are
    remembered in this process, so a page refreshing every 2 s re-reads only the last seconds."""
    window_s = window_seconds(window)
    width = bucket_width(window_s, max_points)
    sql = (_aggregated_sql(width) if aggregate else _per_gpu_sql(width)) + " ORDER BY gpu, b"
    rows = _bucket_rows(engine, ("gpu", window_s, aggregate, width), sql, window_s, width, now)
    rows.sort(key=lambda r: (r[1], r[0]))
    frame = pd.DataFrame(rows, columns=_PER_GPU_COLUMNS)
    frame["gpu"] = frame["gpu"].astype("int64")
    frame.insert(0, "t", pd.to_datetime(frame.pop("b").astype("float64") * width, unit="s", utc=True))
    return frame.astype(dict.fromkeys(SERIES_COLUMNS[2:], "float64"))


HOST_COLUMNS = ["t", "cpu_percent", "cpu_percent_max", "ram_used", "ram_total"]


def _host_sql(width: float) -> str:
    """Like `_gpu_points_sql`: raw rows for sub-minute buckets, else minute rows + unsummarised minutes."""
    if width < 60:
        points = (
            "SELECT t, cpu_percent, COALESCE(cpu_percent_max, cpu_percent), ram_used, ram_total FROM host_sample"
            " WHERE resolution = 'raw' AND t >= :start AND t <= :now"
        )
    else:
        points = (
            "SELECT t, cpu_percent, cpu_percent_max, ram_used, ram_total FROM host_sample"
            " WHERE resolution = 'minute' AND t >= :start AND t <= :now"
            " UNION ALL"
            " SELECT CAST(t / 60 AS INTEGER) * 60.0 AS minute, AVG(cpu_percent),"
            " MAX(COALESCE(cpu_percent_max, cpu_percent)), AVG(ram_used), MAX(ram_total) FROM host_sample"
            f" WHERE resolution = 'raw' AND t >= MAX(:start, ({_HOST_SUMMARISED_UNTIL})) AND t <= :now GROUP BY minute"
        )
    return (
        f"WITH pts(t, c, c_max, r, rt) AS ({points})"
        " SELECT CAST(t / :width AS INTEGER) AS b, AVG(c), MAX(c_max), AVG(r), MAX(rt) FROM pts GROUP BY b ORDER BY b"
    )


def query_host(engine: Engine, window: str | float, now: float | None = None, max_points: int = 500) -> pd.DataFrame:
    """Host CPU (mean and max %) and RAM (bytes) over `window`, at most `max_points` rows."""
    window_s = window_seconds(window)
    width = bucket_width(window_s, max_points)
    rows = _bucket_rows(engine, ("host", window_s, width), _host_sql(width), window_s, width, now)
    rows.sort(key=lambda r: r[0])
    frame = pd.DataFrame(rows, columns=["b", *HOST_COLUMNS[1:]])
    frame.insert(0, "t", pd.to_datetime(frame.pop("b").astype("float64") * width, unit="s", utc=True))
    return frame.astype(dict.fromkeys(HOST_COLUMNS[1:], "float64"))


# A bucket is final once it ended this long ago: a tick commits its rows within about an interval
# of its timestamp (longer only if the database was locked), so later rows cannot change it.
FINAL_AFTER_S = 10.0
_CACHE_ENTRIES = 64
_now = time.time  # the clock of live queries (tests replace it)


@dataclass
class _CachedBuckets:
    final_b: int  # buckets below this number are complete and held in `rows`
    rows: list[tuple]


_bucket_cache: OrderedDict[tuple, _CachedBuckets] = OrderedDict()
_bucket_cache_lock = threading.Lock()


def _bucket_rows(engine: Engine, key: tuple, sql: str, window_s: float, width: float, now: float | None) -> list[tuple]:
    """Rows (bucket number first) of the buckets covering [now - window, now].

    The first bucket is read whole (from its aligned start), so a cached and a fresh answer agree.
    With `now` given (history, tests) nothing is cached."""
    if now is not None:
        return _fetch(engine, sql, math.floor((now - window_s) / width) * width, now, width)
    now = _now()
    first_b = math.floor((now - window_s) / width)
    key = (id(engine), str(engine.url), *key)
    last_b = math.floor(now / width)
    with _bucket_cache_lock:
        entry = _bucket_cache.get(key)
    if entry is not None and entry.final_b > last_b + 1:
        entry = None  # the clock went back: start afresh
    from_b = first_b if entry is None else max(first_b, entry.final_b)
    rows = [r for r in entry.rows if first_b <= r[0] < from_b] if entry is not None else []
    rows += _fetch(engine, sql, from_b * width, now, width)
    final_b = math.floor((now - FINAL_AFTER_S) / width)
    with _bucket_cache_lock:
        _bucket_cache[key] = _CachedBuckets(final_b, [r for r in rows if r[0] < final_b])
        _bucket_cache.move_to_end(key)
        while len(_bucket_cache) > _CACHE_ENTRIES:
            _bucket_cache.popitem(last=False)
    return rows


def _fetch(engine: Engine, sql: str, start: float, now: float, width: float) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), {"start": start, "now": now, "width": width})]


def clear_query_cache() -> None:
    with _bucket_cache_lock:
        _bucket_cache.clear()


def latest_probe(engine: Engine) -> Probe | None:
    """The sampler's most recent probe (None before its first tick). Check `.t` for staleness: a
    stopped daemon leaves an old snapshot behind."""
    payload = snapshots.get(engine, SNAPSHOT_KEY)
    return None if payload is None else Probe.from_dict(json.loads(payload))


def row_counts(engine: Engine) -> dict[str, int]:
    """Rows per history table (the bench and the retention tests read it)."""
    with engine.connect() as conn:
        return {
            "gpu_sample": conn.execute(text("SELECT COUNT(*) FROM gpu_sample")).scalar_one(),
            "gpu_minute": conn.execute(text("SELECT COUNT(*) FROM gpu_minute")).scalar_one(),
            "host_raw": conn.execute(text("SELECT COUNT(*) FROM host_sample WHERE resolution = 'raw'")).scalar_one(),
            "host_minute": conn.execute(
                text("SELECT COUNT(*) FROM host_sample WHERE resolution = 'minute'")
            ).scalar_one(),
        }


__all__ = [
    "Sampler",
    "write_probe",
    "compact",
    "query_series",
    "query_host",
    "latest_probe",
    "bucket_width",
    "window_seconds",
    "row_counts",
    "WINDOWS",
]
