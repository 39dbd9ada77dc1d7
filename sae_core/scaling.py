"""Predicted multi-GPU speed-up of a training run: per-rank compute plus the gradient all-reduce.

With the global batch split over N ranks, each rank computes 1/N of the step; DDP then all-reduces every
gradient (a ring all-reduce moves 2·(N−1)/N of the gradient bytes over the slowest link, plus a latency per
hop). DDP overlaps part of that traffic with the backward pass (`overlap`, 0 = none is hidden). So

    step(N) = compute(1) / N + (1 − overlap) · allreduce(N)        speed-up(N) = compute(1) / step(N)

compute(1) is measured on one device (a job's own step time, or `bench/scaling.py`); link bandwidth comes
from NVML's PCIe generation/width or NVLink count (`link_bandwidth`).
"""

from __future__ import annotations

from dataclasses import dataclass

PCIE_LANE_BYTES_PER_S = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}
PCIE_EFFICIENCY = 0.8  # protocol overhead: a x16 gen4 link moves ~25 of its 31.5 GB/s in practice
NVLINK_BYTES_PER_S_PER_LINK = 25e9  # per direction, NVLink 3/4 class
DEFAULT_LATENCY_S = 20e-6  # per ring hop (NCCL over PCIe/NVLink is ~5-30 µs)


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
) -> ScalingPrediction:
    if compute_one_s <= 0 or bandwidth <= 0 or world_size < 1 or not 0 <= overlap <= 1:
        raise ValueError("compute time and bandwidth must be positive, world_size ≥ 1, overlap in [0, 1]")
    compute = compute_one_s / world_size
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
