"""availability: busy GPUs (foreign processes), GPUs a new job queues behind (SAE Lab jobs), recommendation
with topology, every validation error."""

from __future__ import annotations

import getpass
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sae_core import db
from sae_core.config import TrainConfig
from sae_core.db.tables import Job
from sae_core.gpu import availability, history, memory, nvml
from sae_core.gpu.processes import JobIndex
from sae_core.jobs import gpus as jobs_gpus
from tests.conftest import subprocess_env
from tests.fakes import fake_pynvml as fake
from tests.fakes.fixtures import fake_gpus  # noqa: F401  (fixture)

GiB = fake.GiB
MiB = fake.MiB
D_IN = 32  # the toy set of conftest


@pytest.fixture
def engine(lab_home):
    return db.get_engine()


def add_job(engine, gpu_ids: str, status: str = "running", name: str = "sweep-a") -> int:
    with db.write_session(engine) as session:
        job = Job(name=name, config_json="{}", gpu_ids=gpu_ids, status=status, created_at=time.time())
        session.add(job)
        session.flush()
        return job.id


def statuses(engine, fake_gpus, scn: dict) -> list[availability.GpuStatus]:  # noqa: F811
    fake_gpus.set(scn)
    return jobs_gpus.gpu_statuses(engine, snapshot=nvml.probe(jobs_gpus.job_index(engine)))


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "notebook-kernel"], env=subprocess_env()
    )
    yield proc
    proc.kill()
    proc.wait()


# --------------------------------------------------------------------------- busy
@pytest.mark.parametrize(
    "status, held",
    [
        ("queued", True),
        ("starting", True),
        ("running", True),
        ("completed", False),
        ("failed", False),
        ("cancelled", False),
    ],
)
def test_a_live_job_holds_its_gpus_and_a_new_job_queues_behind_it(engine, fake_gpus, status, held):  # noqa: F811
    job_id = add_job(engine, "1,3", status=status)
    result = statuses(engine, fake_gpus, fake.scenario(4))
    assert [s.busy for s in result] == [False] * 4  # SAE Lab jobs never make a GPU busy
    assert [s.idle for s in result] == [True, not held, True, not held]
    assert all(s.available for s in result)
    if held:
        assert result[3].queue_note == f"queued behind SAE Lab job {job_id} 'sweep-a' ({status})"
        assert result[3].job_ids == [job_id] and result[3].reason is None


def test_foreign_processes_above_the_threshold_make_a_gpu_busy(engine, fake_gpus, sleeper):  # noqa: F811
    scn = fake.scenario(
        3,
        overrides={
            0: {"processes": [fake.process(sleeper.pid, 2 * GiB)]},  # a real workload
            1: {"processes": [fake.process(sleeper.pid, 300 * MiB, kind="graphics")]},  # a desktop's Xorg
        },
    )
    busy, desktop, idle = statuses(engine, fake_gpus, scn)
    assert busy.busy and busy.foreign_bytes == 2 * GiB
    program = Path(sys.executable).name
    assert (
        f"pid {sleeper.pid} ({getpass.getuser()}: {program} -c import time; time.sleep(60) notebook-kernel"
        in busy.reason
    )
    assert "2.0 GiB" in busy.reason
    assert not desktop.busy and desktop.foreign_bytes == 300 * MiB and desktop.available
    assert not idle.busy and idle.reason is None


def test_the_threshold_is_ten_percent_on_small_gpus():
    assert availability.foreign_threshold(80 * GiB) == availability.FOREIGN_BUSY_BYTES
    assert availability.foreign_threshold(8 * GiB) == int(0.8 * GiB)


def test_a_small_gpu_is_busy_below_one_gib(engine, fake_gpus):  # noqa: F811
    scn = fake.scenario(1, memory_total=8 * GiB, overrides={0: {"processes": [fake.process(4242, 900 * MiB)]}})
    (status,) = statuses(engine, fake_gpus, scn)
    assert status.busy and "pid 4242 (user unknown: command unknown" in status.reason


def test_unlisted_processes_count_by_memory_in_use(engine, fake_gpus):  # noqa: F811
    scn = fake.scenario(2, memory_used=5 * GiB, not_supported=["processes"])
    add_job(engine, "1")
    free_of_ours, ours = statuses(engine, fake_gpus, scn)
    assert free_of_ours.busy and "5.0 GiB in use by processes NVML cannot list" in free_of_ours.reason
    assert not ours.busy and ours.reason is None and ours.queue_note  # our own job explains that memory


def test_a_process_of_our_job_is_not_foreign_and_its_memory_counts_as_free(fake_gpus, sleeper):  # noqa: F811
    fake_gpus.set(fake.scenario(1, overrides={0: {"processes": [fake.process(sleeper.pid, 30 * GiB)]}}))
    probe = nvml.probe(JobIndex({7: (sleeper.pid, psutil.Process(sleeper.pid).create_time())}))  # job 7's leader
    assert probe.gpus[0].processes[0].job_id == 7
    (status,) = availability.statuses_from(probe, {})
    assert not status.busy and status.foreign_bytes == 0
    assert status.memory_free == 80 * GiB  # freed before a job queued behind job 7 starts


def test_lost_and_mig_gpus_cannot_be_selected(engine, fake_gpus):  # noqa: F811
    scn = fake.scenario(
        3, overrides={1: {"lost": "GpuIsLost"}, 2: {"mig_mode": 1, "mig_devices": [fake.mig_device(0)]}}
    )
    ok, lost, mig = statuses(engine, fake_gpus, scn)
    assert ok.available
    assert not lost.available and lost.reason.startswith("unavailable: GPU 1 is not responding")
    assert not mig.available and "MIG mode is on" in mig.reason


def test_statuses_use_a_fresh_snapshot_else_a_live_probe(engine, fake_gpus):  # noqa: F811
    fake_gpus.set(fake.scenario(2, util_gpu=10))
    old = nvml.probe()
    old.t = time.time() - 60
    history.write_probe(engine, old)
    fake_gpus.set(fake.scenario(3, util_gpu=20))
    assert [s.util_gpu for s in jobs_gpus.gpu_statuses(engine)] == [20, 20, 20]  # stale: probed live
    fresh = nvml.probe()
    fresh.gpus[0].util_gpu = 99.0
    history.write_probe(engine, fresh)
    assert jobs_gpus.gpu_statuses(engine)[0].util_gpu == 99.0  # the sampler's view


# --------------------------------------------------------------------------- recommend
def status(index: int, free: int, busy: bool = False, links=None) -> availability.GpuStatus:
    return availability.GpuStatus(
        index=index,
        name="GPU",
        uuid=f"GPU-{index}",
        memory_total=80 * GiB,
        memory_used=80 * GiB - free,
        memory_free=free,
        util_gpu=0.0,
        busy=busy,
        reason="used by pid 1 (ana: python, 70.0 GiB)" if busy else None,
        links=links,
    )


def test_recommend_picks_free_gpus_with_room_most_free_memory_first():
    pool = [
        status(0, 10 * GiB),
        status(1, 70 * GiB),
        status(2, 79 * GiB, busy=True),
        status(3, 40 * GiB),
        status(4, 60 * GiB),
    ]
    assert availability.recommend(20 * GiB, 1, pool) == [1]
    assert availability.recommend(20 * GiB, 3, pool) == [1, 4, 3]
    assert availability.recommend(50 * GiB, 3, pool) == [1, 4]  # only two fit: fewer come back
    assert availability.recommend(75 * GiB, 1, pool) == []  # the only GPU with room is busy
    assert availability.recommend(GiB, 0, pool) == []


def test_recommend_prefers_gpus_that_share_the_closest_link(engine, fake_gpus):  # noqa: F811
    # GPU 0 has the most free memory, but its switch partner 1 is busy; 6 and 7 share a switch.
    used = {0: 0, 1: 0, 2: 30 * GiB, 3: 35 * GiB, 4: 20 * GiB, 5: 25 * GiB, 6: 5 * GiB, 7: 6 * GiB}
    scn = fake.scenario(8, topology="dgx", overrides={i: {"memory_used": u} for i, u in used.items()})
    add_job(engine, "1")
    pool = statuses(engine, fake_gpus, scn)
    assert availability.recommend(GiB, 1, pool) == [0]  # one GPU: simply the most free memory
    assert availability.recommend(GiB, 2, pool) == [6, 7]  # a pair behind one PCIe switch
    assert availability.recommend(GiB, 3, pool) == [6, 7, 4]  # no three share a switch: one socket, most memory
    assert sorted(availability.recommend(GiB, 4, pool)) == [4, 5, 6, 7]  # a whole socket beats the best memory
    no_topology = statuses(
        engine, fake_gpus, fake.scenario(8, overrides={i: {"memory_used": u} for i, u in used.items()})
    )
    assert availability.recommend(GiB, 2, no_topology) == [0, 6]  # without topology: free memory only


# --------------------------------------------------------------------------- validate
@pytest.fixture
def cfg(toy_path) -> TrainConfig:
    return TrainConfig(activation_source=str(toy_path), d_sae=256, batch_size=1024, total_steps=10)


def test_a_good_selection_has_no_errors(engine, fake_gpus, cfg):  # noqa: F811
    pool = statuses(engine, fake_gpus, fake.scenario(4))
    assert availability.validate([0, 2], cfg, pool, D_IN) == []


def test_an_empty_selection(engine, fake_gpus, cfg):  # noqa: F811
    pool = statuses(engine, fake_gpus, fake.scenario(2))
    assert availability.validate([], cfg, pool, D_IN) == ["select at least one GPU (or run the job on CPU processes)"]


def test_a_gpu_that_does_not_exist(engine, fake_gpus, cfg):  # noqa: F811
    pool = statuses(engine, fake_gpus, fake.scenario(2))
    assert availability.validate([0, 5], cfg, pool, D_IN) == ["GPU 5 does not exist (this machine has GPU 0, 1)"]
    assert availability.validate([0], cfg, [], D_IN) == ["GPU 0 does not exist: no GPU was detected on this machine"]


def test_a_gpu_selected_twice(engine, fake_gpus, cfg):  # noqa: F811
    pool = statuses(engine, fake_gpus, fake.scenario(2))
    assert availability.validate([1, 1], cfg, pool, D_IN) == ["GPU 1 is selected more than once"]


def test_a_gpu_held_by_a_job_is_no_error_the_new_job_queues_behind_it(engine, fake_gpus, cfg):  # noqa: F811
    job_id = add_job(engine, "1", name="l12-topk")
    pool = statuses(engine, fake_gpus, fake.scenario(2))
    assert availability.validate([0, 1], cfg, pool, D_IN) == []
    assert pool[1].queue_note == f"queued behind SAE Lab job {job_id} 'l12-topk' (running)"


def test_a_busy_gpu_names_the_foreign_process(engine, fake_gpus, cfg, sleeper):  # noqa: F811
    pool = statuses(
        engine, fake_gpus, fake.scenario(1, overrides={0: {"processes": [fake.process(sleeper.pid, 6 * GiB)]}})
    )
    (error,) = availability.validate([0], cfg, pool, D_IN)
    assert error.startswith(f"GPU 0 is busy: used by pid {sleeper.pid} ({getpass.getuser()}: ")


def test_a_lost_gpu(engine, fake_gpus, cfg):  # noqa: F811
    pool = statuses(engine, fake_gpus, fake.scenario(2, overrides={1: {"lost": "Unknown"}}))
    (error,) = availability.validate([1], cfg, pool, D_IN)
    assert error.startswith("GPU 1 is not usable: unavailable: GPU 1 is not responding")


def test_not_enough_memory_names_the_estimate_and_the_free_memory(engine, fake_gpus, cfg):  # noqa: F811
    need = memory.estimate(cfg, 2, D_IN).total_bytes
    almost = need - 64 * MiB
    pool = statuses(engine, fake_gpus, fake.scenario(2, overrides={1: {"memory_used": 80 * GiB - almost}}))
    (error,) = availability.validate([0, 1], cfg, pool, D_IN)
    assert error == (
        f"GPU 1 has {almost / GiB:.1f} GiB free but the run needs about {need / GiB:.1f} GiB per GPU "
        "(estimate for 2 GPU(s)); pick a GPU with more free memory, more GPUs, or a smaller batch"
    )


def test_a_batch_that_does_not_divide_by_the_gpu_count(engine, fake_gpus, cfg):  # noqa: F811
    pool = statuses(engine, fake_gpus, fake.scenario(3))
    (error,) = availability.validate([0, 1, 2], cfg, pool, D_IN)
    assert error.startswith("batch_size 1024 does not divide evenly across 3 GPUs")


def test_without_the_data_width_the_memory_fit_is_not_judged(engine, fake_gpus, cfg):  # noqa: F811
    pool = statuses(engine, fake_gpus, fake.scenario(1, memory_used=80 * GiB - MiB))
    assert availability.validate([0], cfg, pool, None) == []  # the gate reports the unreadable data instead
    (error,) = availability.validate([0], cfg, pool, D_IN)
    assert error.startswith("GPU 0 has 0.0 GiB free but the run needs about")


def test_several_problems_are_all_reported(engine, fake_gpus, cfg):  # noqa: F811
    pool = statuses(engine, fake_gpus, fake.scenario(2, overrides={0: {"processes": [fake.process(4242, 9 * GiB)]}}))
    assert availability.validate([0, 0, 7], cfg, pool, D_IN) == [
        "GPU 0 is selected more than once",
        "GPU 0 is busy: used by pid 4242 (user unknown: command unknown, 9.0 GiB)",
        "GPU 7 does not exist (this machine has GPU 0, 1)",
    ]
