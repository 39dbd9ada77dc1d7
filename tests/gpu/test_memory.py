"""memory.estimate: the exact terms against real tensors, the modelled moments, and the CLI."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from sae_core.architectures import ARCHITECTURE_NAMES
from sae_core.cli import estimate as cli_estimate
from sae_core.config import ConfigError, TrainConfig
from sae_core.data.formats import DatasetError
from sae_core.engine.saes import StepContext, sae_from_config
from sae_core.gpu import memory, model_memory
from tests.conftest import train_config

GiB = memory.GiB


def make_cfg(**overrides) -> TrainConfig:
    values = {"activation_source": "unused.safetensors", "d_sae": 256, "batch_size": 64, "total_steps": 10, "k": 8}
    values.update(overrides)
    return train_config(**values)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("architecture", ARCHITECTURE_NAMES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_parameter_gradient_and_adam_bytes_equal_the_real_tensors(architecture, dtype):
    torch.manual_seed(0)
    d_in = 24
    cfg = make_cfg(architecture=architecture, dtype=dtype, d_sae=96, k=4)
    sae = sae_from_config(cfg, d_in)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(32, d_in, dtype=getattr(torch, dtype))
    dead = torch.ones(cfg.d_sae, dtype=torch.bool)  # AuxK runs too, so every parameter gets a gradient
    out = sae.training_step(x, StepContext(step=5, total_steps=10, dead_mask=dead))
    out.loss.backward()
    optimizer.step()

    params = list(sae.parameters())
    assert all(p.grad is not None for p in params)
    # Adam's per-parameter `step` is a CPU scalar (not fused, not capturable): not GPU memory.
    states = [t for p in params for name, t in optimizer.state[p].items() if name != "step"]
    assert all(t.device == p.device for p in params for name, t in optimizer.state[p].items() if name != "step")
    est = memory.estimate(cfg, world_size=1, d_in=d_in)
    assert est.breakdown["parameters"] == tensor_bytes(params) == memory.parameter_bytes(cfg, d_in)
    assert est.breakdown["gradients"] == tensor_bytes(p.grad for p in params)
    assert est.breakdown["adam_states"] == tensor_bytes(states)
    assert est.breakdown["ddp_buckets"] == 0  # train.py: gradient_as_bucket_view=True


def test_latent_statistics_are_the_trainers_two_int64_counters():
    cfg = make_cfg(d_sae=1000)
    assert memory.estimate(cfg, 1, d_in=8).breakdown["latent_statistics"] == 2 * 8 * 1000


def test_d_in_comes_from_the_dataset(tmp_path, toy_path, capsys):
    # The estimate itself is given d_in (gpu/ reads no data); the command reads it from the set's header.
    path = write_cfg(tmp_path, **make_cfg(activation_source=str(toy_path)).model_dump(exclude_defaults=True))
    assert cli_estimate.cli_estimate(["--config", str(path), "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["d_in"] == 32  # the toy set of conftest
    assert est["breakdown"]["parameters"] == (2 * 32 * 256 + 256 + 32) * 4


def test_missing_dataset_is_a_dataset_error():
    with pytest.raises(DatasetError, match="not found"):
        cli_estimate.d_in_of(make_cfg(activation_source="/nowhere/acts.safetensors"))


def test_breakdown_sums_to_the_total_and_names_every_term():
    cfg = make_cfg(d_sae=16384, batch_size=4096)
    est = memory.estimate(cfg, 2, d_in=768)
    assert sum(est.breakdown.values()) == est.total_bytes
    assert est.per_rank_batch == 2048
    assert est.breakdown["cuda_context"] == memory.CUDA_CONTEXT_BYTES
    assert est.breakdown["nccl_buffers"] == memory.NCCL_BYTES  # several ranks talk through NCCL
    assert memory.estimate(cfg, 1, d_in=768).breakdown["nccl_buffers"] == 0
    peak = est.phases[est.peak_phase]
    assert est.breakdown["allocator_headroom"] == int(memory.ALLOCATOR_HEADROOM * peak)
    only_some = {"other_members_kept_batches", *STREAM_TERMS, "kept_windows"}  # a sweep's, a streamed run's
    assert set(est.breakdown) == set(memory.TERM_LABELS) - only_some


STREAM_TERMS = ("model_weights", "model_forward_batch", "model_attention_scores", "mixing_window")


def test_a_streamed_run_adds_the_model_its_forward_batch_and_a_window_per_hook():
    cfg = make_cfg(d_sae=16384, batch_size=4096)
    stream = memory.StreamSource(
        parameters=124_000_000, model_dtype="bfloat16", hidden_size=768, heads=12, model_batch_size=32,
        context_size=128, mixing_contexts=256, hook_widths=(768, 3072),
    )  # fmt: skip
    files, est = memory.estimate(cfg, 2, d_in=3072), memory.estimate(cfg, 2, d_in=3072, stream=stream)
    model = model_memory.extraction_bytes(124_000_000, "bfloat16", 32, 128, 768, 12)  # as an extraction counts it
    assert est.breakdown["model_weights"] == model["weights"] == 124_000_000 * 2
    assert est.breakdown["model_forward_batch"] == model["forward_batch"] == 32 * 128 * 768 * 16 * 2
    assert est.breakdown["model_attention_scores"] == model["attention_scores"]
    assert est.breakdown["mixing_window"] == 2 * 256 * 128 * (768 + 3072) * 4  # read + next, per hook, float32
    assert sum(est.breakdown.values()) == est.total_bytes
    streamed = sum(est.breakdown[t] for t in STREAM_TERMS)
    headroom = int(memory.ALLOCATOR_HEADROOM * (est.phases[est.peak_phase] + streamed))
    assert est.breakdown["allocator_headroom"] == headroom
    assert est.total_bytes - files.total_bytes == streamed + headroom - files.breakdown["allocator_headroom"]
    assert est.breakdown["cuda_context"] == files.breakdown["cuda_context"]  # one context for both
    # a CPU job's RAM: the same terms (no CUDA context or NCCL), and no file loader
    cpu = memory.host_bytes(cfg, 2, 3072, on_gpu=False, stream=stream)
    per_rank = est.total_bytes - est.breakdown["cuda_context"] - est.breakdown["nccl_buffers"]
    assert cpu == memory.job_host_bytes(per_rank, 2)
    # on GPUs the host stages the model's weights
    assert memory.host_bytes(cfg, 2, 3072, on_gpu=True, stream=stream) == memory.job_host_bytes(model["weights"], 2)
    # a kept stream (cache_to): up to three more windows per hook wait for the writer
    kept = memory.estimate(cfg, 2, d_in=3072, stream=dataclasses.replace(stream, kept=True))
    assert kept.breakdown["kept_windows"] == 3 * 256 * 128 * (768 + 3072) * 4 and "kept_windows" not in est.breakdown


def test_batch_that_does_not_split_is_a_config_error_naming_both_numbers():
    with pytest.raises(ConfigError, match="batch_size 1000 .* 3 ranks"):
        memory.estimate(make_cfg(batch_size=1000), 3, d_in=8)


def test_more_gpus_means_a_smaller_batch_per_gpu():
    cfg = make_cfg(d_sae=32768, batch_size=16384, holdout_tokens=0)
    one, four = (memory.estimate(cfg, n, d_in=1024) for n in (1, 4))
    assert four.per_rank_batch == one.per_rank_batch // 4
    assert four.breakdown["activations_latents"] * 4 == one.breakdown["activations_latents"]
    assert four.breakdown["parameters"] == one.breakdown["parameters"]  # DDP replicates the SAE


def test_dense_architectures_hold_more_batch_memory_than_the_sparse_ones():
    sizes = {
        arch: memory.estimate(make_cfg(architecture=arch, d_sae=16384, batch_size=4096), 1, d_in=768).breakdown
        for arch in ("topk", "standard", "batchtopk", "jumprelu")
    }
    latents = {arch: b["activations_latents"] + b["activations_gradients"] for arch, b in sizes.items()}
    assert latents["topk"] < latents["batchtopk"] and latents["topk"] < latents["standard"] < latents["jumprelu"]
    assert sizes["batchtopk"]["activations_gradients"] == 0  # its backward is sparse too
    assert sizes["topk"]["activations_topk"] > 0 and sizes["standard"]["activations_topk"] == 0


def test_bf16_weights_halve_the_exact_terms_and_autocast_adds_copies():
    fp32, bf16 = (memory.estimate(make_cfg(d_sae=8192, dtype=d), 1, d_in=512) for d in ("float32", "bfloat16"))
    for term in ("parameters", "gradients", "adam_states"):
        assert bf16.breakdown[term] * 2 == fp32.breakdown[term]
    cast = memory.estimate(make_cfg(d_sae=8192, autocast="bf16"), 1, d_in=512)
    assert fp32.breakdown["autocast_copies"] == 0
    assert cast.breakdown["autocast_copies"] >= 512 * 8192 * 2  # at least the bf16 copy of W_enc


def test_the_peak_moment_is_named():
    # A small batch through a wide SAE: evaluation runs in chunks no larger than the batch, after the
    # optimizer state is freed, so it stays below the training step.
    wide = memory.estimate(make_cfg(architecture="standard", d_sae=65536, batch_size=512), 1, d_in=2048)
    assert wide.peak_phase != "evaluation (rank 0)"
    assert wide.phases["evaluation (rank 0)"] < wide.phases["training step"]
    # A huge global batch over many GPUs: every rank inits b_dec from the whole first batch in fp64.
    init = memory.estimate(make_cfg(d_sae=4096, batch_size=262144, holdout_tokens=0), 8, d_in=4096)
    assert init.peak_phase == "b_dec initialisation"
    usual = memory.estimate(make_cfg(d_sae=32768, batch_size=8192), 1, d_in=768)
    assert usual.peak_phase == "training step" and usual.breakdown["other_peak_excess"] == 0


# --------------------------------------------------------------------------- CLI
def write_cfg(tmp_path, **values):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(values))
    return path


def test_cli_estimate_text_and_json(tmp_path, toy_path, capsys):
    path = write_cfg(tmp_path, activation_source=str(toy_path), d_sae=256, batch_size=128, total_steps=10)
    assert cli_estimate.cli_estimate(["--config", str(path), "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "per-GPU estimate" in out and "64 tokens per rank" in out and "Adam states" in out
    assert cli_estimate.cli_estimate(["--config", str(path), "--gpus", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_bytes"] == sum(data["breakdown"].values()) and data["d_in"] == 32


@pytest.mark.parametrize(
    "values, gpus, words",
    [
        ({"d_sae": 256, "total_steps": 1, "colour": "red"}, "1", "colour: unknown key"),
        ({"d_sae": 256, "total_steps": 1, "batch_size": 100}, "3", "batch_size 100 does not divide evenly across 3"),
        ({"d_sae": 256, "total_steps": 1, "activation_source": "/nowhere.safetensors"}, "1", "not found"),
        ({"d_sae": 256, "total_steps": 1}, "0", "--gpus must be at least 1"),
    ],
)
def test_cli_estimate_bad_input_exits_2_with_a_message(tmp_path, toy_path, capsys, values, gpus, words):
    values = {"activation_source": str(toy_path), **values}
    path = write_cfg(tmp_path, **values)
    assert cli_estimate.cli_estimate(["--config", str(path), "--gpus", gpus]) == 2
    assert words in capsys.readouterr().err


def test_cli_estimate_missing_config_file(tmp_path, capsys):
    assert cli_estimate.cli_estimate(["--config", str(tmp_path / "absent.json")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_micro_batches_shrink_the_activation_terms_only():
    whole = memory.estimate(make_cfg(d_sae=32768, batch_size=8192), 1, d_in=768)
    micro = memory.estimate(make_cfg(d_sae=32768, batch_size=8192, micro_batch_size=1024), 1, d_in=768)
    assert micro.breakdown["activations_latents"] * 8 == pytest.approx(whole.breakdown["activations_latents"], rel=0.01)
    for term in ("parameters", "gradients", "adam_states"):
        assert micro.breakdown[term] == whole.breakdown[term]
    assert micro.total_bytes < whole.total_bytes


@pytest.mark.parametrize("cpu_procs", [1, 2])
def test_a_cpu_jobs_ram_includes_each_ranks_read_ahead_and_ready_batches(cpu_procs):
    small = make_cfg(shuffle_buffer_bytes=2**20)
    large = small.model_copy(update={"shuffle_buffer_bytes": 2**30 + 2**20})
    # Two windows' worth read ahead, shared by the ranks: 2 GiB more in all, however many processes.
    assert memory.host_bytes(large, cpu_procs, 768) - memory.host_bytes(small, cpu_procs, 768) == 2 * 2**30
    per_rank_batch = small.per_rank_batch(cpu_procs)
    assert small.loader_bytes(cpu_procs, 768) == 2 * 2**20 // cpu_procs + 4 * per_rank_batch * 768 * 4
