"""history: the sampler's rows, retention with a clock we control, and the bucketed queries."""

from __future__ import annotations

import math
import threading

import pandas as pd
import pytest
from sqlalchemy import insert
from sqlmodel import select

from sae_core import db
from sae_core.db.tables import GpuMinute, GpuSample, HostSample
from sae_core.gpu import history, nvml
from tests.fakes import fake_pynvml as fake
from tests.fakes.fixtures import fake_gpus  # noqa: F401  (fixture)

GiB = fake.GiB
T0 = 1_700_000_040.0  # a whole minute
DAY = 86400.0


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def engine(lab_home):
    history.clear_query_cache()
    return db.get_engine()


def add_raw(engine, rows: list[dict]) -> None:
    with db.write_session(engine) as session:
        session.execute(insert(GpuSample), rows)


def add_minutes(engine, rows: list[dict]) -> None:
    with db.write_session(engine) as session:
        session.execute(insert(GpuMinute), rows)


def raw(t: float, gpu: int, util: float, mem: int = GiB, power: float = 100.0, temp: float = 40.0) -> dict:
    return {
        "t": t,
        "gpu_index": gpu,
        "util_gpu": util,
        "mem_used": mem,
        "mem_total": 80 * GiB,
        "power_w": power,
        "temperature": temp,
    }


def minute(t: float, gpu: int, util: float, mem: float = GiB, power: float = 100.0) -> dict:
    return {
        "t": t,
        "gpu_index": gpu,
        "util_gpu_mean": util,
        "util_gpu_max": util,
        "mem_used_mean": mem,
        "mem_used_max": mem,
        "mem_total": 80 * GiB,
        "temperature_mean": 40.0,
        "temperature_max": 40.0,
        "power_w_mean": power,
        "power_w_max": power,
    }


# --------------------------------------------------------------------------- sampler
def test_a_tick_writes_a_row_per_gpu_a_host_row_and_the_snapshot(engine, fake_gpus):  # noqa: F811
    fake_gpus.set(n_gpus=3, overrides={1: {"util_gpu": 75, "memory_used": 12 * GiB}, 2: {"lost": "GpuIsLost"}})
    clock = Clock()
    result = history.Sampler(engine, clock=clock).tick()
    counts = history.row_counts(engine)
    assert counts["gpu_sample"] == 2  # the lost GPU leaves a gap, not a row of zeros
    assert counts["host_raw"] == 1
    snapshot = history.latest_probe(engine)
    assert snapshot == result and snapshot.t == T0
    assert snapshot.gpus[2].error  # the snapshot still shows the lost GPU
    series = history.query_series(engine, "5m", aggregate=False, now=T0 + 1)
    row = series[series["gpu"] == 1].iloc[0]
    assert row["util_gpu"] == 75 and row["mem_used"] == 12 * GiB
    assert row["t"] == pd.Timestamp(T0, unit="s", tz="UTC")


def test_latest_probe_is_none_before_the_first_tick(engine):
    assert history.latest_probe(engine) is None


def test_compaction_runs_about_once_a_minute_not_every_tick(engine, fake_gpus, monkeypatch):  # noqa: F811
    fake_gpus.set(n_gpus=1)
    calls = []
    real = history.compact
    monkeypatch.setattr(history, "compact", lambda *a, **k: (calls.append(a[1]), real(*a, **k)))
    clock = Clock()
    sampler = history.Sampler(engine, clock=clock)
    for _ in range(150):
        sampler.tick()
        clock.t += 1.0
    assert calls == [T0, T0 + 60, T0 + 120]
    assert sampler.ticks == 150


def test_the_sampler_thread_survives_a_failing_tick_and_stops_on_request(engine, fake_gpus):  # noqa: F811
    fake_gpus.set(n_gpus=1)
    attempts = []

    def flaky(job_index=None):
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("NVML hiccup")
        return nvml.probe(job_index)

    stop = threading.Event()
    sampler = history.Sampler(engine, interval_s=0.02, prober=flaky)
    thread = threading.Thread(target=sampler.run, args=(stop,))
    thread.start()
    while sampler.ticks < 3:
        thread.join(0.01)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert len(attempts) >= 4 and history.row_counts(engine)["gpu_sample"] == sampler.ticks


def test_interval_must_be_positive(engine):
    with pytest.raises(ValueError, match="interval_s"):
        history.Sampler(engine, interval_s=0)


# --------------------------------------------------------------------------- retention
def test_minutes_are_summarised_raw_rows_go_after_an_hour_minutes_after_seven_days(engine):
    # Two hours of 5-second samples on two GPUs; GPU 1 at twice GPU 0's utilization.
    rows = [raw(T0 + s, g, util=(s % 60) * (g + 1), mem=(g + 1) * GiB) for s in range(0, 7200, 5) for g in (0, 1)]
    add_raw(engine, rows)
    with db.write_session(engine) as session:
        session.execute(
            insert(HostSample),
            [{"t": T0 + s, "cpu_percent": s % 60, "ram_used": GiB, "ram_total": 8 * GiB} for s in range(0, 7200, 5)],
        )
    now = T0 + 7200
    history.compact(engine, now)
    counts = history.row_counts(engine)
    cutoff = math.floor((now - history.RAW_KEEP_S) / 60) * 60 - 60  # a minute of slack beyond the hour
    kept_minutes = (now - cutoff) / 60
    assert counts["gpu_sample"] == 2 * kept_minutes * 12  # raw rows of the last hour (+ slack) stay
    assert counts["gpu_minute"] == 2 * 120  # every complete minute is summarised, raw or not
    assert counts["host_raw"] == kept_minutes * 12 and counts["host_minute"] == 120
    with db.read_session(engine) as session:
        first = session.exec(select(GpuMinute).where(GpuMinute.t == T0, GpuMinute.gpu_index == 1)).one()
    utils = [(s % 60) * 2 for s in range(0, 60, 5)]
    assert first.util_gpu_mean == pytest.approx(sum(utils) / len(utils)) and first.util_gpu_max == max(utils)
    assert first.mem_used_mean == 2 * GiB and first.mem_total == 80 * GiB

    history.compact(engine, now)  # idempotent: nothing left to compact twice
    assert history.row_counts(engine) == counts

    history.compact(engine, T0 + 7 * DAY + 1800)  # the first half hour of minutes is now older than 7 days
    after = history.row_counts(engine)
    assert after["gpu_sample"] == 0 and after["host_raw"] == 0
    assert after["gpu_minute"] == 2 * 90 and after["host_minute"] == 90  # minutes 30..119 remain


def test_eight_days_of_sampling_keep_an_hour_raw_and_a_week_of_minutes(engine, fake_gpus):  # noqa: F811
    """The sampler's own compaction bounds the tables, whatever the uptime."""
    fake_gpus.set(n_gpus=2)
    clock = Clock()
    sampler = history.Sampler(engine, interval_s=1.0, clock=clock)
    # Two samples in the first minute of every hour for 8 days keep the test fast.
    for hour in range(8 * 24):
        for second in (0, 30):
            clock.t = T0 + hour * 3600 + second
            sampler.tick()
    with db.read_session(engine) as session:
        raw_times = session.exec(select(GpuSample.t)).all()
        minute_times = session.exec(select(GpuMinute.t)).all()
    assert raw_times and min(raw_times) >= clock.t - history.RAW_KEEP_S - 120  # about the last hour only
    assert len(raw_times) == 2 * 4  # this hour's and the previous hour's two ticks, per GPU
    # nothing older than 7 days (pruning runs with compaction, at most a minute late)
    assert min(minute_times) >= clock.t - history.MINUTE_KEEP_S - history.COMPACT_EVERY_S
    assert len(minute_times) == 2 * 7 * 24  # one summarised minute per hour per GPU, a week's worth


# --------------------------------------------------------------------------- queries
def fill_week(engine, n_gpus: int = 8, now: float = T0 + 7 * DAY) -> float:
    """A week of history as the sampler leaves it: minute rows, then the last hour raw at 1 Hz."""
    raw_start = now - 3600
    add_minutes(
        engine, [minute(t, g, util=50) for t in range(int(now - 7 * DAY), int(raw_start), 60) for g in range(n_gpus)]
    )
    add_raw(engine, [raw(raw_start + s, g, util=50) for s in range(3600) for g in range(n_gpus)])
    history.compact(engine, now)  # the last hour's complete minutes are summarised too
    return now


@pytest.fixture(scope="module")
def week(tmp_path_factory):
    """(engine, now) of a lab with 8 GPUs x 7 days of history, shared by the window tests (read only)."""
    home = tmp_path_factory.mktemp("week")
    engine = db.get_engine(home)
    return engine, fill_week(engine)


@pytest.mark.parametrize("window", ["5m", "1h", "24h", "7d"])
def test_every_window_returns_at_most_500_points_per_series(week, window):
    engine, now = week
    for aggregate in (False, True):
        series = history.query_series(engine, window, aggregate, now=now)
        sizes = series.groupby("gpu").size()
        assert sorted(sizes.index) == ([-1] if aggregate else list(range(8)))
        assert sizes.max() <= 500
        span = (series["t"].max() - series["t"].min()).total_seconds()
        width = history.bucket_width(history.WINDOWS[window], 500)
        assert span >= history.WINDOWS[window] - 2 * width  # the points cover the window
    capped = history.query_series(engine, window, False, now=now, max_points=50)
    assert capped.groupby("gpu").size().max() <= 50


def test_per_gpu_and_aggregated_series(engine):
    now = T0 + 600
    add_raw(engine, [raw(T0 + s, 0, util=20, mem=10 * GiB, power=100, temp=40) for s in range(600)])
    add_raw(engine, [raw(T0 + s, 1, util=60, mem=30 * GiB, power=300, temp=70) for s in range(600)])
    per_gpu = history.query_series(engine, "5m", False, now=now)
    assert list(per_gpu.columns) == history.SERIES_COLUMNS
    assert set(per_gpu["gpu"]) == {0, 1}
    assert set(per_gpu.loc[per_gpu["gpu"] == 1, "util_gpu"]) == {60.0}
    together = history.query_series(engine, "5m", True, now=now)
    assert set(together["gpu"]) == {-1}
    assert set(together["util_gpu"]) == {40.0}  # mean utilization
    assert set(together["mem_used"]) == {40.0 * GiB} and set(together["mem_total"]) == {160.0 * GiB}  # summed
    assert set(together["power_w"]) == {400.0}  # summed
    assert set(together["temperature"]) == {70.0}  # the hottest GPU
    assert isinstance(together["t"].dtype, pd.DatetimeTZDtype) and str(together["t"].dt.tz) == "UTC"


def test_in_a_bucket_each_minute_weighs_the_same_raw_or_compacted(engine):
    width = history.bucket_width(DAY, 500)
    assert width == 180  # three minutes per point over 24 h
    start = math.floor((T0 + 7200) / width) * width
    add_minutes(engine, [minute(start, 0, util=10), minute(start + 60, 0, util=10)])
    add_raw(engine, [raw(start + 120 + s, 0, util=40) for s in range(60)])  # one raw minute at 1 Hz
    series = history.query_series(engine, "24h", False, now=start + 180)
    point = series[series["t"] == pd.Timestamp(start, unit="s", tz="UTC")].iloc[0]
    assert point["util_gpu"] == pytest.approx(20.0)  # (10 + 10 + 40) / 3, not dominated by 60 raw samples
    assert point["util_gpu_max"] == 40.0


def test_summarising_minutes_does_not_change_long_views(engine):
    add_raw(engine, [raw(T0 + s, g, util=(s * 7 + g) % 100, mem=s * 1000) for s in range(1800) for g in (0, 1)])
    now = T0 + 1830
    before = history.query_series(engine, "24h", False, now=now)
    history.compact(engine, now)
    assert history.row_counts(engine) == {"gpu_sample": 3600, "gpu_minute": 60, "host_raw": 0, "host_minute": 0}
    after = history.query_series(engine, "24h", False, now=now)
    pd.testing.assert_frame_equal(before, after, rtol=1e-12)  # each minute counted once, same values


def test_unknown_window_is_refused(engine):
    with pytest.raises(ValueError, match="5m, 1h, 24h, 7d"):
        history.query_series(engine, "2w", False)


def test_bucket_widths_are_nice_and_respect_the_cap():
    assert [history.bucket_width(history.WINDOWS[w], 500) for w in ("5m", "1h", "24h", "7d")] == [1, 10, 180, 1800]
    assert history.bucket_width(30 * DAY, 500) == 7200
    assert history.bucket_width(7200, 5000) == 60  # past the raw hour, never finer than a minute


def test_a_live_view_reuses_finished_buckets_and_matches_a_fresh_query(engine, monkeypatch):
    clock = Clock(T0 + 600)
    monkeypatch.setattr(history, "_now", clock)
    add_raw(engine, [raw(T0 + s, g, util=s % 7) for s in range(600) for g in (0, 1)])
    first = history.query_series(engine, "5m", False)
    assert first.equals(history.query_series(engine, "5m", False, now=clock.t))
    add_raw(engine, [raw(T0 + 600 + s, g, util=s % 5) for s in range(30) for g in (0, 1)])
    clock.t += 30
    again = history.query_series(engine, "5m", False)  # cached buckets + the new seconds
    assert again.equals(history.query_series(engine, "5m", False, now=clock.t))
    assert again["t"].max() > first["t"].max()


def test_query_host(engine):
    with db.write_session(engine) as session:
        session.execute(
            insert(HostSample),
            [
                {"t": T0 + s, "cpu_percent": float(s % 2) * 50, "ram_used": 2 * GiB, "ram_total": 8 * GiB}
                for s in range(300)
            ],
        )
    host = history.query_host(engine, "1h", now=T0 + 300)
    assert list(host.columns) == history.HOST_COLUMNS
    assert len(host) == 30  # 10-second buckets
    assert set(host["cpu_percent"]) == {25.0} and set(host["cpu_percent_max"]) == {50.0}
    assert set(host["ram_used"]) == {2.0 * GiB}
