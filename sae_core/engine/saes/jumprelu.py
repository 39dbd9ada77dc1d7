"""JumpReLU SAE: ReLU above a learned per-latent threshold θ, trained through straight-through estimators
(Rajamanoharan et al. 2024) in SAELens 6.48+'s recipe (architectures/jumprelu.py says why).

θ is a float32 parameter whatever the weights' dtype (Adam's ~lr-sized steps on it would round away in
bfloat16), kept non-negative by projecting it after each optimizer step (a clamp inside the graph would zero
its gradient and pin a latent that reaches 0). Checkpoints of the older parametrisation (`log_threshold`)
load as θ = exp(log_threshold).
"""

from __future__ import annotations

import torch
from torch import nn

from ...architectures.jumprelu import ARCHITECTURE, JumpReLUOptions
from .base import SparseAutoencoder, StepContext, StepOutput
from .penalty import SparsityPenalty


class JumpReLUSAE(SparseAutoencoder):
    spec = ARCHITECTURE
    options: JumpReLUOptions

    def __init__(self, d_in: int, d_sae: int, options: JumpReLUOptions | None = None, **base):
        super().__init__(d_in, d_sae, options, **base)
        init = self.options.jumprelu_init_threshold
        self.threshold = nn.Parameter(torch.full((d_sae,), init, dtype=torch.float32, device=self.W_enc.device))
        self.penalty = SparsityPenalty(self.options, self.W_enc.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold.to(pre.dtype))

    def extra_export_tensors(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold.detach().clone()}

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_saved_tensors(tensors)
        self.threshold.copy_(tensors["threshold"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = state_dict.pop(prefix + "log_threshold", None)
        if old is not None:  # a checkpoint of the exp(log_threshold) parametrisation
            state_dict[prefix + "threshold"] = old.float().exp()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def training_step(
        self,
        x: torch.Tensor,
        ctx: StepContext | None = None,
        reference: bool = False,  # noqa: ARG002  (a dense step is its own reference)
        target: torch.Tensor | None = None,
    ) -> StepOutput:
        ctx = ctx or StepContext()
        y = self.target_of(x, target)
        options, bandwidth = self.options, self.options.jumprelu_bandwidth
        pre = self.pre_activations(x)
        threshold = self.threshold.to(pre.dtype)
        z = JumpReLU.apply(pre, threshold, bandwidth)
        x_hat = self.decode(z, x)
        coefficient = self.penalty.coefficient(ctx)
        mode = options.jumprelu_sparsity_loss_mode
        if mode == "tanh":
            sparsity = torch.tanh(options.jumprelu_tanh_scale * z * self.W_dec.norm(dim=1)).sum(-1)
        else:
            per_token_l0 = Step.apply(pre, threshold, bandwidth).sum(-1)
            aim = options.target_l0
            sparsity = per_token_l0 if mode == "step" or aim is None else 2 / aim * (per_token_l0 - aim) ** 2
        losses = {"mse": (x_hat - y).square().sum(-1).mean(), "sparsity": coefficient * sparsity.mean()}
        if options.pre_act_loss_coefficient is not None:
            losses["pre_act"] = options.pre_act_loss_coefficient * self.pre_act_loss(pre, threshold, ctx.dead_mask)
        out = self.dense_output(x_hat, z, losses)
        out.stats = self.penalty.stats(ctx)
        return out

    def pre_act_loss(self, pre: torch.Tensor, threshold: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
        """Anthropic's pre-activation loss, on dead latents only: how far below its threshold each one stays."""
        if dead is None:
            return pre.new_zeros(())
        return ((threshold - pre).relu() * dead * self.W_dec.norm(dim=1)).sum(-1).mean()

    @torch.no_grad()
    def after_optimizer_step(self, out: StepOutput, ctx: StepContext) -> None:
        self.threshold.clamp_(min=0.0)  # below 0 the gate would pass negative pre-activations
        self.penalty.adapt(ctx, out.l0)


def _rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class JumpReLU(torch.autograd.Function):
    """z = pre · H(pre − θ); θ gets a straight-through gradient through a rectangle kernel of width ε."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_threshold = (-(threshold / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0)
        return grad_pre, grad_threshold, None


class Step(torch.autograd.Function):
    """H(pre − θ) for the L0 penalty; straight-through gradient to θ only (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = (-(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad).sum(0)
        return None, grad_threshold, None
