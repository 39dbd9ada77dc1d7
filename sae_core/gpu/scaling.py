"""Predicted multi-GPU speed-up of a training run: per-rank compute plus the gradient all-reduce.

With the global batch split over N ranks, each rank computes 1/N of the step; DDP then all-reduces every
gradient (a ring all-reduce moves 2·(N−1)/N of the gradient bytes over the slowest link, plus a latency per
hop). DDP overlaps part of that traffic with the backward pass (`overlap`, 0 = none is hidden). So

    step(N) = (compute(1) − fixed) / N + fixed + (1 − overlap) · allreduce(N)     speed-up(N) = compute(1) / step(N)

where `fixed` is the per-step work every rank does in full whatever N (the Adam update and decoder
renormalisation over all parameters): negligible on a GPU, a visible share on a CPU.

compute(1) is measured on one device (a job's own step time, or `bench/scaling.py`); link bandwidth comes
from NVML's PCIe generation/width or NVLink count (`link_bandwidth`).

A sweep steps its members one after another on each batch, so its step is the sum of theirs: in layout "batch"
each member's step(N) as above (its share of the batch, its own all-reduce); in layout "members" the largest sum
of whole-batch compute(1) over the members one GPU holds (no all-reduce) (`predict_sweep`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory import members_on_ranks, parameter_bytes  # the gradients DDP all-reduces have the parameters' size

PCIE_LANE_BYTES_PER_S = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}
PCIE_EFFICIENCY = 0.8  # protocol overhead: a x16 gen4 link moves ~25 of its 31.5 GB/s in practice
NVLINK_BYTES_PER_S_PER_LINK = 25e9  # per direction, NVLink 3/4 class
DEFAULT_LATENCY_S = 20e-6  # per ring hop (NCCL over PCIe/NVLink is ~5-30 µs)
PCIE4_X16_BYTES_PER_S = PCIE_LANE_BYTES_PER_S[4] * 16 * PCIE_EFFICIENCY  # when NVML reports no link


@dataclass(frozen=True)
class ScalingPrediction:
    gpus: int
    compute_s: float  # per-rank compute per step
    allreduce_s: float  # gradient all-reduce per step (before overlap)
    step_s: float
    speedup: float  # tokens/s relative to one GPU

    def label(self) -> str:
        return f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}: ≈{self.speedup:.1f}× tokens/s"


def allreduce_seconds(nbytes: int, world_size: int, bandwidth: float, latency_s: float = DEFAULT_LATENCY_S) -> float:
    """Ring all-reduce time of `nbytes` over `world_size` ranks on links of `bandwidth` bytes/s."""
    if world_size <= 1:
        return 0.0
    hops = 2 * (world_size - 1)
    return hops / world_size * nbytes / bandwidth + hops * latency_s


def predict(
    compute_one_s: float,
    gradient_bytes: int,
    world_size: int,
    bandwidth: float,
    overlap: float = 0.0,
    latency_s: float = DEFAULT_LATENCY_S,
    fixed_s: float = 0.0,
) -> ScalingPrediction:
    if compute_one_s <= 0 or bandwidth <= 0 or world_size < 1 or not 0 <= overlap <= 1:
        raise ValueError("compute time and bandwidth must be positive, world_size ≥ 1, overlap in [0, 1]")
    if not 0 <= fixed_s <= compute_one_s:
        raise ValueError("fixed_s must be between 0 and the one-device step time")
    compute = (compute_one_s - fixed_s) / world_size + fixed_s
    comm = allreduce_seconds(gradient_bytes, world_size, bandwidth, latency_s)
    step = compute + (1 - overlap) * comm
    return ScalingPrediction(world_size, compute, comm, step, compute_one_s / step)


def predict_many(compute_one_s: float, gradient_bytes: int, bandwidth: float, counts=(2, 4, 8), **kw) -> list:
    return [predict(compute_one_s, gradient_bytes, n, bandwidth, **kw) for n in counts]


def link_bandwidth(pcie_gen: int | None, pcie_width: int | None, nvlinks: int = 0) -> float | None:
    """Usable bytes/s between two GPUs: NVLink when present, else the PCIe link (None if unknown)."""
    if nvlinks:
        return nvlinks * NVLINK_BYTES_PER_S_PER_LINK
    if pcie_gen in PCIE_LANE_BYTES_PER_S and pcie_width:
        return PCIE_LANE_BYTES_PER_S[pcie_gen] * pcie_width * PCIE_EFFICIENCY
    return None


# -- What the Train page shows next to the GPU selection ---------------------------------------------

# Dense matmul rates (FLOP/s) by GPU name fragment: fp32 (no TF32) and bf16, vendor datasheet figures.
# The compute estimate only sets the compute/communication ratio; a measured step time is better when known.
MATMUL_RATES = {
    "H200": (67e12, 989e12),
    "H100": (60e12, 800e12),
    "A100": (19.5e12, 312e12),
    "L40": (90e12, 181e12),
    "A6000": (38e12, 155e12),
    "4090": (82e12, 165e12),
    "V100": (15.7e12, 125e12),
}
DEFAULT_RATES = (20e12, 100e12)


def estimate_compute_seconds(cfg, d_in: int, gpu_name: str = "") -> float:
    """One optimizer step of the whole global batch on one GPU of `gpu_name`."""
    fp32, bf16 = next((rates for key, rates in MATMUL_RATES.items() if key in gpu_name.upper()), DEFAULT_RATES)
    rate = bf16 if cfg.autocast == "bf16" or cfg.dtype == "bfloat16" else fp32
    # a step's cost over its encoder matmul is the architecture's (architectures/<name>.py)
    return cfg.arch.step_over_floor * 2 * cfg.batch_size * d_in * cfg.d_sae / rate


def speedup_labels(cfg, d_in: int, gpus, counts=(2, 4, 8)) -> list[str]:
    """'2 GPUs: ≈1.8× tokens/s' for the counts that fit on this machine; `gpus` are GpuInfo-like rows."""
    gpus = list(gpus)
    usable = [n for n in counts if n <= len(gpus)]
    if not usable:
        return []
    bandwidth = _bandwidth(gpus)
    compute = estimate_compute_seconds(cfg, d_in, gpus[0].name or "")
    return [p.label() for p in predict_many(compute, parameter_bytes(cfg, d_in), bandwidth, counts=usable)]


def _bandwidth(gpus: list) -> float:
    """The slowest link between the GPUs, at its maximum: an idle GPU reports a downshifted current generation
    (often gen 1)."""
    links = [
        link_bandwidth(
            getattr(g, "pcie_gen_max", None) or g.pcie_gen, getattr(g, "pcie_width_max", None) or g.pcie_width
        )
        for g in gpus
    ]
    return min((b for b in links if b), default=PCIE4_X16_BYTES_PER_S)


# -- A sweep: both layouts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPrediction:
    """A sweep's step on `gpus` GPUs in either layout (None where the layout cannot run there), against its
    step on one GPU (every member one after another on the whole batch)."""

    gpus: int
    one_gpu_s: float
    batch_s: float | None  # each member's share of the batch per GPU, then its own all-reduce
    members_s: float | None  # the fullest GPU's members, each on the whole batch, no all-reduce

    def label(self) -> str:
        parts = [
            f"{layout} ≈{self.one_gpu_s / seconds:.1f}×"
            for layout, seconds in (("batch", self.batch_s), ("members", self.members_s))
            if seconds is not None
        ]
        return f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}: " + ", ".join(parts) + " tokens/s"


def predict_sweep(sweep, d_in: int, world_size: int, bandwidth: float, gpu_name: str = "") -> SweepPrediction:
    """The sweep's step time per layout: "batch" sums the members' predicted multi-GPU steps (each splits the
    batch and all-reduces its own gradients); "members" is the largest sum of whole-batch steps any rank holds."""
    configs = [m.config for m in sweep.members]
    computes = [estimate_compute_seconds(cfg, d_in, gpu_name) for cfg in configs]
    batch_s: float | None = None
    if all(cfg.batch_size % world_size == 0 for cfg in configs):
        batch_s = sum(
            predict(c, parameter_bytes(cfg, d_in), world_size, bandwidth).step_s
            for c, cfg in zip(computes, configs, strict=True)
        )
    members_s: float | None = None
    if world_size <= len(configs):
        members_s = max(sum(computes[i] for i in ranked) for ranked in members_on_ranks(len(configs), world_size))
    return SweepPrediction(world_size, sum(computes), batch_s, members_s)


def sweep_speedup_labels(sweep, d_in: int, gpus, counts=(2, 4, 8)) -> list[str]:
    """'2 GPUs: batch ≈1.8×, members ≈2.0× tokens/s' for the counts that fit on this machine."""
    gpus = list(gpus)
    usable = [n for n in counts if n <= len(gpus)]
    if not usable:
        return []
    bandwidth = _bandwidth(gpus)
    return [predict_sweep(sweep, d_in, n, bandwidth, gpus[0].name or "").label() for n in usable]
