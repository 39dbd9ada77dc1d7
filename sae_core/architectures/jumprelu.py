"""JumpReLU: ReLU above a learned per-latent threshold, trained with a sparsity penalty through straight-through
estimators (Rajamanoharan et al. 2024), in SAELens 6.48+'s recipe: the threshold is a parameter of its own
(not exp(log_threshold), whose Adam steps barely move a small threshold), started at 0.01 with bandwidth 0.05,
and the penalty is DeepMind's L0 (`step`), Anthropic's `tanh`, or Gemma Scope 2's `quadratic` around
`target_l0`; Anthropic's pre-activation loss optionally pushes dead latents back above their threshold."""

from __future__ import annotations

from typing import Literal

from ..limits import MAX_COEFFICIENT
from .base import Architecture, ArchitectureOptions, MemoryTerms, option
from .groups import TargetL0Options

SparsityLoss = Literal["step", "tanh", "quadratic"]


class JumpReLUOptions(TargetL0Options):
    l1_coefficient: float = option(
        5.0, ge=0, le=MAX_COEFFICIENT, label="Sparsity coefficient",
        help="Weight of the sparsity penalty (jumprelu_sparsity_loss_mode): L0 through a straight-through "
        "estimator (step), Σ tanh(c·z·‖W_dec‖) (tanh), or 2/target·(L0 − target)² (quadratic).",
    )  # fmt: skip
    jumprelu_sparsity_loss_mode: SparsityLoss = option(
        "step", label="Sparsity loss",
        help="step: DeepMind's L0; tanh: Anthropic's; quadratic: Gemma Scope 2's, around target_l0.",
    )  # fmt: skip
    jumprelu_init_threshold: float = option(
        0.01, gt=0, le=MAX_COEFFICIENT, label="Initial threshold", advanced=True,
        help="Every latent's threshold at the start.",
    )  # fmt: skip
    jumprelu_bandwidth: float = option(
        0.05, gt=0, le=MAX_COEFFICIENT, label="STE bandwidth", advanced=True,
        help="Width of the straight-through estimator's rectangle kernel.",
    )  # fmt: skip
    jumprelu_tanh_scale: float = option(
        4.0, gt=0, le=MAX_COEFFICIENT, label="tanh scale", advanced=True,
        help="c in the tanh sparsity loss (jumprelu_sparsity_loss_mode tanh).",
    )  # fmt: skip
    pre_act_loss_coefficient: float | None = option(
        None, ge=0, le=MAX_COEFFICIENT, label="Pre-activation loss", advanced=True,
        help="Weight of Anthropic's pre-activation loss on dead latents, Σ relu(θ − pre)·‖W_dec‖ (3e-6 in their "
        "setup); empty: off.",
    )  # fmt: skip

    def option_problems(self, d_sae: int) -> list[str]:
        problems = super().option_problems(d_sae)
        if self.jumprelu_sparsity_loss_mode == "quadratic" and self.target_l0 is None:
            problems.append("jumprelu_sparsity_loss_mode 'quadratic' needs target_l0 (the L0 it is centred on)")
        return problems


def jumprelu_memory(options: ArchitectureOptions, d_in: int) -> MemoryTerms:  # noqa: ARG001
    """parameters per latent: b_enc, and the threshold in float32. forward: pre-activations, latents, the step's output (3f) and a mask (1), plus the tanh loss's and the
    pre-activation loss's products (1f each); backward: the two straight-through kernels (6f + 1)."""
    assert isinstance(options, JumpReLUOptions)
    extra = int(options.jumprelu_sparsity_loss_mode == "tanh") + int(options.pre_act_loss_coefficient is not None)
    return MemoryTerms(
        float32_parameters_per_latent=1,
        forward_per_latent=(3 + extra, 1),
        backward_per_latent=(6, 1),
        eval_per_latent=13,
    )


ARCHITECTURE = Architecture(
    name="jumprelu",
    description="ReLU above a learned threshold + L0 (or tanh) penalty",
    options=JumpReLUOptions,
    engine="sae_core.engine.saes.jumprelu:JumpReLUSAE",
    transcoder_saved_as="jumprelu_transcoder",
    memory=jumprelu_memory,
)
