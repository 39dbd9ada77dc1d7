"""Standard SAE: ReLU latents; the L1 penalty is weighted by decoder row norms (so shrinking the decoder cannot
buy sparsity), its coefficient ramped up and, with `target_l0`, adapted (penalty.py)."""

from __future__ import annotations

import torch

from ...architectures.groups import PenaltyOptions
from ...architectures.standard import ARCHITECTURE
from .base import SparseAutoencoder, StepContext, StepOutput
from .penalty import SparsityPenalty


class StandardSAE(SparseAutoencoder):
    spec = ARCHITECTURE
    options: PenaltyOptions

    def __init__(self, d_in: int, d_sae: int, options: PenaltyOptions | None = None, **base):
        super().__init__(d_in, d_sae, options, **base)
        self.penalty = SparsityPenalty(self.options, self.W_enc.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_activations(x).relu()

    def training_step(
        self,
        x: torch.Tensor,
        ctx: StepContext | None = None,
        reference: bool = False,  # noqa: ARG002  (a dense step is its own reference)
        target: torch.Tensor | None = None,
    ) -> StepOutput:
        ctx = ctx or StepContext()
        y = self.target_of(x, target)
        z = self.pre_activations(x).relu()
        x_hat = self.decode(z, x)
        l1 = (z * self.W_dec.norm(dim=1)).sum(-1).mean()
        losses = {"mse": (x_hat - y).square().sum(-1).mean(), "l1": self.penalty.coefficient(ctx) * l1}
        out = self.dense_output(x_hat, z, losses)
        out.stats = self.penalty.stats(ctx)
        return out

    def after_optimizer_step(self, out: StepOutput, ctx: StepContext) -> None:
        self.penalty.adapt(ctx, out.l0)
