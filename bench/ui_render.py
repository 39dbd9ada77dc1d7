"""Server time of one page rerun, measured with Streamlit's AppTest (the page script runs in this process).

Scenario (issue 5 §6):
- Monitor: 8 GPUs (fake NVML) with 24 h of history at the sampler's real resolution (raw 1 s samples for
  the last hour, per-minute rows before that), per-GPU and aggregated, for each window.
- Jobs: 200 jobs, the selected one running with a 100,000-step metric history.
- Explore (issue 15): a 16,384-latent SAE inspected by the real inspect job; each rerun opens another latent.

    .venv/bin/python -m bench.ui_render [--reruns 15]

Prints the median and p90 milliseconds per rerun. The wall time of `AppTest.run()` includes AppTest's
own overhead (script thread start, message parsing), so the figures are an upper bound of server time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import insert
from streamlit.testing.v1 import AppTest

from sae_core import db
from sae_core.config import TrainConfig
from sae_core.db.tables import GpuMinute, GpuSample, HostSample, MetricPoint
from sae_core.gpu import history
from sae_core.jobs import daemon_control, metrics, scheduler, store
from sae_core.jobs.placement import Submission
from tests.fakes import fake_pynvml as fake

REPO = Path(__file__).resolve().parent.parent

N_GPUS = 8
HISTORY_S = 24 * 3600
RAW_S = 3600
N_JOBS = 200
N_STEPS = 100_000
EXPLORE_LATENTS = 16384
EXPLORE_ROWS = 16384


def seed_history(engine, now: float) -> None:
    """24 h of samples as the sampler + compaction leave them: 1 s rows for the last hour, minutes before."""
    gib = 1024**3
    raw, minutes, host = [], [], []
    for s in range(RAW_S):
        t = now - RAW_S + s
        for g in range(N_GPUS):
            util = 50 + 45 * math.sin((t / 300) + g)
            raw.append(
                {
                    "t": t,
                    "gpu_index": g,
                    "util_gpu": util,
                    "util_mem": util / 2,
                    "mem_used": int((20 + g * 7) * gib),
                    "mem_total": 80 * gib,
                    "temperature": 40 + util / 3,
                    "power_w": 100 + 5 * util,
                    "power_limit_w": 700.0,
                }
            )
        host.append(
            {
                "t": t,
                "resolution": "raw",
                "cpu_percent": 30.0,
                "cpu_percent_max": 30.0,
                "ram_used": 100 * gib,
                "ram_total": 512 * gib,
            }
        )
    first_minute = math.floor((now - HISTORY_S) / 60) * 60
    for m in range((HISTORY_S - RAW_S) // 60):
        t = first_minute + 60 * m
        for g in range(N_GPUS):
            util = 50 + 45 * math.sin((t / 300) + g)
            minutes.append(
                {
                    "t": t,
                    "gpu_index": g,
                    "util_gpu_mean": util,
                    "util_gpu_max": min(100.0, util + 5),
                    "mem_used_mean": (20 + g * 7) * gib,
                    "mem_used_max": (21 + g * 7) * gib,
                    "mem_total": 80 * gib,
                    "temperature_mean": 40 + util / 3,
                    "temperature_max": 45 + util / 3,
                    "power_w_mean": 100 + 5 * util,
                    "power_w_max": 110 + 5 * util,
                }
            )
        host.append(
            {
                "t": t,
                "resolution": "minute",
                "cpu_percent": 30.0,
                "cpu_percent_max": 40.0,
                "ram_used": 100 * gib,
                "ram_total": 512 * gib,
            }
        )
    with db.write_session(engine) as session:
        session.execute(insert(GpuSample), raw)
        session.execute(insert(GpuMinute), minutes)
        session.execute(insert(HostSample), host)


def seed_jobs(engine, home: Path) -> int:
    """200 jobs in every status; the newest runs with a 100k-step metric history. Returns its id."""
    cfg = TrainConfig(activation_source=str(home / "datasets" / "x.safetensors"), d_sae=16384, total_steps=N_STEPS)
    statuses = ["completed", "failed", "cancelled", "queued"]
    for i in range(N_JOBS - 1):
        job = store.submit_job(
            cfg, Submission(str(i % N_GPUS), None, name=f"sweep-{i}", submitted_by="bench"), engine=engine
        )
        status = statuses[i % len(statuses)]
        if status != "queued":
            store.request_cancel(job.id, engine=engine) if status == "cancelled" else None
            if status != "cancelled":
                scheduler.claim_runnable(cpu_budget=64, engine=engine)
                store.finish_job(job.id, status, exit_code=0 if status == "completed" else 1, engine=engine)
    running = store.submit_job(cfg, Submission("0,1,2,3", None, name="big-run", submitted_by="bench"), engine=engine)
    scheduler.claim_runnable(cpu_budget=64, engine=engine)
    store.mark_running(running.id, os.getpid(), time.time(), engine=engine)
    t0 = time.time() - N_STEPS * 0.05
    rows = [
        {
            "job_id": running.id,
            "step": s,
            "tokens": s * 4096,
            "loss": 1 / s,
            "mse": 0.5 / s,
            "fvu": 0.3 + 1 / s,
            "l0": 64.0,
            "dead_fraction": 0.01,
            "lr": 1e-4,
            "tokens_per_s": 2e6,
            "aux_loss": None,
            "peak_mem_json": json.dumps([30 * 1024**3] * 4),
            "time": t0 + s * 0.05,
        }
        for s in range(1, N_STEPS + 1)
    ]
    with db.write_session(engine) as session:
        session.execute(insert(MetricPoint), rows)
    metrics.write_metric_points(
        running.id, [metrics.metric_point_from_record(running.id, {"step": N_STEPS, "tokens": 0})], engine=engine
    )
    return running.id


def seed_inspection(home: Path, d_sae: int = EXPLORE_LATENTS) -> Path:
    """A 16k-latent TopK SAE inspected by the real inspect job over a synthetic extraction (random rows in
    contexts, the real folder layout): the files the Explore page reads, at the width it must handle."""
    from bench.inspect_throughput import random_sae_folder, synthetic_extraction
    from sae_core.model.inspect import main as inspect_main

    acts = synthetic_extraction(home / "datasets" / "synthetic", EXPLORE_ROWS, 64)
    sae = random_sae_folder(home / "jobs" / "900", acts, 64, d_sae, 32)
    request = home / "inspect.json"
    request.write_text(json.dumps({"sae": str(sae), "tokens": EXPLORE_ROWS, "device": "cpu"}))
    assert inspect_main(["--config", str(request), "--out", str(home / "inspect-job")]) == 0
    return sae


def time_reruns(at, reruns: int, before_each=None) -> list[float]:
    """Milliseconds of each of `reruns` reruns after a first run (imports, caches); `before_each(i)` changes
    the page's input before rerun i (untimed), e.g. opening another latent."""
    at.run()
    times = []
    for i in range(reruns):
        if before_each is not None:
            before_each(i)
        start = time.perf_counter()
        at.run()
        times.append((time.perf_counter() - start) * 1000)
        if at.exception:
            raise RuntimeError(at.exception[0].value)
    return times


def report(label: str, times: list[float]) -> dict:
    times = sorted(times)
    row = {"case": label, "median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))]}
    print(f"{label:<44} median {row['median_ms']:6.1f} ms   p90 {row['p90_ms']:6.1f} ms")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reruns", type=int, default=15)
    args = parser.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="sae_lab_bench_ui_"))
    os.environ["SAE_LAB_HOME"] = str(home)
    os.environ["SAE_LAB_NVML_MODULE"] = "tests.fakes.fake_pynvml"
    # The daemon boundary: report a healthy launcher without starting one.
    now = time.time()
    daemon_control.ensure_daemon = lambda home=None, **kw: True
    daemon_control.daemon_status = lambda home=None, now=None: daemon_control.DaemonStatus(
        True, True, 1, time.time(), time.time(), "bench", "x"
    )
    fake.set_scenario(fake.scenario(n_gpus=N_GPUS, util_gpu=80, memory_used=40 * fake.GiB))
    engine = db.get_engine()
    t0 = time.perf_counter()
    seed_history(engine, now)
    history.Sampler(engine).tick()  # the snapshot the cards read
    job_id = seed_jobs(engine, home)
    print(
        f"seeded in {time.perf_counter() - t0:.1f} s: {history.row_counts(engine)}; {N_JOBS} jobs, job {job_id} "
        f"with {N_STEPS:,} metric rows; {os.cpu_count()} CPUs\n"
    )

    app = str(REPO / "app.py")
    rows = []
    for aggregate in (False, True):
        for window in ("5m", "1h", "24h", "7d"):
            at = AppTest.from_file(app, default_timeout=60)
            at.session_state["monitor_window"] = window
            at.session_state["monitor_aggregate"] = aggregate
            at.switch_page("views/monitor.py")
            view = "aggregated" if aggregate else "per-GPU"
            rows.append(report(f"Monitor, 8 GPUs, {view}, window {window}", time_reruns(at, args.reruns)))
    at = AppTest.from_file(app, default_timeout=60)
    at.query_params["job"] = str(job_id)
    at.switch_page("views/jobs.py")
    rows.append(report(f"Jobs, {N_JOBS} jobs, running job with {N_STEPS // 1000}k steps", time_reruns(at, args.reruns)))
    seed_inspection(home)
    at = AppTest.from_file(app, default_timeout=60)
    at.query_params["sae"] = "jobs/900"
    at.switch_page("views/explore.py")

    def open_another_latent(i: int) -> None:
        at.number_input(key="explore_latent").set_value((7919 * (i + 1)) % EXPLORE_LATENTS)

    times = time_reruns(at, args.reruns, open_another_latent)
    rows.append(report(f"Explore, {EXPLORE_LATENTS:,} latents, open a latent", times))
    db.dispose_engines()
    shutil.rmtree(home, ignore_errors=True)
    worst = max(r["median_ms"] for r in rows)
    print(f"\nworst median: {worst:.1f} ms (budget 200 ms)")
    return 0 if worst <= 200 else 1


if __name__ == "__main__":
    sys.exit(main())
