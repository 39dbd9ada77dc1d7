"""The coefficient of a sparsity penalty (standard, jumprelu, gated): ramped up over the warm-up, and, with
`target_l0`, adapted every step until the batches' L0 is the one asked for.

How it adapts: after each optimizer step (once the warm-up is over) the log of the base coefficient moves by
TARGET_L0_RATE × log(L0 / target_l0), the ratio clamped to [1/e, e], with L0 the mean active latents per
token of the whole global batch (averaged over the ranks, so 1 and N ranks adapt alike). Too many active
latents raise the coefficient, too few lower it, by at most 1 % a step: a factor of ~2.7 per 100 steps while
far off, proportionally less near the target. It is a buffer of the module, so checkpoints hold it and a
resume continues exactly. Each metrics record logs it as `sparsity_coefficient`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...architectures.groups import PenaltyOptions, TargetL0Options
from .base import StepContext, all_ranks_mean

TARGET_L0_RATE = 0.01  # per step, in log space (see above)
MAX_LOG_RATIO = 1.0  # log(L0 / target) is clamped to ±1: one wild batch moves the coefficient by at most 1 %
MIN_COEFFICIENT = 1e-8  # where a zero l1_coefficient starts when a target has to move it


class SparsityPenalty(nn.Module):
    log_base: torch.Tensor | None

    def __init__(self, options: PenaltyOptions, device: torch.device | str | None = None):
        super().__init__()
        self.options = options
        self.target = options.target_l0 if isinstance(options, TargetL0Options) else None
        if self.target is None:
            self.register_buffer("log_base", None)
        else:
            start = math.log(max(options.l1_coefficient, MIN_COEFFICIENT))
            self.register_buffer("log_base", torch.tensor(start, dtype=torch.float64, device=device))

    def coefficient(self, ctx: StepContext) -> torch.Tensor | float:
        """The penalty's weight at this step: the warm-up ramp times the (adapted) base coefficient."""
        warmup = self.options.effective_l1_warmup_steps(ctx.total_steps)
        ramp = min(1.0, (ctx.step + 1) / warmup) if warmup else 1.0
        if self.log_base is None:
            return self.options.l1_coefficient * ramp
        return (self.log_base.exp() * ramp).float()

    @torch.no_grad()
    def adapt(self, ctx: StepContext, l0: torch.Tensor) -> None:
        """Move the base coefficient towards the target L0 (after the warm-up; no host sync)."""
        if self.log_base is None or self.target is None:
            return
        if ctx.step < self.options.effective_l1_warmup_steps(ctx.total_steps):
            return
        ratio = all_ranks_mean(l0.detach().double()).clamp_min(1e-3) / self.target
        self.log_base += TARGET_L0_RATE * ratio.log().clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)

    def stats(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """What a metrics record shows of the penalty."""
        coefficient = self.coefficient(ctx)
        return {"sparsity_coefficient": torch.as_tensor(coefficient, dtype=torch.float32)}
