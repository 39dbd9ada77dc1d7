"""A streamed training that keeps its stream (cache_to), evaluates with its own model (evaluate_contexts), and is
evaluated later from its held-out contexts, with the tiny GPT-2 of the tests: the kept folder opens as an
extraction, and a training on it (shuffle off, the same batch and holdout) ends bit for bit equal to the streamed
run; the in-job CE/KL figures equal a separate evaluation's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file

from sae_core import files
from sae_core.config import ConfigError, EvaluateConfig, InspectConfig, TrainConfig
from sae_core.data.catalog import list_datasets, list_extracted
from sae_core.data.checks import check_dataset
from sae_core.data.heldout import plan_evaluation, plan_inspection
from sae_core.data.stream_cache import cache_folder, cache_to_problems
from sae_core.evaluate import main as evaluate_main
from sae_core.train import main
from tests.engine.test_train import weights
from tests.model.test_stream import GPT2_HOOKS, streamed, write

FIGURES = ("ce_clean", "ce_spliced", "ce_zero_ablation", "ce_loss_score", "kl_spliced", "kl_div_score")


def train_on_cache(tmp_path: Path, hf, folder: Path, name: str) -> Path:
    """A training on a kept folder with the streamed run's batch, steps, holdout and seed, rows as stored."""
    skip = {"model", "hook", "dataset", "context_size", "mixing_contexts", "model_batch_size", "cache_to"}
    config = {k: v for k, v in streamed(hf).items() if k not in skip}
    config |= {"activation_source": str(folder), "shuffle": False}
    out = tmp_path / name
    assert main(["--config", str(write(tmp_path, config, name)), "--out", str(out)]) == 0
    return out


def test_a_kept_stream_is_an_extraction_that_trains_to_the_same_sae(tmp_path, hf):
    cache = tmp_path / "cache"
    out = tmp_path / "streamed"
    config = write(tmp_path, streamed(hf, cache_to=str(cache)), "cfg")
    assert main(["--config", str(config), "--out", str(out)]) == 0
    folder = cache_folder(cache, f"out:{GPT2_HOOKS[1]}")
    manifest = json.loads((folder / files.MANIFEST_FILE).read_text())
    assert manifest["model"] == str(hf["gpt2"]) and manifest["hook"] == GPT2_HOOKS[1]
    assert manifest["context_size"] == 16 and manifest["held_out_rows"] >= 128
    sizes = {"d_sae": 64, "k": 4, "batch_size": 128, "total_steps": 12, "holdout_tokens": 128}
    cfg = TrainConfig.from_dict({"activation_source": str(folder), **sizes})
    data = check_dataset(cfg, 1)
    assert data.from_model and data.n_rows >= 128 * 12 + 128

    kept = train_on_cache(tmp_path, hf, folder, "from_cache")
    for name, tensor in weights(out).items():
        assert torch.equal(weights(kept)[name], tensor), name
    streamed_eval = json.loads((out / files.EVAL_FILE).read_text())
    kept_eval = json.loads((kept / files.EVAL_FILE).read_text())
    assert kept_eval["fvu"] == streamed_eval["fvu"] and kept_eval["holdout_kind"] == "tail"

    # Both SAEs are evaluated later on the same held-out contexts.
    ids = plan_evaluation(EvaluateConfig(sae=str(kept), contexts=100)).context_ids
    streamed_ids = load_file(str(out / files.HELDOUT_CONTEXTS_FILE))["context_ids"]
    assert ids is not None and sorted(ids.tolist()) == sorted(streamed_ids.tolist()) and len(ids) >= 2


def test_a_resumed_run_keeps_the_whole_stream(tmp_path, hf):
    cache = tmp_path / "cache"
    config = write(tmp_path, streamed(hf, cache_to=str(cache), mixing_contexts=8), "cfg")
    assert main(["--config", str(config), "--out", str(tmp_path / "straight")]) == 0
    halfway = tmp_path / "halfway"
    shutil.copytree(tmp_path / "straight", halfway)
    shutil.rmtree(halfway / "checkpoints" / "step_000000012")
    folder = cache_folder(cache, f"out:{GPT2_HOOKS[1]}")
    before = {p.name: p.read_bytes() for p in folder.glob("shard_*")}
    for path in [folder / files.MANIFEST_FILE, *sorted(folder.glob("shard_*"))[:3]]:
        path.unlink()  # as if killed early: the first windows' shards are missing
    assert main(["--config", str(config), "--out", str(tmp_path / "resumed"), "--resume", str(halfway)]) == 0
    assert {p.name: p.read_bytes() for p in folder.glob("shard_*")} == before
    assert (folder / files.MANIFEST_FILE).is_file()


def test_the_job_evaluates_with_its_model_as_a_separate_evaluation_does(tmp_path, hf):
    out = tmp_path / "run"
    config = write(tmp_path, streamed(hf, evaluate_contexts=4), "cfg")
    assert main(["--config", str(config), "--out", str(out)]) == 0
    in_job = json.loads((out / files.EVAL_FILE).read_text())
    assert in_job["eval_contexts"] == 4 and all(name in in_job for name in FIGURES)
    again = tmp_path / "again"
    shutil.copytree(out, again)
    request = write(tmp_path, {"sae": str(again), "contexts": 4, "device": "cpu"}, "evaluate")
    assert evaluate_main(["--config", str(request), "--out", str(tmp_path / "eval_job")]) == 0
    separate = json.loads((again / files.EVAL_FILE).read_text())
    for name in FIGURES:
        assert separate[name] == in_job[name], name  # the same contexts, batches and sums


def test_a_streamed_sweep_evaluates_every_member_at_its_hook(tmp_path, hf):
    base = {k: v for k, v in streamed(hf, evaluate_contexts=3).items() if k != "hook"}
    sweep = {**base, "sweep": {"hook": GPT2_HOOKS}}
    assert main(["--config", str(write(tmp_path, sweep, "sweep")), "--out", str(tmp_path / "sweep")]) == 0
    for hook in GPT2_HOOKS:
        figures = json.loads((tmp_path / "sweep" / f"hook={hook}" / files.EVAL_FILE).read_text())
        assert figures["eval_hook"] == hook and figures["eval_contexts"] == 3 and "ce_loss_score" in figures


def test_cache_to_must_lie_in_the_data_roots_and_hold_no_kept_stream(tmp_path):
    home = tmp_path / "home"
    assert cache_to_problems(str(tmp_path / "elsewhere"), ["out:h"], home)[0].startswith("cache_to: ")
    inside = home / "datasets" / "kept"
    assert cache_to_problems(str(inside), ["out:h"], home) == []
    (inside / "h").mkdir(parents=True)
    (inside / "h" / files.MANIFEST_FILE).write_text("{}")
    assert "already holds" in cache_to_problems(str(inside), ["out:h", "out:g"], home)[0]
    (inside / "g.input").mkdir()  # a transcoder's module input, kept before
    (inside / "g.input" / files.MANIFEST_FILE).write_text("{}")
    assert cache_to_problems(str(inside), ["out:g"], home) == []
    assert "g.input already holds" in cache_to_problems(str(inside), ["in:g", "out:g"], home)[0]


def test_a_streamed_config_rejects_shuffle_off(hf):
    with pytest.raises(Exception, match="shuffle: only for activation files"):
        TrainConfig.from_dict(streamed(hf, shuffle=False))


def test_inspecting_a_streamed_sae_reads_its_kept_stream_or_says_why_it_cannot(tmp_path, hf):
    cache = tmp_path / "cache"
    kept = tmp_path / "kept"
    assert main(["--config", str(write(tmp_path, streamed(hf, cache_to=str(cache)), "kept")), "--out", str(kept)]) == 0
    plan = plan_inspection(InspectConfig(sae=str(kept), tokens=256))
    assert plan.data.source == cache_folder(cache, f"out:{GPT2_HOOKS[1]}") and plan.held_out == 128
    bare = tmp_path / "bare"
    assert main(["--config", str(write(tmp_path, streamed(hf), "bare")), "--out", str(bare)]) == 0
    with pytest.raises(ConfigError, match="stream was not kept"):
        plan_inspection(InspectConfig(sae=str(bare)))


def test_the_train_page_lists_kept_streams_like_extractions(tmp_path):
    home = tmp_path / "home"
    for folder in (home / "datasets" / "kept" / "h.1", home / "jobs" / "7" / "cache" / "h.2", home / "jobs" / "8"):
        folder.mkdir(parents=True)
        (folder / files.MANIFEST_FILE).write_text("{}")
    assert list_datasets(home / "datasets") == [home / "datasets" / "kept" / "h.1"]
    assert list_extracted(home) == [home / "jobs" / "8", home / "jobs" / "7" / "cache" / "h.2"]
