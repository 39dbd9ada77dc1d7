"""The coefficient of a sparsity penalty (standard, jumprelu, gated): ramped up over the warm-up, and, with
`target_l0`, adapted every step until the batches' L0 is the one asked for.

How it adapts: the error is e = log(L0 / target_l0), with L0 the mean active latents per token of the whole
global batch (averaged over the ranks, so 1 and N ranks adapt alike). After each optimizer step, once the
warm-up is over, the log of the coefficient moves by TARGET_L0_RATE × (e + TARGET_L0_HORIZON × ė), clamped to
±TARGET_L0_RATE, where ė is the error's recent change per step (an exponential average). The second term is
what keeps L0 from overshooting: Adam moves the thresholds (and biases) that set L0 at about lr a step
whatever the coefficient, so L0 answers a change of it only over a hundred steps or so; a coefficient that
kept rising until L0 reached the target would carry L0 far past it, and a JumpReLU latent pushed far above
its activations gets no gradient to come back. With the trend counted, the coefficient stops rising as soon
as L0 is on course to reach the target within the horizon. It is a buffer of the module, so checkpoints hold
it (and the error's trend) and a resume continues exactly. Each metrics record logs it as
`sparsity_coefficient`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...architectures.groups import PenaltyOptions, TargetL0Options
from .base import StepContext, all_ranks_mean

TARGET_L0_RATE = 0.02  # the most the log-coefficient moves in a step: a factor of ~e every 50 steps
TARGET_L0_HORIZON = 200.0  # steps: an error shrinking by e/200 a step is on course; the coefficient holds
TREND_DECAY = 0.95  # the error's change per step is averaged over ~20 steps (a batch's L0 is noisy)
MIN_COEFFICIENT = 1e-8  # where a zero l1_coefficient starts when a target has to move it


class SparsityPenalty(nn.Module):
    log_base: torch.Tensor | None
    error: torch.Tensor | None
    trend: torch.Tensor | None

    def __init__(self, options: PenaltyOptions, device: torch.device | str | None = None):
        super().__init__()
        self.options = options
        self.target = options.target_l0 if isinstance(options, TargetL0Options) else None
        if self.target is None:
            for name in ("log_base", "error", "trend"):
                self.register_buffer(name, None)
        else:
            start = math.log(max(options.l1_coefficient, MIN_COEFFICIENT))
            self.register_buffer("log_base", torch.tensor(start, dtype=torch.float64, device=device))
            self.register_buffer("error", torch.tensor(math.nan, dtype=torch.float64, device=device))
            self.register_buffer("trend", torch.zeros((), dtype=torch.float64, device=device))

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
        if self.log_base is None or self.error is None or self.trend is None or self.target is None:
            return
        error = (all_ranks_mean(l0.detach().double()).clamp_min(1e-3) / self.target).log()
        change = torch.nan_to_num(error - self.error)  # the first step has no earlier error: no trend yet
        self.trend.mul_(TREND_DECAY).add_((1 - TREND_DECAY) * change)
        self.error.copy_(error)
        if ctx.step >= self.options.effective_l1_warmup_steps(ctx.total_steps):
            push = (error + TARGET_L0_HORIZON * self.trend).clamp(-1.0, 1.0)
            self.log_base += TARGET_L0_RATE * push

    def stats(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """What a metrics record shows of the penalty."""
        coefficient = self.coefficient(ctx)
        return {"sparsity_coefficient": torch.as_tensor(coefficient, dtype=torch.float32)}
