"""gpu.nvml against the fake NVML: the real probing code, NVML replaced by scenarios."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
import time

import psutil
import pytest

from sae_core import db
from sae_core.cli import gpus as cli_gpus
from sae_core.db.tables import Job
from sae_core.gpu import nvml
from sae_core.gpu import types as gpu_types
from sae_core.jobs import gpus as jobs_gpus
from tests.conftest import subprocess_env
from tests.fakes import fake_pynvml as fake
from tests.fakes.fixtures import fake_gpus  # noqa: F401  (fixture)

GiB = fake.GiB


def test_probe_reads_every_figure_of_each_gpu(fake_gpus):  # noqa: F811
    fake_gpus.set(
        n_gpus=8,
        overrides={
            3: {
                "util_gpu": 87,
                "util_mem": 41,
                "temperature": 71,
                "power_w": 512.5,
                "power_limit_w": 650.0,
                "memory_used": 20 * GiB,
                "clock_sm": 1980,
                "clock_mem": 2619,
                "pcie_gen": 4,
                "pcie_width": 8,
                "ecc_uncorrected": 2,
                "fan": 55,
                "not_supported": [],
            }
        },
    )
    result = nvml.probe()
    assert result.reason is None and result.driver_version == "550.54.15"
    assert [g.index for g in result.gpus] == list(range(8))
    assert len({g.uuid for g in result.gpus}) == 8
    g = result.gpus[3]
    assert g.name == "NVIDIA H100 80GB HBM3"
    assert g.pci_bus_id == "00000000:48:00.0"  # bytes from NVML decoded
    assert (g.memory_total, g.memory_used, g.memory_free) == (80 * GiB, 20 * GiB, 60 * GiB)
    assert (g.util_gpu, g.util_mem, g.temperature) == (87.0, 41.0, 71.0)
    assert g.power_w == pytest.approx(512.5) and g.power_limit_w == pytest.approx(650.0)  # mW -> W
    assert (g.clock_sm, g.clock_mem, g.pcie_gen, g.pcie_width, g.ecc_uncorrected, g.fan) == (1980, 2619, 4, 8, 2, 55.0)
    assert g.error is None and g.mig_enabled is False and g.processes == []
    assert result.host.ram_total > 0 and result.host.cpu_count >= 1


def test_not_supported_fields_become_none_and_print_as_na(fake_gpus):  # noqa: F811
    missing = ["fan", "power_w", "power_limit_w", "temperature", "util", "ecc_uncorrected", "pcie_gen", "clock_sm"]
    fake_gpus.set(n_gpus=2, overrides={1: {"not_supported": missing}})
    result = nvml.probe()
    full, partial = result.gpus
    assert full.temperature is not None and full.util_gpu is not None
    for name in ("fan", "power_w", "power_limit_w", "temperature", "util_gpu", "util_mem", "ecc_uncorrected"):
        assert getattr(partial, name) is None, name
    assert partial.pcie_gen is None and partial.clock_sm is None
    assert partial.memory_total == 80 * GiB and partial.error is None  # the rest is still read
    line = next(line for line in cli_gpus.format_probe(result).splitlines() if line.startswith("GPU 1"))
    assert "util n/a" in line and "fan n/a" in line and "n/a/n/a W" in line


@pytest.mark.parametrize("how", ["GpuIsLost", "Unknown"])
def test_a_lost_gpu_is_an_error_entry_and_the_others_are_listed(fake_gpus, how):  # noqa: F811
    fake_gpus.set(n_gpus=4, overrides={2: {"lost": how}})
    result = nvml.probe()
    assert [g.index for g in result.gpus] == [0, 1, 2, 3]
    lost = result.gpus[2]
    assert lost.error and "GPU 2 is not responding" in lost.error
    assert lost.memory_total is None
    assert all(g.error is None and g.memory_total == 80 * GiB for g in result.gpus if g.index != 2)
    assert "GPU 2: ERROR" in cli_gpus.format_probe(result)


@pytest.mark.parametrize(
    "error, words",
    [("LibraryNotFound", "no NVIDIA driver found"), ("DriverNotLoaded", "not loaded"), ("NoPermission", "permission")],
)
def test_no_driver_gives_no_gpus_and_a_reason(fake_gpus, error, words):  # noqa: F811
    fake_gpus.set(fake.scenario(0, init_error=error))
    result = nvml.probe()
    assert result.gpus == [] and words in result.reason
    assert result.host.ram_total > 0  # the host is still described
    assert f"no GPUs: {result.reason}" in cli_gpus.format_probe(result)


def test_a_missing_nvml_module_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setenv(nvml.NVML_MODULE_ENV, "no_such_nvml_module")
    nvml.reset()
    try:
        result = nvml.probe()
    finally:
        nvml.reset()
    assert result.gpus == [] and "no_such_nvml_module" in result.reason


def test_nvml_is_initialised_once_per_process(fake_gpus):  # noqa: F811
    fake_gpus.set(n_gpus=2)
    for _ in range(5):
        nvml.probe()
    assert fake.init_calls() == 1
    fake_gpus.set(fake.no_driver())
    for _ in range(3):
        assert nvml.probe().reason  # a failed init is remembered, not retried every sample
    assert fake.init_calls() == 1


def test_mig_instances_are_listed(fake_gpus):  # noqa: F811
    migs = [fake.mig_device(0, parent=1, memory_used=3 * GiB), fake.mig_device(1, parent=1)]
    fake_gpus.set(n_gpus=3, overrides={1: {"mig_mode": 1, "mig_devices": migs}, 2: {"mig_mode": None}})
    result = nvml.probe()
    plain, mig, not_capable = result.gpus
    assert plain.mig_enabled is False and plain.mig_devices == []
    assert not_capable.mig_enabled is None  # the GPU cannot do MIG: NVML says NotSupported
    assert mig.mig_enabled is True and mig.util_gpu is None  # NVML has no utilization in MIG mode
    assert [(m.index, m.uuid, m.memory_used, m.memory_total) for m in mig.mig_devices] == [
        (0, migs[0]["uuid"], 3 * GiB, 10 * GiB),
        (1, migs[1]["uuid"], 0, 10 * GiB),
    ]
    assert "[MIG]" in cli_gpus.format_probe(result)


@pytest.fixture
def sleeper():
    """A real process to stand on a fake GPU."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)  # sae-lab-foreign-marker"], env=subprocess_env()
    )
    yield proc
    proc.kill()
    proc.wait()


def test_foreign_processes_get_their_user_and_command(fake_gpus, sleeper):  # noqa: F811
    gone_pid = 2**22 + 12345  # above the default pid_max: no such process
    procs = [fake.process(sleeper.pid, 3 * GiB), fake.process(gone_pid, GiB, kind="graphics")]
    fake_gpus.set(n_gpus=1, overrides={0: {"processes": procs}})
    (g,) = nvml.probe().gpus
    by_pid = {p.pid: p for p in g.processes}
    mine = by_pid[sleeper.pid]
    assert mine.gpu_memory == 3 * GiB and mine.kind == "compute" and mine.job_id is None
    assert mine.user == getpass.getuser()
    assert "sae-lab-foreign-marker" in mine.command
    gone = by_pid[gone_pid]
    assert gone.user is None and gone.command is None and gone.kind == "graphics"
    assert g.memory_used == 4 * GiB  # the fake derives used memory from its processes


def test_a_process_listed_as_compute_and_graphics_appears_once(fake_gpus, sleeper):  # noqa: F811
    procs = [fake.process(sleeper.pid, 2 * GiB), fake.process(sleeper.pid, None, kind="graphics")]
    fake_gpus.set(n_gpus=1, overrides={0: {"processes": procs}})
    (g,) = nvml.probe().gpus
    assert [(p.pid, p.gpu_memory) for p in g.processes] == [(sleeper.pid, 2 * GiB)]


def test_processes_nvml_cannot_list_are_none(fake_gpus):  # noqa: F811
    fake_gpus.set(n_gpus=1, overrides={0: {"not_supported": ["processes"]}})
    assert nvml.probe().gpus[0].processes is None


# --------------------------------------------------------------------------- job attribution
TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def rank_tree():
    """A 'torchrun' process with one 'rank' child: (parent Popen, child pid)."""
    parent = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    child_pid = int(parent.stdout.readline())
    yield parent, child_pid
    for proc in psutil.Process(parent.pid).children(recursive=True):
        proc.kill()
    parent.kill()
    parent.wait()


def _add_job(engine, status: str, pid: int, started: float | None) -> int:
    with db.write_session(engine) as session:
        job = Job(name="sweep-a", config_json="{}", gpu_ids="0", status=status, pid=pid, pid_start_time=started)
        job.created_at = time.time()
        session.add(job)
        session.flush()
        return job.id


@pytest.mark.slow
def test_a_rank_is_attributed_to_the_live_job_of_its_parent(lab_home, fake_gpus, rank_tree):  # noqa: F811
    parent, child_pid = rank_tree
    engine = db.get_engine()
    started = psutil.Process(parent.pid).create_time()
    stale = _add_job(engine, "completed", parent.pid, started)  # finished jobs hold nothing
    reused = _add_job(engine, "running", parent.pid, started - 100.0)  # same pid, another process
    unverified = _add_job(engine, "running", parent.pid, None)  # no start time: never trust a pid alone
    fake_gpus.set(n_gpus=1, overrides={0: {"processes": [fake.process(child_pid, 5 * GiB)]}})

    (g,) = nvml.probe(jobs_gpus.job_index(engine)).gpus
    assert g.processes[0].job_id is None  # none of those jobs may claim it

    live = _add_job(engine, "running", parent.pid, started + 0.4)  # within the 1 s tolerance
    (g,) = nvml.probe(jobs_gpus.job_index(engine)).gpus
    assert g.processes[0].job_id == live not in (stale, reused, unverified)
    assert "[SAE Lab job" in cli_gpus.format_probe(nvml.probe(jobs_gpus.job_index(engine)))


# --------------------------------------------------------------------------- ordering, topology, CLI
def test_cuda_visible_devices_names_gpus_by_uuid_in_the_given_order(fake_gpus):  # noqa: F811
    fake_gpus.set(n_gpus=4)
    result = nvml.probe()
    value = nvml.cuda_visible_devices([3, 1], result)
    assert value == f"{result.gpus[3].uuid},{result.gpus[1].uuid}"
    assert nvml.nvml_index_of_uuid(result.gpus[3].uuid.upper(), result) == 3
    assert nvml.nvml_index_of_uuid("GPU-unknown", result) is None


def test_cuda_visible_devices_falls_back_to_indices(fake_gpus):  # noqa: F811
    fake_gpus.set(n_gpus=2, overrides={1: {"not_supported": ["uuid"]}})
    assert nvml.cuda_visible_devices([0, 1], nvml.probe()) == "0,1"
    fake_gpus.set(fake.no_driver())
    assert nvml.cuda_visible_devices([1], nvml.probe()) == "1"


def test_topology_is_read_once_and_reported_per_pair(fake_gpus):  # noqa: F811
    fake_gpus.set(n_gpus=8, topology="dgx")
    topology = nvml.probe().topology
    assert topology[0][1] == fake.TOPO_SINGLE and topology[0][2] == fake.TOPO_NODE
    assert topology[0][7] == fake.TOPO_SYSTEM and topology[5][5] == 0
    fake_gpus.set(n_gpus=2)  # no topology in the scenario: NVML NotSupported
    assert nvml.probe().topology is None


def test_probe_survives_json(fake_gpus, sleeper):  # noqa: F811
    migs = [fake.mig_device(0)]
    fake_gpus.set(
        n_gpus=3,
        topology="dgx",
        overrides={
            0: {"processes": [fake.process(sleeper.pid, GiB)]},
            1: {"lost": "Unknown"},
            2: {"mig_mode": 1, "mig_devices": migs},
        },
    )
    result = nvml.probe()
    again = gpu_types.Probe.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again == result


def test_the_scenario_file_is_reread_when_it_changes(fake_gpus):  # noqa: F811
    fake_gpus.set(n_gpus=1)
    assert nvml.probe().gpus[0].util_gpu == 0
    fake.write_scenario(fake_gpus.path, fake.scenario(1, util_gpu=99))  # no reset: a daemon would not reset
    assert nvml.probe().gpus[0].util_gpu == 99


def test_cli_gpus_prints_text_and_json(fake_gpus, capsys, lab_home):  # noqa: F811
    fake_gpus.set(n_gpus=2, overrides={1: {"memory_used": 40 * GiB}})
    assert cli_gpus.cli_gpus([]) == 0
    out = capsys.readouterr().out
    assert "GPU 1: NVIDIA H100 80GB HBM3 | mem 40.0 GiB / 80.0 GiB" in out and "host " in out
    assert cli_gpus.cli_gpus(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [g["memory_used"] for g in data["gpus"]] == [0, 40 * GiB]


@pytest.mark.slow
def test_another_process_sees_the_fake_through_the_environment(fake_gpus, tmp_path):  # noqa: F811
    fake_gpus.set(n_gpus=3, overrides={2: {"lost": "GpuIsLost"}})
    env = subprocess_env(**fake_gpus.env, SAE_LAB_HOME=str(tmp_path / "lab"))
    out = subprocess.run(
        [sys.executable, "-m", "sae_core", "gpus", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["gpus"]) == 3 and data["gpus"][2]["error"] and data["gpus"][0]["error"] is None
    assert not (tmp_path / "lab").exists()  # listing GPUs does not create a lab
