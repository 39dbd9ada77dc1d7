"""TopK SAE: the k largest pre-activations of each token, with AuxK for dead latents (Gao et al. 2024).

Training takes the sparse step: the encoder's only dense work is its forward matmul, and decoder and encoder
gradients touch the selected latents only (`engine/sparse.py`). BatchTopK and Matryoshka BatchTopK reuse
this step with their own selection (`select`) and reconstruction losses (`reconstruction_losses`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...architectures.groups import TopKFamilyOptions
from ...architectures.topk import ARCHITECTURE
from .. import cpu_kernels
from ..sparse import LatentLayout, SelectedPreActivations, Selection, SquaredError, sparse_decode
from .base import SparseAutoencoder, StepContext, StepOutput


@dataclass
class SelectedLatents:
    """A batch's selected latents on the sparse path: their values (with gradients to the encoder) and the
    pairs' layout, shared by the decode and both backward passes."""

    x_cent: torch.Tensor  # [B, d_in] x − b_dec, without grad
    pre: torch.Tensor  # [B, d_sae] pre-activations, without grad
    vals: torch.Tensor  # relu'd selected values, shaped like idx
    idx: torch.Tensor  # latents: [B, k], or flat with layout.pair_rows
    layout: LatentLayout


class TopKSAE(SparseAutoencoder):
    spec = ARCHITECTURE
    options: TopKFamilyOptions

    def __init__(self, d_in: int, d_sae: int, options: TopKFamilyOptions | None = None, **base):
        super().__init__(d_in, d_sae, options, **base)
        self.k = self.options.k

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def inference_selection(self, x: torch.Tensor) -> Selection | None:
        with torch.no_grad():
            return self.select(torch.addmm(self.b_enc, x - self.encoder_centre, self.W_enc))

    def saved_config(self) -> dict:
        return {"k": self.k}

    @classmethod
    def options_from_saved(cls, saved: dict) -> TopKFamilyOptions:
        options = cls.spec.options.model_validate({"k": int(saved["k"])})
        assert isinstance(options, TopKFamilyOptions)
        return options

    # -- selection: which (row, latent) pairs a batch keeps
    @torch.no_grad()
    def select(self, pre: torch.Tensor) -> Selection:
        return Selection(*cpu_kernels.row_topk(pre, self.k))  # a C kernel on CPU float32, else torch.topk

    def dense_latents(self, pre: torch.Tensor) -> torch.Tensor:
        """The training latents of the dense reference path."""
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def after_selection(self, vals: torch.Tensor, active: torch.Tensor) -> None:
        """What an architecture learns from the batch's selection (BatchTopK's threshold)."""

    # -- training
    def training_step(
        self,
        x: torch.Tensor,
        ctx: StepContext | None = None,
        reference: bool = False,
        target: torch.Tensor | None = None,
    ) -> StepOutput:
        ctx = ctx or StepContext()
        y = self.target_of(x, target)
        if reference:
            return self.dense_step(x, y, ctx)
        selected = self.encode_selected(x)
        x_hat, losses = self.reconstruction_losses(x, y, selected)
        losses["aux"] = self.aux_loss(y, x_hat, selected, ctx.dead_mask)
        active = selected.vals > 0
        self.after_selection(selected.vals.detach(), active)
        # scatter_add rather than bincount: bincount's output size depends on the data (a host sync on CUDA)
        counts = torch.zeros(self.d_sae, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, selected.idx.flatten(), active.flatten().to(torch.int64))
        return StepOutput(x_hat, losses, l0=counts.sum() / len(x), fired_counts=counts)

    def encode_selected(self, x: torch.Tensor) -> SelectedLatents:
        """The sparse step's encoder: no dense [B, d_sae] tensor in the backward pass."""
        centre = self.encoder_centre  # b_dec (its gradient through x_cent comes from SelectedPreActivations)
        with torch.no_grad():
            x_cent = x - centre
            pre = torch.addmm(self.b_enc.to(x.dtype), x_cent, self.W_enc.to(x.dtype))  # [B, d_sae]: the floor
            selection = self.select(pre)
            layout = LatentLayout(selection.idx, self.d_sae, selection.rows, batch=len(x), kernels=self.kernels)
        vals = SelectedPreActivations.apply(
            x_cent, centre, self.W_enc, self.b_enc, selection.values, selection.idx, layout
        ).relu()
        return SelectedLatents(x_cent, pre, vals, selection.idx, layout)

    def reconstruction_losses(
        self, x: torch.Tensor, y: torch.Tensor, selected: SelectedLatents
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reconstruction of y (x itself, or a transcoder's target) from the selected latents of x, and
        its loss terms."""
        x_hat = sparse_decode(selected.vals, selected.idx, self.W_dec, selected.layout) + self.decoder_offset(x)
        return x_hat, {"mse": SquaredError.apply(x_hat, y)}

    def dense_step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepOutput:
        """The plain dense path the sparse step is tested against."""
        pre = self.pre_activations(x)
        z = self.dense_latents(pre)
        x_hat = self.decode(z, x)
        losses = {"mse": (x_hat - y).square().sum(-1).mean(), **self.dense_extra_losses(x, y, z)}
        losses["aux"] = self.dense_aux_loss(y, x_hat, pre, ctx.dead_mask)
        return self.dense_output(x_hat, z, losses)

    def dense_extra_losses(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: ARG002
        """Loss terms beyond the full reconstruction on the dense path (Matryoshka's inner levels)."""
        return {}

    # -- AuxK: the top dead latents reconstruct the residual of the live ones (y: what x_hat reconstructs)
    def dense_aux_loss(self, y, x_hat, pre, dead_mask) -> torch.Tensor:
        aux_k = self.options.effective_aux_k(self.d_in)
        if dead_mask is None or not self.options.aux_k_coefficient:
            return pre.new_zeros(())
        masked = pre.masked_fill(~dead_mask, -torch.inf)
        vals, idx = masked.topk(min(aux_k, self.d_sae), dim=-1, sorted=False)
        vals = torch.where(dead_mask[idx], vals.relu(), torch.zeros_like(vals))
        aux_z = torch.zeros_like(pre).scatter_(-1, idx, vals)
        return self.options.aux_k_coefficient * _aux_from_residual(aux_z @ self.W_dec, y, x_hat, dead_mask)

    def aux_loss(self, y, x_hat, selected: SelectedLatents, dead_mask) -> torch.Tensor:
        """AuxK as in `dense_aux_loss`, through the same sparse functions as the main selection."""
        if dead_mask is None or not self.options.aux_k_coefficient:
            return x_hat.new_zeros(())
        pre = selected.pre
        with torch.no_grad():
            masked = pre.masked_fill(~dead_mask, -torch.inf)
            aux_k = min(self.options.effective_aux_k(self.d_in), self.d_sae)
            aux_idx = masked.topk(aux_k, dim=-1, sorted=False).indices
            layout = LatentLayout(aux_idx, self.d_sae, kernels=self.kernels)  # shared by both backward passes
        values = pre.gather(1, aux_idx)
        x_cent = selected.x_cent
        aux_vals = SelectedPreActivations.apply(
            x_cent, self.encoder_centre, self.W_enc, self.b_enc, values, aux_idx, layout
        )
        aux_vals = torch.where(dead_mask[aux_idx], aux_vals.relu(), torch.zeros_like(aux_vals))
        aux_hat = sparse_decode(aux_vals, aux_idx, self.W_dec, layout)
        return self.options.aux_k_coefficient * _aux_from_residual(aux_hat, y, x_hat, dead_mask)


def _aux_from_residual(aux_hat, y, x_hat, dead_mask) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the top dead latents reconstruct the residual of the live ones.

    Normalised by the number of tokens only, so the loss is the same whether a batch is split across ranks or
    not; multiplied by "any latent dead" on the device so that a caller's conservative guess costs time, never
    exactness."""
    residual = (y - x_hat).detach()
    return (aux_hat - residual).pow(2).sum(-1).mean() * dead_mask.any()
