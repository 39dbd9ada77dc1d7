"""Schedules and initialisation, as small pure functions: the learning rate, b_dec from data (a penalty's warm-up
is its architecture's: engine/saes/penalty.py)."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig
from .saes import SparseAutoencoder


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last lr_decay_steps."""
    base = cfg.effective_lr
    warmup, decay = cfg.effective_lr_warmup_steps, cfg.effective_lr_decay_steps
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    decay_start = cfg.total_steps - decay
    if decay and step >= decay_start:
        return base * (cfg.total_steps - step) / decay
    return base


# ---------------------------------------------------------------------------------------------
# Initialisation from data


def geometric_median(points: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to `points` [N, D]."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        median = (weights[:, None] * points).sum(0) / weights.sum()
    return median


@torch.no_grad()
def init_from_data(model: SparseAutoencoder, first_batch: torch.Tensor, method: str) -> None:
    """Scale inputs so E‖x‖² = d_in, and start b_dec at the data's centre (same on every rank)."""
    x = first_batch.double()
    scale = math.sqrt(model.d_in) / x.norm(dim=1).mean().clamp_min(1e-12)
    model.input_scale.fill_(float(scale))
    x = x * scale
    if method == "mean":
        model.b_dec.copy_(x.mean(0))
    elif method == "geometric_median":
        model.b_dec.copy_(geometric_median(x))
