"""Matryoshka BatchTopK SAE: BatchTopK's selection over all latents, and every nested prefix of the latents
(`matryoshka_widths`) reconstructs the input on its own: the loss adds `inner_mse_<width>` for each inner
prefix to the full reconstruction's `mse` (Bussmann et al. 2025). Saved as a JumpReLU, as SAELens does.

On the sparse path the selected pairs are split by level (the prefix a latent first belongs to); each level is
decoded once and the nested reconstructions are running sums of the levels, so the decode costs what
BatchTopK's does plus one [B, d_in] sum and squared error per level.
"""

from __future__ import annotations

import torch

from ...architectures.matryoshka_batchtopk import ARCHITECTURE, MatryoshkaOptions
from ..sparse import LatentLayout, SquaredError, sparse_decode
from .batchtopk import BatchTopKSAE
from .topk import SelectedLatents


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    spec = ARCHITECTURE
    options: MatryoshkaOptions

    def __init__(self, d_in: int, d_sae: int, options: MatryoshkaOptions | None = None, **base):
        super().__init__(d_in, d_sae, options, **base)
        self.widths = self.options.effective_widths(d_sae)

    def reconstruction_losses(
        self, x: torch.Tensor, y: torch.Tensor, selected: SelectedLatents
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows = selected.layout.pair_rows
        assert rows is not None, "BatchTopK selects a flat list of pairs"
        bounds = torch.tensor(self.widths, device=selected.idx.device)
        level_of_pair = torch.searchsorted(bounds, selected.idx, right=True)  # the first prefix holding it
        partial = self.decoder_offset(x).expand_as(y)
        inner: dict[str, torch.Tensor] = {}
        for level, width in enumerate(self.widths):
            with torch.no_grad():
                pairs = (level_of_pair == level).nonzero().squeeze(1)  # row-major order is kept
                idx, pair_rows = selected.idx[pairs], rows[pairs]
                layout = LatentLayout(idx, self.d_sae, pair_rows, batch=len(x), kernels=self.kernels)
            partial = partial + sparse_decode(selected.vals[pairs], idx, self.W_dec, layout)
            if width < self.d_sae:
                inner[f"inner_mse_{width}"] = SquaredError.apply(partial, y)
        return partial, {"mse": SquaredError.apply(partial, y), **inner}

    def dense_extra_losses(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        inner = {}
        for width in self.widths[:-1]:
            partial = z[:, :width] @ self.W_dec[:width] + self.decoder_offset(x)
            inner[f"inner_mse_{width}"] = (partial - y).square().sum(-1).mean()
        return inner
