"""Reservation atomicity across real processes sharing one lab.db (no torch: fast)."""

from __future__ import annotations

from collections import defaultdict

import pytest

from sae_core.config import TrainConfig
from sae_core.db.tables import Job
from sae_core.jobs import store
from sae_core.jobs.placement import Submission
from tests.conftest import racing_scripts, subprocess_env

# Each process submits its share of jobs and, like a (rogue) second launcher, claims and finishes
# whatever it can. Only claim_runnable's single BEGIN IMMEDIATE transaction keeps GPUs exclusive.
WORKER = r"""
import json, random, sys, time
from sae_core.config import TrainConfig
from sae_core.jobs import scheduler, store
from sae_core.jobs.placement import Submission
me, n_submit = int(sys.argv[1]), int(sys.argv[2])
cfg = TrainConfig(activation_source="/x.safetensors", d_sae=64, k=8, batch_size=256, total_steps=2)
rng = random.Random(me)
claimed = []
for i in range(n_submit):
    store.submit_job(cfg, Submission(rng.choice(["0", "1", "0,1"]), None, name=f"p{me}-{i}"))
idle_since = time.time()
while time.time() - idle_since < 1.0:
    jobs = scheduler.claim_runnable(cpu_budget=2)
    if jobs:
        idle_since = time.time()
    for job in jobs:
        claimed.append(job.id)
        time.sleep(0.005)
        store.finish_job(job.id, "completed", exit_code=0)
print(json.dumps(claimed))
"""


def held_intervals_overlap(jobs) -> list[tuple[int, int, int]]:
    """(gpu, job a, job b) for every pair of jobs that held the same GPU at the same time."""
    by_gpu = defaultdict(list)
    for job in jobs:
        for gpu in job.gpu_list:
            by_gpu[gpu].append(job)
    clashes = []
    for gpu, held in by_gpu.items():
        held.sort(key=lambda j: j.started_at)
        for a, b in zip(held, held[1:], strict=False):
            if b.started_at < a.finished_at:
                clashes.append((gpu, a.id, b.id))
    return clashes


def test_overlap_check_detects_a_double_booking():
    a = Job(id=1, gpu_ids="0", config_json="{}", created_at=0, started_at=0.0, finished_at=5.0)
    b = Job(id=2, gpu_ids="0,1", config_json="{}", created_at=0, started_at=4.0, finished_at=6.0)
    c = Job(id=3, gpu_ids="1", config_json="{}", created_at=0, started_at=6.0, finished_at=7.0)
    assert held_intervals_overlap([a, b, c]) == [(0, 1, 2)]


@pytest.mark.slow
def test_racing_processes_claim_each_job_once_and_never_share_a_gpu(lab_home):
    store.submit_job(
        TrainConfig(activation_source="/x", d_sae=64, k=8, batch_size=256, total_steps=2), Submission("0", None)
    )
    env = subprocess_env(SAE_LAB_HOME=str(lab_home))
    claimed = racing_scripts(WORKER, [[str(n), "5"] for n in range(4)], env)
    jobs = store.list_jobs()
    assert len(jobs) == 21
    assert sorted(claimed) == sorted(j.id for j in jobs)  # every job claimed exactly once
    assert {j.status for j in jobs} == {"completed"}
    assert held_intervals_overlap(jobs) == []
