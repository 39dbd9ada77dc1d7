"""Launcher latencies: metrics-sink write() cost (free and write-locked database), the queue claim,
and a real job's lifecycle through the daemon (submit -> running, kill -9 of a rank -> failed,
cancel -> cancelled). CPU only; prints a markdown table.

    python -m bench.launcher_latency [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sae_core import db
from sae_core.config import TrainConfig
from sae_core.data.toy import write_toy
from sae_core.jobs import metrics, processes, scheduler, store
from sae_core.jobs.placement import Submission


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def sink_latency(home: Path, locked: bool) -> dict:
    cfg = TrainConfig(activation_source="/x", d_sae=64, k=8, batch_size=256, total_steps=10)
    job = store.submit_job(cfg, Submission(None, 1))
    sink = metrics.SqliteMetricsSink(job.id, flush_interval_s=0.05, close_timeout_s=30)
    holder = None
    if locked:  # another connection holds the write lock for 2 s
        holder = sqlite3.connect(home / "lab.db", isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")
        threading.Timer(2.0, lambda: (holder.execute("COMMIT"), holder.close())).start()
    record = dict(step=0, tokens=0, loss=1.0, mse=0.5, fvu=0.1, l0=8.0, dead_fraction=0.0, lr=1e-3,
                  tokens_per_s=1e5, aux_loss=None, peak_mem=[1, 2], time=time.time(), total_steps=10)  # fmt: skip
    costs = []
    for step in range(1, 2001):
        record["step"] = step
        started = time.perf_counter()
        sink.write(record)
        costs.append(time.perf_counter() - started)
        if step % 100 == 0:
            time.sleep(0.1)  # training between log steps
    sink.close()
    assert metrics.metric_count(job.id) == 2000
    return {"p50_us": percentile(costs, 0.5) * 1e6, "p99_us": percentile(costs, 0.99) * 1e6,
            "max_ms": max(costs) * 1e3, "flushes": sink.flushes}  # fmt: skip


def claim_latency() -> float:
    cfg = TrainConfig(activation_source="/x", d_sae=64, k=8, batch_size=256, total_steps=10)
    for i in range(100):
        store.submit_job(cfg, Submission(str(i % 8), None))
    started = time.perf_counter()
    scheduler.claim_runnable(cpu_budget=2)
    return (time.perf_counter() - started) * 1e3


def wait(predicate, timeout: float = 180.0, poll: float = 0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError


def lifecycle(home: Path, repeats: int) -> dict[str, list[float]]:
    toy = home / "toy.safetensors"
    write_toy(toy, tokens=16384, d_in=32, features=64, seed=0)
    cfg = TrainConfig(activation_source=str(toy), d_sae=64, k=4, batch_size=256, total_steps=1_000_000,
                      log_every=20, checkpoint_every=1_000_000, holdout_tokens=1024, device="cpu")  # fmt: skip
    env = dict(os.environ, SAE_LAB_HOME=str(home), OMP_NUM_THREADS="1")
    daemon = subprocess.Popen([sys.executable, "-m", "sae_core", "serve", "--sample-interval", "0"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    results: dict[str, list[float]] = {"submit -> running (s)": [], "submit -> first metrics (s)": [],
                                       "kill -9 rank 1 -> failed (s)": [], "cancel -> cancelled (s)": []}  # fmt: skip
    try:
        for i in range(2 * repeats):
            submitted = time.time()
            job = store.submit_job(cfg, Submission(None, 2))
            running = wait(lambda job=job: store.get_job(job.id).status == "running" and store.get_job(job.id))
            results["submit -> running (s)"].append(running.started_at - submitted)
            wait(lambda job=job: store.get_job(job.id).last_step > 0)
            results["submit -> first metrics (s)"].append(time.time() - submitted)
            if i % 2 == 0:
                ranks = [p for p in processes.job_processes(running, home) if p.environ().get("LOCAL_RANK") == "1"]
                ranks[0].send_signal(signal.SIGKILL)
                killed = time.time()
                done = wait(lambda job=job: store.get_job(job.id).finished_at and store.get_job(job.id))
                assert done.status == "failed", done.status
                results["kill -9 rank 1 -> failed (s)"].append(done.finished_at - killed)
            else:
                asked = time.time()
                store.request_cancel(job.id)
                done = wait(lambda job=job: store.get_job(job.id).finished_at and store.get_job(job.id))
                assert done.status == "cancelled", done.status
                results["cancel -> cancelled (s)"].append(done.finished_at - asked)
            assert processes.job_processes(done, home) == []
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["SAE_LAB_HOME"] = str(home)
        free = sink_latency(home, locked=False)
        locked = sink_latency(home, locked=True)
        claim_ms = claim_latency()
        db.dispose_engines()
        life_home = home / "life"
        life_home.mkdir()
        os.environ["SAE_LAB_HOME"] = str(life_home)
        life = lifecycle(life_home, args.repeats)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print("\n| sink write() | p50 | p99 | max | flushes for 2000 records |\n|---|---|---|---|---|")
    for name, r in (("database free", free), ("write-locked 2 s by another connection", locked)):
        print(f"| {name} | {r['p50_us']:.1f} µs | {r['p99_us']:.1f} µs | {r['max_ms']:.2f} ms | {r['flushes']} |")
    print(f"\nclaim_runnable with 100 queued jobs on 8 GPUs: {claim_ms:.1f} ms (one BEGIN IMMEDIATE transaction)")
    print("\n| 2-rank gloo job through the daemon | median | min | max |\n|---|---|---|---|")
    for name, values in life.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    print(json.dumps({"sink_free": free, "sink_locked": locked, "claim_ms": claim_ms, "lifecycle": life}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
