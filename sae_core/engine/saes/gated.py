"""Gated SAE (Rajamanoharan et al. 2024): the gate path π_gate = x_cent·W_enc + b_gate decides which latents
fire, the magnitude path π_mag = x_cent·(W_enc ⊙ exp(r_mag)) + b_mag how strongly: z = 1[π_gate > 0] ·
ReLU(π_mag). The gate learns through two terms, since its step function passes no gradient: the L1 penalty
on ReLU(π_gate) weighted by decoder norms, and `aux`, the reconstruction from ReLU(π_gate) through a frozen
copy of the decoder (the paper's x̂_frozen: it trains the gate, not the decoder).

b_gate is the base class's b_enc (the bias of the shared pre-activation); it is saved under SAELens's name.
"""

from __future__ import annotations

import torch
from torch import nn

from ...architectures.gated import ARCHITECTURE
from ...architectures.groups import PenaltyOptions
from .base import SparseAutoencoder, StepContext, StepOutput
from .penalty import SparsityPenalty


class GatedSAE(SparseAutoencoder):
    spec = ARCHITECTURE
    options: PenaltyOptions

    def __init__(self, d_in: int, d_sae: int, options: PenaltyOptions | None = None, **base):
        super().__init__(d_in, d_sae, options, **base)
        zeros = torch.zeros(d_sae, dtype=self.W_enc.dtype, device=self.W_enc.device)
        self.r_mag = nn.Parameter(zeros.clone())
        self.b_mag = nn.Parameter(zeros.clone())
        self.penalty = SparsityPenalty(self.options, self.W_enc.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        # As SAELens computes it (the same floats as its GatedSAE on the saved file).
        x_cent = x.to(self.W_enc.dtype) - self.b_dec
        gate = (x_cent @ self.W_enc + self.b_enc) > 0
        magnitude = (x_cent @ (self.W_enc * self.r_mag.exp()) + self.b_mag).relu()
        return gate.to(magnitude.dtype) * magnitude

    def extra_export_tensors(self) -> dict[str, torch.Tensor]:
        return {"b_gate": self.b_enc.detach().clone(), "r_mag": self.r_mag.detach().clone(),
                "b_mag": self.b_mag.detach().clone()}  # fmt: skip

    def export_tensors(self) -> dict[str, torch.Tensor]:
        tensors = super().export_tensors()
        del tensors["b_enc"]  # SAELens's gated SAE has b_gate instead
        return tensors

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_saved_tensors({**tensors, "b_enc": tensors["b_gate"]})
        self.r_mag.copy_(tensors["r_mag"])
        self.b_mag.copy_(tensors["b_mag"])

    def training_step(
        self,
        x: torch.Tensor,
        ctx: StepContext | None = None,
        reference: bool = False,  # noqa: ARG002  (a dense step is its own reference)
        target: torch.Tensor | None = None,
    ) -> StepOutput:
        assert target is None, "a gated SAE is no transcoder (its facts say so)"
        ctx = ctx or StepContext()
        shared = (x - self.b_dec) @ self.W_enc  # [B, d_sae]: one matmul serves both paths (r_mag scales columns)
        gate_pre = shared + self.b_enc
        magnitude = (shared * self.r_mag.exp() + self.b_mag).relu()
        z = (gate_pre > 0).to(magnitude.dtype) * magnitude
        x_hat = self.decode(z)
        gate = gate_pre.relu()
        decoder_norms = self.W_dec.norm(dim=1)
        via_gate = gate @ self.W_dec.detach() + self.b_dec.detach()
        losses = {
            "mse": (x_hat - x).square().sum(-1).mean(),
            "l1": self.penalty.coefficient(ctx) * (gate * decoder_norms).sum(-1).mean(),
            "aux": (via_gate - x).square().sum(-1).mean(),
        }
        out = self.dense_output(x_hat, z, losses)
        out.stats = self.penalty.stats(ctx)
        return out
