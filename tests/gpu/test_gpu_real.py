"""On a real CUDA GPU (`pytest -m gpu`): NVML agrees with torch.cuda, sees a process's memory, and
memory.estimate is within 10 % of a measured training peak. Skipped without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.memory_accuracy import estimate_for
from sae_core.gpu import nvml
from tests.conftest import REPO, subprocess_env

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GiB = 1024**3


@pytest.fixture
def real_nvml(monkeypatch):
    monkeypatch.delenv(nvml.NVML_MODULE_ENV, raising=False)
    monkeypatch.delenv("SAE_LAB_FAKE_GPUS", raising=False)
    nvml.reset()
    yield
    nvml.reset()


def test_probe_agrees_with_torch_cuda_on_name_and_total_memory(real_nvml):
    result = nvml.probe()
    assert result.reason is None and result.gpus
    for cuda_index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(cuda_index)
        index = nvml.nvml_index_of_uuid(str(props.uuid), result)
        assert index is not None, f"cuda:{cuda_index} ({props.uuid}) not found by NVML"
        info = result.gpu(index)
        assert info.name == props.name
        assert info.memory_total == pytest.approx(props.total_memory, rel=0.03)


ALLOCATE = """
import sys, time, torch
block = torch.empty(2**30, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.readline()
"""


def test_a_process_that_allocates_one_gib_appears_with_its_pid(real_nvml):
    child = subprocess.Popen(
        [sys.executable, "-c", ALLOCATE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=subprocess_env()
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        result = nvml.probe()
        mine = [p for g in result.gpus for p in g.processes or [] if p.pid == child.pid]
        assert mine, f"pid {child.pid} not listed by NVML (a container's pid namespace?): {result.to_dict()['gpus']}"
        (proc,) = mine
        assert GiB <= proc.gpu_memory <= GiB + 2 * GiB  # the block plus a CUDA context
        assert proc.command and "python" in proc.command and proc.user
    finally:
        child.stdin.close()
        child.wait(timeout=60)


def test_estimate_is_within_ten_percent_of_a_measured_small_run(real_nvml):
    spec = {"architecture": "topk", "d_in": 768, "d_sae": 8192, "batch_size": 1024, "autocast": None}
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory_accuracy", "--one", json.dumps(spec)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["exit_code"] == 0 and measured["context"] is not None
    peak = measured["reserved_peak"] + measured["context"]
    estimate = estimate_for(spec).total_bytes
    assert estimate == pytest.approx(peak, rel=0.10), (
        f"estimate {estimate / GiB:.2f} GiB vs measured {peak / GiB:.2f} GiB"
    )
