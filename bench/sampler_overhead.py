"""Sampler overhead and history query time.

1. CPU time (process time) of `history.Sampler.tick()` with 8 GPUs: NVML probe, psutil attribution
   of one process per GPU to a live SAE Lab job, the rows + snapshot write, and compaction as it
   runs (once a minute). Reported per sample, per sample per GPU, and as % of one core at 1 Hz
   (target: < 1 %).
2. Query time of `history.query_series` over 8 GPUs with a full history (7 days of minute rows,
   the last hour raw at 1 Hz), for each window, per-GPU and aggregated: cold (a fresh query) and
   live (a page re-querying every 2 s while the sampler writes, which reuses finished buckets).

    python -m bench.sampler_overhead              # fake NVML (this machine has no GPU)
    python -m bench.sampler_overhead --nvml real  # the machine's NVML (a GPU box)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from sqlalchemy import insert

from sae_core import db
from sae_core.db.tables import GpuMinute, GpuSample, HostSample, Job
from sae_core.gpu import history, nvml
from sae_core.jobs.gpus import job_index
from tests.fakes import fake_pynvml as fake

N_GPUS = 8
DAY = 86400.0


def start_ranks(n: int) -> tuple[subprocess.Popen, list[int]]:
    """A 'torchrun' process with n sleeping 'rank' children, as a job looks to the sampler."""
    code = (
        "import subprocess, sys, time\n"
        f"kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)']) for _ in range({n})]\n"
        "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
        "time.sleep(3600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in parent.stdout.readline().split()]
    return parent, pids


def stop_ranks(parent: subprocess.Popen) -> None:
    for child in psutil.Process(parent.pid).children(recursive=True):
        child.kill()
    parent.kill()
    parent.wait()


def setup_fake(home: Path, rank_pids: list[int]) -> None:
    scn = fake.scenario(
        N_GPUS,
        topology="dgx",
        util_gpu=93,
        overrides={i: {"processes": [fake.process(pid, 30 * fake.GiB)]} for i, pid in enumerate(rank_pids)},
    )
    path = fake.write_scenario(home / "fake_gpus.json", scn)
    os.environ.update(fake.env_for(path))


def add_live_job(engine, parent_pid: int) -> None:
    with db.write_session(engine) as session:
        session.add(
            Job(
                name="bench",
                config_json="{}",
                gpu_ids=",".join(str(i) for i in range(N_GPUS)),
                status="running",
                pid=parent_pid,
                pid_start_time=psutil.Process(parent_pid).create_time(),
                created_at=time.time(),
            )
        )


def measure_ticks(engine, ticks: int) -> dict:
    clock_t = [time.time()]
    sampler = history.Sampler(engine, interval_s=1.0, clock=lambda: clock_t[0], job_index=lambda: job_index(engine))
    sampler.tick()  # warm: NVML init, topology, psutil caches, first compaction
    probe_cpu = 0.0
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    for _ in range(ticks):
        clock_t[0] += 1.0  # simulated 1 Hz: compaction runs once per 60 ticks, as in real life
        sampler.tick()
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start_wall
    for _ in range(ticks):  # the probe alone, for the split
        t0 = time.process_time()
        nvml.probe(job_index(engine))
        probe_cpu += time.process_time() - t0
    result = nvml.probe(job_index(engine))
    attributed = sum(1 for g in result.gpus for p in g.processes or [] if p.job_id is not None)
    return {
        "ticks": ticks,
        "cpu_ms_per_tick": 1000 * cpu / ticks,
        "wall_ms_per_tick": 1000 * wall / ticks,
        "probe_cpu_ms": 1000 * probe_cpu / ticks,
        "gpus": len(result.gpus),
        "attributed": attributed,
    }


def fill_history(engine, now: float) -> None:
    """What the sampler leaves after running for a week: minute rows, then the last hour raw."""
    gib = 1024**3
    raw_start = now - 3600
    minutes = [
        {
            "t": float(t),
            "gpu_index": g,
            "util_gpu_mean": 50.0 + g,
            "util_gpu_max": 90.0,
            "mem_used_mean": 30.0 * gib,
            "mem_used_max": 31.0 * gib,
            "mem_total": 80 * gib,
            "temperature_mean": 60.0,
            "temperature_max": 65.0,
            "power_w_mean": 400.0,
            "power_w_max": 500.0,
        }
        for t in range(int(now - 7 * DAY) // 60 * 60, int(raw_start) // 60 * 60, 60)
        for g in range(N_GPUS)
    ]
    raws = [
        {
            "t": raw_start + s,
            "gpu_index": g,
            "util_gpu": float((s + g) % 100),
            "util_mem": 20.0,
            "mem_used": 30 * gib,
            "mem_total": 80 * gib,
            "temperature": 60.0,
            "power_w": 400.0,
            "power_limit_w": 700.0,
        }
        for s in range(3600)
        for g in range(N_GPUS)
    ]
    hosts = [
        {"t": raw_start + s, "cpu_percent": 30.0, "ram_used": 40 * gib, "ram_total": 512 * gib} for s in range(3600)
    ]
    with db.write_session(engine) as session:
        session.execute(insert(GpuMinute), minutes)
        session.execute(insert(GpuSample), raws)
        session.execute(insert(HostSample), hosts)
    history.compact(engine, now)  # as the sampler does: the last hour's minutes are summarised too


def measure_queries(engine, now: float, repeats: int = 5) -> list[dict]:
    rows = []
    clock = [now]
    history._now = lambda: clock[0]  # live views read this clock
    for window in history.WINDOWS:
        for aggregate in (False, True):
            cold = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                frame = history.query_series(engine, window, aggregate, now=now)
                cold.append(time.perf_counter() - t0)
            # Live: a page refreshing every 2 s while the sampler adds 2 s of samples.
            history.clear_query_cache()
            clock[0] = now
            history.query_series(engine, window, aggregate)  # first view fills the cache
            live = []
            for _ in range(repeats):
                new = [
                    {"t": clock[0] + s + 1, "gpu_index": g, "util_gpu": 50.0, "mem_used": 1, "mem_total": 2}
                    for s in range(2)
                    for g in range(N_GPUS)
                ]
                with db.write_session(engine) as session:
                    session.execute(insert(GpuSample), new)
                clock[0] += 2
                t0 = time.perf_counter()
                history.query_series(engine, window, aggregate)
                live.append(time.perf_counter() - t0)
            with db.write_session(engine) as session:  # leave the history as it was for the next window
                session.execute(GpuSample.__table__.delete().where(GpuSample.t > now))
            points = int(frame.groupby("gpu").size().max())
            rows.append(
                {
                    "window": window,
                    "view": "aggregated" if aggregate else "per GPU",
                    "points": points,
                    "cold_ms": 1000 * statistics.median(cold),
                    "live_ms": 1000 * statistics.median(live),
                }
            )
    history._now = time.time
    t0 = time.perf_counter()
    history.query_host(engine, "24h", now=now)
    rows.append(
        {
            "window": "24h",
            "view": "host",
            "points": 0,
            "cold_ms": 1000 * (time.perf_counter() - t0),
            "live_ms": float("nan"),
        }
    )
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{platform.node()}: {psutil.cpu_count()} CPUs ({cpu}), {psutil.virtual_memory().total / 1024**3:.0f} GiB RAM"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvml", choices=["fake", "real"], default="fake")
    parser.add_argument("--ticks", type=int, default=600)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["SAE_LAB_HOME"] = str(home)
        parent, rank_pids = start_ranks(N_GPUS)
        try:
            if args.nvml == "fake":
                setup_fake(home, rank_pids)
            engine = db.get_engine(home)
            add_live_job(engine, parent.pid)
            tick = measure_ticks(engine, args.ticks)
        finally:
            stop_ranks(parent)
        print(f"machine: {machine()}; NVML: {args.nvml}; python {platform.python_version()}")
        per_gpu = tick["cpu_ms_per_tick"] / max(1, tick["gpus"])
        print(
            f"sampler: {tick['ticks']} ticks, {tick['gpus']} GPUs, {tick['attributed']} processes attributed to the job\n"
            f"  CPU per sample          {tick['cpu_ms_per_tick']:.2f} ms  (probe alone {tick['probe_cpu_ms']:.2f} ms)\n"
            f"  CPU per sample per GPU  {per_gpu:.3f} ms\n"
            f"  wall per sample         {tick['wall_ms_per_tick']:.2f} ms\n"
            f"  one core at 1 Hz        {tick['cpu_ms_per_tick'] / 10:.2f} %  (target < 1 %)"
        )
        (home / "queries").mkdir()
        query_engine = db.get_engine(home / "queries")
        now = (time.time() // 60) * 60
        t0 = time.perf_counter()
        fill_history(query_engine, now)
        print(
            f"\nhistory: 8 GPUs x 7 days (filled in {time.perf_counter() - t0:.1f} s): {history.row_counts(query_engine)}"
        )
        print("| window | view | points/series | cold query ms | live re-query ms |")
        print("|---|---|---|---|---|")
        for row in measure_queries(query_engine, now):
            print(
                f"| {row['window']} | {row['view']} | {row['points']} | {row['cold_ms']:.1f} | {row['live_ms']:.1f} |"
            )
        db.dispose_engines()
    return 0


if __name__ == "__main__":
    sys.exit(main())
