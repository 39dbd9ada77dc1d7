"""A sweep's memory per GPU in either layout, and its predicted step: built from the single run's terms."""

from __future__ import annotations

import pytest

from sae_core.config import ConfigError
from sae_core.gpu import memory, scaling
from sae_core.sweep import sweep_from_dict

D_IN = 64
BASE = {"activation_source": "unused.safetensors", "batch_size": 256, "total_steps": 10, "k": 8}


def sweep_of(grid: dict, **base):
    return sweep_from_dict({**BASE, **base, "sweep": grid})


def held(est: memory.MemoryEstimate) -> int:
    """Parameters, gradients, DDP buckets, Adam states and counters: what an SAE holds all run long."""
    names = ("parameters", "gradients", "ddp_buckets", "adam_states", "latent_statistics")
    return sum(est.breakdown[name] for name in names)


def kept(cfg, batch: int) -> int:
    """The loop keeps each SAE's last batch (fp32) and reconstruction for logging."""
    return batch * D_IN * (4 + memory.dtype_bytes(cfg.dtype))


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("layout", ["batch", "members"])
def test_a_sweep_of_one_is_the_single_runs_estimate(ranks, layout):
    sweep = sweep_of({"d_sae": [512]})
    single = memory.estimate(sweep.shared, ranks, D_IN)
    if layout == "members" and ranks > 1:
        with pytest.raises(ConfigError, match="2 ranks for 1 member"):
            memory.sweep_estimate(sweep, ranks, D_IN, layout)
        return
    got = memory.sweep_estimate(sweep, ranks, D_IN, layout)
    assert got.worst.to_dict() == single.to_dict() and got.total_bytes == single.total_bytes


def test_batch_layout_holds_every_member_and_one_feed_on_each_gpu():
    sweep = sweep_of({"d_sae": [512, 2048], "architecture": ["topk", "batchtopk"]})
    members = [m.config for m in sweep.members]
    singles = [memory.estimate(cfg, 2, D_IN) for cfg in members]
    got = memory.sweep_estimate(sweep, 2, D_IN, "batch")
    (group,) = got.ranks
    assert got.members == [[m.name for m in sweep.members]] and group.per_rank_batch == 128
    # What every member holds all run long adds up
    for name in ("parameters", "gradients", "adam_states", "latent_statistics"):
        assert group.breakdown[name] == sum(s.breakdown[name] for s in singles)
    # One member steps at a time on the batch read once: its step's tensors (the feed among them), beside what
    # the others hold and keep
    others = [held(s) + kept(cfg, 128) for s, cfg in zip(singles, members, strict=True)]
    expected = max(s.phases["training step"] + sum(others) - others[i] for i, s in enumerate(singles))
    assert group.phases["training step"] == expected
    assert group.phases["training step"] < sum(s.phases["training step"] for s in singles)
    # b_dec init: every member's weights, the first global batch's temporaries once
    init = memory.INIT_BYTES_PER_ELEMENT * 256 * D_IN
    assert group.phases["b_dec initialisation"] == sum(s.phases["b_dec initialisation"] for s in singles) - 3 * init
    assert group.total_bytes == sum(group.breakdown.values())
    assert (
        group.breakdown["nccl_buffers"] == memory.NCCL_BYTES
        and group.breakdown["cuda_context"] == memory.CUDA_CONTEXT_BYTES
    )


def test_members_layout_deals_members_round_robin_on_whole_batches():
    sweep = sweep_of({"d_sae": [256, 512, 1024, 2048, 4096]})
    got = memory.sweep_estimate(sweep, 2, D_IN, "members")
    names = [m.name for m in sweep.members]
    assert got.members == [names[0::2], names[1::2]]
    for group, rank in zip(got.members, got.ranks, strict=True):
        configs = [sweep.member(name).config for name in group]
        assert rank.per_rank_batch == 256  # no split: each rank trains its members on the whole batch
        assert rank.to_dict() == memory.group_estimate(configs, 1, D_IN, 2).to_dict()
    assert (
        got.total_bytes == max(r.total_bytes for r in got.ranks) == got.ranks[0].total_bytes
    )  # 256 + 1024 + 4096 latents
    assert got.to_dict()["ranks"][1]["members"] == names[1::2]


def test_wide_members_fit_better_dealt_out_and_a_big_batch_split():
    wide = sweep_of({"d_sae": [65536] * 1, "init_seed": [1, 2, 3, 4]}, batch_size=256)
    assert (
        memory.sweep_estimate(wide, 4, D_IN, "members").total_bytes
        < memory.sweep_estimate(wide, 4, D_IN, "batch").total_bytes
    )
    big_batch = sweep_of({"init_seed": [1, 2]}, d_sae=256, batch_size=65536)
    assert (
        memory.sweep_estimate(big_batch, 2, D_IN, "batch").total_bytes
        < memory.sweep_estimate(big_batch, 2, D_IN, "members").total_bytes
    )


def test_a_layout_that_cannot_run_is_a_config_error():
    sweep = sweep_of({"d_sae": [256, 512]}, batch_size=255)
    with pytest.raises(ConfigError, match="does not divide evenly across 2"):
        memory.sweep_estimate(sweep, 2, D_IN, "batch")
    assert memory.sweep_estimate(sweep, 2, D_IN, "members").total_bytes > 0
    with pytest.raises(ConfigError, match="3 ranks for 2 member"):
        memory.sweep_estimate(sweep, 3, D_IN, "members")


def test_host_ram_of_a_cpu_sweep_counts_one_loader_per_process():
    sweep = sweep_of({"d_sae": [256, 512]})
    for layout, reading in (("batch", 2), ("members", 1)):
        worst = memory.sweep_estimate(sweep, 2, D_IN, layout).worst
        own = worst.total_bytes - worst.breakdown["cuda_context"] - worst.breakdown["nccl_buffers"]
        per_rank = sweep.shared.loader_bytes(reading, D_IN) + own
        assert memory.sweep_host_bytes(sweep, 2, D_IN, layout) == memory.job_host_bytes(per_rank, 2)
    on_gpu = memory.sweep_host_bytes(sweep, 2, D_IN, "batch", on_gpu=True)
    assert on_gpu == memory.job_host_bytes(sweep.shared.loader_bytes(2, D_IN), 2)


def test_scaling_predicts_both_layouts():
    sweep = sweep_of({"init_seed": [1, 2, 3, 4]}, d_sae=16384)
    cfg = sweep.shared
    one = scaling.estimate_compute_seconds(cfg, D_IN, "H100")
    bandwidth = 25e9
    two = scaling.predict_sweep(sweep, D_IN, 2, bandwidth, "H100")
    assert two.one_gpu_s == pytest.approx(4 * one)
    assert two.members_s == pytest.approx(2 * one)  # two members a GPU, whole batches, no all-reduce
    per_member = scaling.predict(one, memory.parameter_bytes(cfg, D_IN), 2, bandwidth).step_s
    assert two.batch_s == pytest.approx(4 * per_member)  # each member splits the batch and all-reduces
    assert two.label() == f"2 GPUs: batch ≈{4 * one / two.batch_s:.1f}×, members ≈2.0× tokens/s"
    uneven = scaling.predict_sweep(sweep_of({"init_seed": [1, 2, 3]}, d_sae=16384), D_IN, 2, bandwidth, "H100")
    assert uneven.members_s == pytest.approx(2 * one)  # the fullest GPU sets the pace
    assert scaling.predict_sweep(sweep, D_IN, 8, bandwidth).members_s is None  # more GPUs than members
    odd = sweep_of({"init_seed": [1, 2, 3, 4]}, d_sae=16384, batch_size=250)
    assert scaling.predict_sweep(odd, D_IN, 4, bandwidth).batch_s is None


def test_sweep_speedup_labels_for_this_machines_gpus():
    from types import SimpleNamespace

    gpus = [SimpleNamespace(name="NVIDIA H100", pcie_gen=5, pcie_width=16) for _ in range(2)]
    sweep = sweep_of({"init_seed": [1, 2]}, d_sae=4096)
    (label,) = scaling.sweep_speedup_labels(sweep, D_IN, gpus)
    assert label.startswith("2 GPUs: batch ≈") and "members ≈2.0×" in label
    assert scaling.sweep_speedup_labels(sweep, D_IN, gpus[:1]) == []
