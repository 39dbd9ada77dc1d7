"""bench/gpu_check.sh: its dry run (every step on the CPU) runs and writes every step's files; the plan fits the
8-minute budget; the summary reports time-outs, crashes, missed targets and unrun steps; the constants it writes
are what the memory estimate reads."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from bench import gpu_check
from bench.gpu_check_report import Record, summary
from bench.memory_accuracy import constants_from
from sae_core.gpu import memory
from sae_core.gpu.memory_constants import MEMORY_CONSTANTS_ENV
from tests.conftest import REPO, subprocess_env

SCRIPT = REPO / "bench" / "gpu_check.sh"
STEP_NAMES = [(s.name, s.title) for s in gpu_check.STEPS]
DONE = ("pass", "not yet available", "not measured yet")  # what a dry run's steps may end as


@pytest.mark.slow
def test_the_dry_run_runs_every_step_and_writes_its_files(tmp_path, monkeypatch):
    out = tmp_path / "check"
    run = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(out)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = (out / "summary.md").read_text()
    assert text.startswith("# GPU check") and "DRY RUN on the CPU" in text
    assert text in run.stdout  # printed at the end, where a remote run's output tail shows it
    for step in gpu_check.STEPS:
        assert f"(`{step.name}`)" in text
        for name in ("result.json", "log.txt", "run.json", *step.files):
            assert (out / step.name / name).is_file(), f"{step.name} wrote no {name}"
        result = json.loads((out / step.name / "result.json").read_text())
        log = (out / step.name / "log.txt").read_text()[-2000:]
        assert result["status"] in DONE, f"{step.name}: {result['status']}: {result['reason']}\n{log}"
    assert "## What failed\n\nnothing" in text
    assert json.loads((out / "environment.json").read_text())["dry_run"] is True
    throughput = json.loads((out / "train_throughput" / "result.json").read_text())["tables"]["training throughput"]
    assert {row[0] for row in throughput["rows"]} == set(gpu_check.k_architectures())  # the registry, every one
    memory_rows = json.loads((out / "memory" / "result.json").read_text())["tables"]["memory per rank"]["rows"]
    assert len(memory_rows) >= 6 + len(gpu_check.LATER_KINDS)
    assert [row[1] for row in memory_rows[-2:]] == ["not yet available"] * 2  # sweep and streaming, named
    # the constants file of a dry run holds no constants: the estimate taking it changes nothing
    monkeypatch.setenv(MEMORY_CONSTANTS_ENV, str(out / "memory" / "memory_constants.json"))
    assert memory.cuda_constants() == memory.BUILT_IN_CONSTANTS


def test_the_steps_time_boxes_fit_the_eight_minute_budget():
    boxes = {step.name: step.seconds for step in gpu_check.STEPS}
    assert sum(boxes.values()) <= gpu_check.BUDGET_S - gpu_check.RESERVE_S <= 8 * 60
    assert list(boxes)[:2] == ["nvml", "pytest_gpu"]  # most valuable first
    assert gpu_check.plan(dry_run=False)[0] == f"steps_budget {gpu_check.BUDGET_S - gpu_check.RESERVE_S}"
    assert gpu_check.DRY_BUDGET_S < 5 * 60


def write_step(out, name: str, result: dict | None, run: dict | None, log: str = "") -> None:
    folder = out / name
    folder.mkdir(parents=True)
    if result is not None:
        (folder / "result.json").write_text(json.dumps(result))
    if run is not None:
        (folder / "run.json").write_text(json.dumps(run))
    (folder / "log.txt").write_text(log)


def result_of(status: str, figures: list | None = None, **fields) -> dict:
    return {"status": status, "reason": None, "figures": figures or [], "tables": {}, "notes": [], **fields}


def test_the_summary_reports_time_outs_crashes_missed_targets_and_unrun_steps(tmp_path):
    ok = {"label": "rows/s", "value": "9", "target": None, "ok": None}
    missed = {"label": "TopK step / floor", "value": "2.40x", "target": "<= 2.0x", "ok": False}
    write_step(tmp_path, "a", result_of("pass", [ok]), {"exit_code": 0, "seconds": 3, "time_box": 30})
    write_step(tmp_path, "b", result_of("running", [ok]), {"exit_code": 124, "seconds": 30, "time_box": 30})
    write_step(
        tmp_path, "c", result_of("running"), {"exit_code": 1, "seconds": 2, "time_box": 30}, "x\nValueError: bad"
    )
    write_step(tmp_path, "d", result_of("target missed", [missed]), {"exit_code": 0, "seconds": 5, "time_box": 30})
    write_step(tmp_path, "e", None, None)  # the budget ran out before it
    text = summary(tmp_path, [(name, f"step {name}") for name in "abcde"])
    rows = {line.split("(`")[1][0]: line for line in text.splitlines() if line.startswith("| ") and "(`" in line}
    assert "**pass** | 3 s / 30 s | rows/s: 9" in rows["a"]
    assert "**failed**" in rows["b"] and "rows/s: 9" in rows["b"]  # the figures measured before the time-out
    assert (
        "**failed**" in rows["c"]
        and "**target missed**" in rows["d"]
        and "TopK step / floor: 2.40x (<= 2.0x) ✗" in rows["d"]
    )
    assert "**skipped**" in rows["e"] and "not run: the time budget was spent" in rows["e"]
    failed = text.split("## What failed")[1].split("## Figures")[0]
    assert "**b**: timed out after its 30 s time box" in failed
    assert "**c**: exit code 1: x / ValueError: bad" in failed
    assert "**d**: a target was missed" in failed and "**a**" not in failed


def test_a_dry_run_judges_no_target(tmp_path):
    record = Record(tmp_path, "x", dry_run=True)
    record.figure("step / floor", "976x", "<= 2.0x", ok=False)  # tiny CPU sizes say nothing about a GPU
    record.finish()
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "pass"
    record = Record(tmp_path, "x", dry_run=False)
    record.figure("step / floor", "2.4x", "<= 2.0x", ok=False)
    record.finish()
    assert json.loads((tmp_path / "result.json").read_text())["status"] == "target missed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without CUDA")
def test_a_cuda_step_without_cuda_is_skipped_and_says_why(tmp_path):
    assert gpu_check.run_step("data_feed", tmp_path, dry_run=False) == 0
    result = json.loads((tmp_path / "data_feed" / "result.json").read_text())
    assert result["status"] == "skipped" and "no CUDA device visible to" in result["reason"]


def test_the_slots_for_sweeps_and_streaming_say_they_are_not_yet_available(tmp_path):
    for name in ("streaming", "sweep"):
        assert gpu_check.run_step(name, tmp_path, dry_run=True) == 0
        result = json.loads((tmp_path / name / "result.json").read_text())
        assert result["status"] in ("not yet available", "not measured yet"), result


def test_measured_constants_are_what_the_memory_estimate_takes(tmp_path, monkeypatch):
    MiB, GiB = memory.MiB, memory.GiB
    train = {"reserved_peak": 11 * GiB, "allocated_peak": 10 * GiB, "context": 500 * MiB}
    evaluation = {"reserved_peak": 3 * GiB, "allocated_peak": 2 * GiB, "context": 640 * MiB}
    cpu = {"reserved_peak": None, "allocated_peak": None, "context": None}
    nccl = {"bytes": 900 * MiB, "ranks": 2, "what": "0.88 GiB per rank with 2 rank(s)"}
    found = constants_from([("train", train), ("evaluate", evaluation), ("train", cpu)], nccl, "NVIDIA H100")
    assert found["cuda_context_bytes"] == 640 * MiB  # the largest context seen
    assert found["allocator_headroom"] == pytest.approx(0.1)  # of the trainings: the evaluation has none
    path = tmp_path / "memory_constants.json"
    path.write_text(json.dumps(found))
    monkeypatch.setenv(MEMORY_CONSTANTS_ENV, str(path))
    constants = memory.cuda_constants()
    assert (constants.cuda_context_bytes, constants.nccl_bytes) == (640 * MiB, 900 * MiB)
    assert constants.allocator_headroom == pytest.approx(0.1)
    one_rank = constants_from([("train", train)], {**nccl, "ranks": 1}, "NVIDIA H100")
    assert "nccl_bytes" not in one_rank  # one rank's communicator says nothing about several's


def test_the_driver_refuses_an_unknown_argument():
    run = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2 and "unknown argument: --fast" in run.stderr
    help_text = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30).stdout
    assert "Preparing a GPU box" in help_text and "set -uo" not in help_text
