"""The memory estimate takes measured GPU constants from a file (SAE_LAB_MEMORY_CONSTANTS, else
SAE_LAB_HOME/memory_constants.json), as bench/gpu_check.sh writes it; a bad file is ignored with a warning."""

from __future__ import annotations

import json
import logging

import pytest

from sae_core.config import TrainConfig
from sae_core.files import MEMORY_CONSTANTS_FILE
from sae_core.gpu import memory, model_memory
from sae_core.gpu.memory_constants import MEMORY_CONSTANTS_ENV

GiB = memory.GiB
MEASURED = {"cuda_context_bytes": 812 * memory.MiB, "nccl_bytes": 2 * GiB, "allocator_headroom": 0.04}


@pytest.fixture
def no_constants(tmp_path, monkeypatch):
    """No constants file anywhere: an empty lab home and no variable."""
    monkeypatch.delenv(MEMORY_CONSTANTS_ENV, raising=False)
    monkeypatch.setenv("SAE_LAB_HOME", str(tmp_path / "lab"))
    return tmp_path


def write(path, value) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return str(path)


def two_rank_estimate() -> memory.MemoryEstimate:
    cfg = TrainConfig(activation_source="unused.safetensors", d_sae=16384, batch_size=4096, total_steps=10)
    return memory.estimate(cfg, 2, d_in=2304)


def test_without_a_file_the_built_in_constants_hold(no_constants):
    assert memory.cuda_constants() == memory.BUILT_IN_CONSTANTS
    est = two_rank_estimate()
    assert est.breakdown["cuda_context"] == memory.CUDA_CONTEXT_BYTES
    assert est.breakdown["nccl_buffers"] == memory.NCCL_BYTES


def test_a_file_named_by_the_variable_replaces_every_constant_it_holds(no_constants, monkeypatch):
    before = two_rank_estimate()
    path = write(no_constants / "measured.json", {**MEASURED, "device": "NVIDIA H100 80GB HBM3"})
    monkeypatch.setenv(MEMORY_CONSTANTS_ENV, path)
    est = two_rank_estimate()
    assert est.breakdown["cuda_context"] == MEASURED["cuda_context_bytes"]
    assert est.breakdown["nccl_buffers"] == MEASURED["nccl_bytes"]
    assert est.breakdown["allocator_headroom"] == int(0.04 * est.phases[est.peak_phase])
    assert sum(est.breakdown.values()) == est.total_bytes
    assert est.phases == before.phases  # the modelled moments do not depend on the constants
    assert memory.cuda_constants().source == path


def test_the_lab_homes_file_is_read_when_no_variable_names_one(no_constants):
    write(no_constants / "lab" / MEMORY_CONSTANTS_FILE, {"cuda_context_bytes": 700 * memory.MiB})
    constants = memory.cuda_constants()
    assert constants.cuda_context_bytes == 700 * memory.MiB
    assert constants.nccl_bytes == memory.NCCL_BYTES  # absent from the file: built in
    assert constants.allocator_headroom == memory.ALLOCATOR_HEADROOM
    assert model_memory.extraction_bytes(10, "float32", 1, 8, 4, 1)["cuda_context"] == 700 * memory.MiB
    assert model_memory.inspection_bytes(8, 16, 4, 2, 3)["cuda_context"] == 700 * memory.MiB


def test_the_variable_wins_over_the_lab_homes_file(no_constants, monkeypatch):
    write(no_constants / "lab" / MEMORY_CONSTANTS_FILE, {"cuda_context_bytes": 700 * memory.MiB})
    monkeypatch.setenv(MEMORY_CONSTANTS_ENV, write(no_constants / "other.json", {"cuda_context_bytes": GiB}))
    assert memory.cuda_constants().cuda_context_bytes == GiB


def test_a_rewritten_file_is_read_again(no_constants, monkeypatch):
    path = no_constants / "measured.json"
    monkeypatch.setenv(MEMORY_CONSTANTS_ENV, write(path, {"allocator_headroom": 0.05}))
    assert memory.cuda_constants().allocator_headroom == 0.05
    write(path, {"allocator_headroom": 0.125})  # another size, so another cache key whatever the mtime
    assert memory.cuda_constants().allocator_headroom == 0.125


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "Expecting property name"),
        ("[1, 2]", "not a JSON object"),
        ({"cuda_context_bytes": -1}, "cuda_context_bytes must be between 0 and"),
        ({"cuda_context_bytes": 1.5}, "cuda_context_bytes must be a whole number"),
        ({"nccl_bytes": "1 GiB"}, "nccl_bytes must be a whole number"),
        ({"allocator_headroom": True}, "allocator_headroom must be a number"),
        ({"allocator_headroom": 3}, "allocator_headroom must be between 0 and 1"),
        ("x" * 70_000, "larger than"),
        (b"\xff\xfe", "can't decode"),
    ],
)
def test_a_file_that_cannot_be_used_is_ignored_with_a_warning(no_constants, monkeypatch, caplog, content, reason):
    path = no_constants / "bad.json"
    path.write_bytes(content) if isinstance(content, bytes) else write(path, content)
    monkeypatch.setenv(MEMORY_CONSTANTS_ENV, str(path))
    with caplog.at_level(logging.WARNING, logger="sae_core.gpu.memory_constants"):
        assert memory.cuda_constants() == memory.BUILT_IN_CONSTANTS
        assert two_rank_estimate().breakdown["cuda_context"] == memory.CUDA_CONTEXT_BYTES
    assert reason in caplog.text and str(path) in caplog.text
    assert caplog.text.count("ignored") == 1  # once per version of the file, not once per estimate


def test_a_file_of_metadata_only_changes_nothing(no_constants, monkeypatch):
    """A dry run of the GPU check writes the file without constants (nothing was measured on a CPU)."""
    monkeypatch.setenv(MEMORY_CONSTANTS_ENV, write(no_constants / "dry.json", {"dry_run": True, "device": "cpu"}))
    assert memory.cuda_constants() == memory.BUILT_IN_CONSTANTS
