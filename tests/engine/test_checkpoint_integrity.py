"""A damaged newest checkpoint does not stop a resume (issue 21, item 6): each checkpoint carries the size and
sha256 of its files; `--resume` verifies them, skips the newest one that does not match (saying which and why)
and continues from the newest valid one, ending bit-for-bit where an uninterrupted run ends. With none valid it
stops with exit code 2, naming every file, in error.txt. Real training processes; the damage is done to the
files on disk as a full disk or a bad sector would."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sae_core import files
from sae_core.engine import checkpoint
from sae_core.outputs import checkpoint_problem, complete_checkpoints
from tests.engine.test_train import SMALL_BLOCKS, finish, run_train, weights, write_config

NEWEST, PREVIOUS = "step_000000060", "step_000000040"


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def overwrite_tensor_bytes(path: Path) -> None:
    """Garbage over tensor data, the file's size unchanged: safetensors itself loads it without a word."""
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:
        f.seek(header + 100)
        f.write(b"\xff" * 64)


# --------------------------------------------------------------------------- the checks, on one checkpoint


def test_a_checkpoint_names_the_file_that_no_longer_matches(tmp_path):
    tensors = {"w": torch.arange(4096, dtype=torch.float32)}
    path = checkpoint.save_checkpoint(tmp_path, 7, tensors, {"step": 7}, keep=3)
    assert checkpoint_problem(path) is None
    checksums = json.loads((path / files.CHECKPOINT_CHECKSUMS).read_text())
    assert set(checksums) == {files.CHECKPOINT_TENSORS, files.CHECKPOINT_STATE}

    tensor_file = path / files.CHECKPOINT_TENSORS
    overwrite_tensor_bytes(tensor_file)
    assert not torch.equal(checkpoint.load_checkpoint(path)[0]["w"], tensors["w"])  # what used to load silently
    assert checkpoint_problem(path) == (
        "checkpoints/step_000000007/state.safetensors does not match its sha256 (its bytes changed after it was written)"
    )
    size = tensor_file.stat().st_size
    truncate(tensor_file)
    assert checkpoint_problem(path) == (
        f"checkpoints/step_000000007/state.safetensors is {size // 2:,} bytes, {size:,} were written "
        "(truncated or overwritten)"
    )
    (path / files.CHECKPOINT_CHECKSUMS).write_text("{not json")
    assert checkpoint_problem(path) == (
        "checkpoints/step_000000007/checksums.json is unreadable (JSONDecodeError): nothing can be verified"
    )


def test_when_none_is_valid_the_error_names_every_file(tmp_path):
    for step in (1, 2):
        checkpoint.save_checkpoint(tmp_path, step, {"w": torch.ones(8)}, {"step": step}, keep=3)
    truncate(tmp_path / "checkpoints" / "step_000000002" / files.CHECKPOINT_TENSORS)
    (tmp_path / "checkpoints" / "step_000000001" / files.CHECKPOINT_CHECKSUMS).unlink()  # an older checkpoint
    truncate(tmp_path / "checkpoints" / "step_000000001" / files.CHECKPOINT_STATE)  # ... that does not parse
    heard: list[str] = []
    with pytest.raises(checkpoint.CheckpointError) as raised:
        checkpoint.load_newest_valid(tmp_path, heard.append)
    message = str(raised.value)
    assert "checkpoints/step_000000002/state.safetensors is " in message and "were written" in message
    assert "checkpoints/step_000000001 does not load" in message
    assert [line.split(":")[0] for line in heard] == ["resume", "resume"]


# --------------------------------------------------------------------------- resume, as real processes


@pytest.fixture(scope="module")
def finished(tmp_path_factory, toy_path) -> tuple[Path, Path]:
    """An uninterrupted 60-step run with checkpoints at 20, 40 and 60: its config and its folder."""
    base = tmp_path_factory.mktemp("integrity")
    config = write_config(base, toy_path, total_steps=60, checkpoint_every=20, log_every=20, **SMALL_BLOCKS)
    finish(run_train(config, base / "straight"))
    assert [p.name for p in complete_checkpoints(base / "straight")] == ["step_000000020", PREVIOUS, NEWEST]
    return config, base / "straight"


def damaged_copy(finished, tmp_path: Path, damage) -> Path:
    _, straight = finished
    source = tmp_path / "source"
    shutil.copytree(straight, source)
    damage(source / "checkpoints")
    return source


def assert_same_weights(got: Path, expected: Path) -> None:
    reference = weights(expected)
    again = weights(got)
    for name, tensor in reference.items():
        assert torch.equal(again[name], tensor), name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (truncate, "state.safetensors is "),
        (overwrite_tensor_bytes, "state.safetensors does not match its sha256"),
    ],
    ids=["truncated", "garbage over tensor data"],
)
def test_resume_skips_a_damaged_newest_checkpoint_and_ends_equal(finished, tmp_path, damage, why):
    config, straight = finished
    source = damaged_copy(finished, tmp_path, lambda root: damage(root / NEWEST / files.CHECKPOINT_TENSORS))
    output = finish(run_train(config, tmp_path / "resumed", resume=source))
    assert f"resume: skipped checkpoints/{NEWEST}: checkpoints/{NEWEST}/{why}" in output
    assert f"resume: from checkpoints/{PREVIOUS} (step 40)" in output and "Traceback" not in output
    assert_same_weights(tmp_path / "resumed", straight)


@pytest.mark.slow
def test_checkpoints_from_before_checksums_load_and_are_called_unverified(finished, tmp_path):
    config, straight = finished

    def forget_checksums(root: Path) -> None:
        for folder in root.iterdir():
            (folder / files.CHECKPOINT_CHECKSUMS).unlink()

    source = damaged_copy(finished, tmp_path, forget_checksums)
    truncate(source / "checkpoints" / NEWEST / files.CHECKPOINT_TENSORS)  # an unverified one that does not parse
    output = finish(run_train(config, tmp_path / "resumed", resume=source))
    assert f"resume: skipped checkpoints/{NEWEST}: checkpoints/{NEWEST} does not load" in output
    assert f"checkpoints/{PREVIOUS} has no checksums (written before SAE Lab kept them)" in output
    assert "its bytes are unverified" in output
    assert_same_weights(tmp_path / "resumed", straight)


@pytest.mark.slow
def test_with_every_checkpoint_damaged_the_run_stops_naming_the_files(finished, tmp_path):
    config, _ = finished

    def truncate_all(root: Path) -> None:
        for folder in root.iterdir():
            truncate(folder / files.CHECKPOINT_TENSORS)

    source = damaged_copy(finished, tmp_path, truncate_all)
    proc = run_train(config, tmp_path / "resumed", resume=source)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2 and "Traceback" not in output
    error = (tmp_path / "resumed" / files.REFUSED_FILE).read_text()
    assert error.startswith(f"--resume: no valid checkpoint in {source / 'checkpoints'}: ")
    for step in ("step_000000020", PREVIOUS, NEWEST):
        assert f"checkpoints/{step}/state.safetensors is " in error, step
    assert not (tmp_path / "resumed" / files.WEIGHTS_FILE).exists()
