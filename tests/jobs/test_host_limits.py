"""The gate against the host (issue 21, item 4): no CPU job wider than the lab's CPU budget (the usable cores,
or SAE_LAB_CPU_BUDGET), and every kind's host RAM against what is available, on CPU processes and on GPUs.

The RAM a test machine has is what it has: a machine with almost none is had by replacing psutil's answer
(the OS boundary); the estimate, the rule and the message are the real ones."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import namedtuple

import pytest

from sae_core.config import EvaluateConfig, ExtractConfig, InspectConfig, TrainConfig
from sae_core.gpu import host, memory
from sae_core.jobs import store, submission
from sae_core.jobs.placement import Submission
from tests.conftest import subprocess_env
from tests.fakes import fixtures

fake_gpus = fixtures.fake_gpus  # the fake-NVML fixture, registered in this module

MiB = 2**20


@pytest.fixture
def cfg(toy_path) -> TrainConfig:
    return TrainConfig(activation_source=str(toy_path), d_sae=64, k=4, batch_size=512, total_steps=20)


def problems(verdict) -> list[tuple[str, str]]:
    return [(p.field, p.message) for p in verdict.problems]


def little_ram(monkeypatch, available: int = 100 * MiB) -> None:
    """psutil reports `available` bytes of RAM (a machine we cannot have in a test)."""
    memory_info = namedtuple("svmem", "total available")
    monkeypatch.setattr(host.psutil, "virtual_memory", lambda: memory_info(64 * 2**30, available))


# --------------------------------------------------------------------------- the CPU budget


def test_a_cpu_job_wider_than_the_cores_is_refused_naming_the_limit(lab_home, cfg, monkeypatch):
    monkeypatch.delenv(host.CPU_BUDGET_ENV, raising=False)
    cores = host.usable_cores()
    wide = cfg.model_copy(update={"batch_size": 512 * cores * 2})  # splits evenly over both counts below
    found = problems(submission.check(wide, Submission(None, 2 * cores)))
    assert found == [
        (
            "cpu_procs",
            f"cpu_procs: {2 * cores} processes, but this machine runs at most {cores} at once (its CPU cores, or "
            f"SAE_LAB_CPU_BUDGET); choose {cores} or fewer",
        )
    ]
    assert submission.check(wide, Submission(None, cores)).ok


def test_the_budget_is_the_configured_one_when_set_for_every_kind(lab_home, cfg, hf, monkeypatch):
    monkeypatch.setenv(host.CPU_BUDGET_ENV, "1")
    assert [f for f, _ in problems(submission.check(cfg, Submission(None, 2)))] == ["cpu_procs"]
    extraction = ExtractConfig(model=str(hf["llama"]), hook="model.layers.0", dataset=str(hf["corpus"]), n_tokens=3000)
    assert "at most 1 at once" in submission.check(extraction, Submission(None, 2)).describe()
    assert submission.check(extraction, Submission(None, 1)).ok
    monkeypatch.setenv(host.CPU_BUDGET_ENV, "4")  # more than the cores: the person who set it decided so
    assert submission.check(cfg, Submission(None, 4)).ok


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_budget_setting_refuses_cpu_jobs_naming_the_variable(lab_home, cfg, monkeypatch, value):
    monkeypatch.setenv(host.CPU_BUDGET_ENV, value)
    ((field, message),) = problems(submission.check(cfg, Submission(None, 1)))
    assert field == "cpu_procs" and "SAE_LAB_CPU_BUDGET: must be a whole number of processes, 1 or more" in message
    with pytest.raises(submission.SubmissionRejected):
        submission.submit(cfg, Submission(None, 1))
    assert store.list_jobs() == []


def test_the_queue_runs_cpu_jobs_within_the_same_budget(lab_home, monkeypatch):
    from sae_core.jobs.daemon import Launcher

    monkeypatch.setenv(host.CPU_BUDGET_ENV, "3")
    assert Launcher(lab_home, gpu_available=False).cpu_budget == 3
    monkeypatch.setenv(host.CPU_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="SAE_LAB_CPU_BUDGET: must be a whole number"):
        Launcher(lab_home, gpu_available=False)  # serve() logs it and exits: it would not know what to run


@pytest.mark.slow
def test_the_cli_refuses_512_cpu_processes_and_queues_nothing(lab_home, toy_path, tmp_path):
    config = tmp_path / "cfg.json"
    config.write_text(
        json.dumps({"activation_source": str(toy_path), "d_sae": 64, "k": 4, "batch_size": 512, "total_steps": 10})
    )
    env = subprocess_env()
    env.pop(host.CPU_BUDGET_ENV, None)
    result = subprocess.run(
        [sys.executable, "-m", "sae_core", "submit", "--config", str(config), "--cpu-procs", "512", "--no-daemon"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert f"cpu_procs: 512 processes, but this machine runs at most {host.usable_cores()} at once" in result.stderr
    assert "Traceback" not in result.stderr and store.list_jobs() == []


# --------------------------------------------------------------------------- host RAM, every kind


def test_a_training_on_gpus_or_cpu_processes_must_fit_the_hosts_ram(lab_home, cfg, fake_gpus, monkeypatch):
    fake_gpus.set(n_gpus=2)
    assert submission.check(cfg, Submission("0,1", None)).ok and submission.check(cfg, Submission(None, 1)).ok
    little_ram(monkeypatch)
    ((field, message),) = problems(submission.check(cfg, Submission("0,1", None)))
    need = memory.host_bytes(cfg, 2, 32, on_gpu=True)  # the loaders and three interpreters (torchrun's agent)
    assert need == 2 * (cfg.loader_bytes(2, 32) + memory.PROCESS_BYTES) + memory.PROCESS_BYTES
    assert field == "gpus" and f"the run needs about {need / 2**30:.1f} GiB of RAM for 2 process(es)" in message
    assert "this machine has 0.1 GiB available; lower d_sae or batch_size, or use fewer GPUs" in message
    ((field, message),) = problems(submission.check(cfg, Submission(None, 1)))
    assert field == "cpu_procs" and message.endswith("or use fewer processes")


def test_an_extraction_must_fit_the_hosts_ram_on_gpus_too(lab_home, hf, fake_gpus, monkeypatch):
    fake_gpus.set(n_gpus=1)
    extraction = ExtractConfig(model=str(hf["llama"]), hook="model.layers.0", dataset=str(hf["corpus"]), n_tokens=3000)
    on_gpu = submission.check(extraction, Submission("0", None))
    assert on_gpu.ok and submission.check(extraction, Submission(None, 1)).ok
    little_ram(monkeypatch)
    ((field, message),) = problems(submission.check(extraction, Submission("0", None)))
    assert field == "gpus" and "the extraction needs about" in message  # its weights pass through RAM
    ((field, message),) = problems(submission.check(extraction, Submission(None, 1)))
    assert field == "cpu_procs" and "the extraction needs about" in message


def test_evaluations_and_inspections_must_fit_the_hosts_ram(lab_home, trained, fake_gpus, monkeypatch):
    fake_gpus.set(n_gpus=1)
    evaluation, inspection = EvaluateConfig(sae=str(trained["sae"]), contexts=4), InspectConfig(sae=str(trained["sae"]))
    for placement in (("0", None), (None, 1)):
        assert submission.check(evaluation, Submission(*placement)).ok
        assert submission.check(inspection, Submission(*placement)).ok
    little_ram(monkeypatch)
    for placement, field in ((("0", None), "gpus"), ((None, 1), "cpu_procs")):
        assert [(f, "the evaluation needs about" in m) for f, m in problems(submission.check(evaluation, Submission(*placement)))] == [(field, True)]  # fmt: skip
        ((got, message),) = problems(submission.check(inspection, Submission(*placement)))
        assert got == field and "the inspection needs about" in message and "lower chunk_rows" in message
