"""Sweeps trained for real: each member ends bit for bit equal to its single run; 1 rank = 2 ranks for both
placements (real torchrun, gloo); kill -9 and --resume end equal to an uninterrupted sweep; a failing member is
reported by name while the others complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_core import files
from sae_core.data.checks import check_dataset
from sae_core.engine.distributed import DistEnv
from sae_core.engine.sweep_trainer import SweepTrainer
from sae_core.outputs import sweep_members
from sae_core.sweep import sweep_from_dict
from sae_core.train import main
from tests.conftest import read_jsonl, tiny_config
from tests.engine.test_train import SMALL_BLOCKS, finish, kill_after_checkpoint, run_train, weights

TIMING = ("tokens_per_s", "time", "data_wait", "peak_mem", "train_seconds")


def write(tmp_path: Path, data: dict, name: str) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def sweep_config(toy_path: Path, **extra) -> dict:
    base = tiny_config(toy_path, dead_tokens_window=2048, total_steps=20, **SMALL_BLOCKS)
    for key in ("d_sae", "k"):
        base.pop(key)
    return {**base, "sweep": {"d_sae": [32, 64], "k": [2, 4]}, **extra}


def figures(folder: Path) -> dict:
    return {k: v for k, v in json.loads((folder / files.EVAL_FILE).read_text()).items() if k not in TIMING}


def steps(folder: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in (*TIMING, "member")} for r in read_jsonl(folder / files.METRICS_FILE)
    ]


def test_each_member_of_a_2x2_grid_ends_bit_for_bit_equal_to_its_single_run(tmp_path, toy_path):
    sweep = sweep_config(toy_path)
    assert main(["--config", str(write(tmp_path, sweep, "sweep")), "--out", str(tmp_path / "sweep")]) == 0
    members = sweep_members(tmp_path / "sweep")
    assert [m.name for m in members] == ["d_sae=32,k=2", "d_sae=32,k=4", "d_sae=64,k=2", "d_sae=64,k=4"]
    assert all(m.status == "completed" for m in members)
    result = json.loads((tmp_path / "sweep" / files.SWEEP_RESULT_FILE).read_text())
    assert [m["status"] for m in result["members"]] == ["completed"] * 4
    for member in members:
        single = {k: v for k, v in sweep.items() if k != "sweep"} | member.overrides
        out = tmp_path / f"single_{member.name}"
        assert main(["--config", str(write(tmp_path, single, member.name)), "--out", str(out)]) == 0
        for name, tensor in weights(out).items():
            assert torch.equal(weights(member.folder)[name], tensor), (member.name, name)
        assert figures(member.folder) == figures(out), member.name
        assert steps(member.folder) == steps(out), member.name
        assert all(
            r.get("member") == member.name for r in read_jsonl(member.folder / files.METRICS_FILE) if "step" in r
        )
        # the member's folder is a complete SAE folder, as a single run's
        for name in (files.CFG_FILE, files.WEIGHTS_FILE, files.SPARSITY_FILE, files.TRAIN_CONFIG_FILE):
            assert (member.folder / name).is_file(), name


def test_a_member_whose_loss_stops_being_finite_is_reported_by_name_and_the_others_complete(tmp_path, toy_path):
    sweep = sweep_from_dict(sweep_config(toy_path))
    trainer = SweepTrainer(sweep, tmp_path / "sweep", DistEnv(), check_dataset(sweep.shared))
    with torch.no_grad():  # a member whose weights went bad: its loss is NaN from the first step on
        trainer.members["d_sae=32,k=4"].sae.W_dec[0, 0] = float("nan")
    result = trainer.run()
    assert [m["status"] for m in result["members"]] == ["completed", "failed", "completed", "completed"]
    bad = sweep_members(tmp_path / "sweep")[1]
    assert bad.name == "d_sae=32,k=4" and bad.error == "the loss is not finite at step 10 (nan)"
    assert not (bad.folder / files.EVAL_FILE).exists()
    # the exit code: the sweep completed with a member failed; with every member failed it is an error
    assert (tmp_path / "sweep" / files.SWEEP_RESULT_FILE).is_file()


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["batch", "members"])
def test_two_ranks_train_a_sweep_as_one_does(tmp_path, toy_path, placement):
    config = write(tmp_path, sweep_config(toy_path, placement=placement), "sweep")
    finish(run_train(config, tmp_path / "one"))
    output = finish(run_train(config, tmp_path / "two", nproc=2))
    assert json.loads((tmp_path / "two" / files.SWEEP_FILE).read_text())["placement"] == placement
    assert "sweep: 4 of 4 members completed" in output
    for member in sweep_members(tmp_path / "one"):
        two = tmp_path / "two" / member.name
        for name, tensor in weights(member.folder).items():
            if placement == "members":  # whole batches on one rank: the very same arithmetic
                assert torch.equal(weights(two)[name], tensor), (member.name, name)
            else:
                torch.testing.assert_close(weights(two)[name], tensor, rtol=1e-4, atol=1e-5, msg=member.name)


@pytest.mark.slow
def test_kill_and_resume_of_a_sweep_ends_bit_for_bit_equal(tmp_path, toy_path):
    data = sweep_config(toy_path, total_steps=300, checkpoint_every=20, log_every=20, keep_checkpoints=1)
    config = write(tmp_path, data, "sweep")
    finish(run_train(config, tmp_path / "straight"))
    killed = tmp_path / "killed"
    kill_after_checkpoint(run_train(config, killed), killed / "d_sae=64,k=4", 60)
    assert not (killed / files.SWEEP_RESULT_FILE).exists(), "the sweep finished before the kill; nothing was tested"
    finish(run_train(config, killed, resume=killed))
    for member in sweep_members(tmp_path / "straight"):
        for name, tensor in weights(member.folder).items():
            assert torch.equal(weights(killed / member.name)[name], tensor), (member.name, name)
