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
def init_from_data(
    model: SparseAutoencoder, first_batch: torch.Tensor, method: str, target: torch.Tensor | None = None
) -> None:
    """Scale inputs so E‖x‖² = d_in, and start b_dec at the data's centre (same on every rank). A transcoder's
    target rows (`target`, what it predicts) get their own scale (E‖y‖² = d_out) and start b_dec at their
    centre; its inputs are centred on their mean (b_in)."""
    x = first_batch.double()
    scale = input_scale_of(x)
    model.input_scale.fill_(float(scale))
    x = x * scale
    if model.transcoder:
        if target is None:
            raise ValueError("a transcoder initialises from its target rows too")
        model.b_in.copy_(x.mean(0))
        y = target.double()
        target_scale = input_scale_of(y)
        model.target_scale.fill_(float(target_scale))
        x = y * target_scale
    if method == "mean":
        model.b_dec.copy_(x.mean(0))
    elif method == "geometric_median":
        model.b_dec.copy_(geometric_median(x))


def input_scale_of(rows: torch.Tensor) -> torch.Tensor:
    """The factor that gives rows [N, D] a mean norm of sqrt(D) (E‖x‖² ≈ D)."""
    return math.sqrt(rows.shape[1]) / rows.norm(dim=1).mean().clamp_min(1e-12)
