"""Evaluation of a trained SAE: holdout FVU and L0 with the saved encoder, and feature recovery (mmcs)."""

from __future__ import annotations

import torch

from .saelens import exported_copy
from .saes import SparseAutoencoder


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, data, holdout_rows, device, chunk: int = 4096, targets=None) -> dict:
    """Holdout FVU = Σ‖y−ŷ‖² / Σ‖y−ȳ‖² and L0 with the saved (inference) encoder on raw inputs, where y is the
    input itself, or for a transcoder its target: the same rows of `targets` (the module's output)."""
    figures: dict = {}
    if len(holdout_rows):
        inference = exported_copy(sae, device)
        err = sq = 0.0
        l0 = 0.0
        total = torch.zeros(sae.d_out, dtype=torch.float64, device=device)
        for start in range(0, len(holdout_rows), chunk):
            rows = holdout_rows[start : start + chunk]
            x = torch.as_tensor(data.read(rows)).to(device)
            y = x if targets is None else torch.as_tensor(targets.read(rows)).to(device)
            z = inference.encode(x)
            y_hat = inference.decode(z, x)
            err += float((y - y_hat).double().pow(2).sum())
            sq += float(y.double().pow(2).sum())
            total += y.double().sum(0)
            l0 += float((z > 0).sum())
        n = len(holdout_rows)
        total_var = sq - float((total / n).pow(2).sum()) * n
        figures.update(fvu=err / total_var if total_var > 0 else None, l0=l0 / n, holdout_tokens=n)
    if data.features is not None:
        figures["mmcs"] = mean_max_cosine(torch.as_tensor(data.features).to(device), sae.W_dec.detach())
    return figures


def mean_max_cosine(features: torch.Tensor, W_dec: torch.Tensor) -> float:
    """Mean over ground-truth features of the best cosine similarity with any decoder row."""
    f = torch.nn.functional.normalize(features.float(), dim=1)
    d = torch.nn.functional.normalize(W_dec.float(), dim=1)
    return float((f @ d.t()).max(dim=1).values.mean())
