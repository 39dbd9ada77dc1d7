"""Sparse autoencoder architectures, their training losses, and SAELens-format save/load.

Shapes follow SAELens: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in],
threshold [d_sae] (jumprelu, and batchtopk once saved). Inputs are centred by b_dec before encoding.

Training runs on inputs scaled by `input_scale` (so E‖x‖² ≈ d_in whatever the model); `save` folds that
scale into the weights, so the files on disk work on raw activations with normalize_activations "none".
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import cpu_kernels
from .cpu_kernels import latent_layout, row_topk

# torch says this once per process for the CSR products below; it is noise in every job's log.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

SAE_LENS_VERSION = "6.0.0"  # the SAELens on-disk format we write
WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
SPARSITY_FILE = "sparsity.safetensors"
BATCHTOPK_THRESHOLD_DECAY = 0.99  # EMA of the smallest selected activation per batch


@dataclass
class StepOutput:
    """What one training forward pass produces (all tensors; no host sync here)."""

    loss: torch.Tensor  # scalar to backprop
    x_hat: torch.Tensor  # [B, d_in] reconstruction
    recon_loss: torch.Tensor  # mean over tokens of ‖x − x̂‖²
    sparsity_loss: torch.Tensor  # L1 (standard) or L0 (jumprelu) penalty term, 0 otherwise
    aux_loss: torch.Tensor  # AuxK loss (topk/batchtopk), 0 otherwise
    l0: torch.Tensor  # mean active latents per token
    fired_counts: torch.Tensor  # [d_sae] tokens of this batch on which each latent fired


@dataclass
class Selection:
    """The selected (row, latent) pairs of a batch: TopK's [B, k], or BatchTopK's flat list in row-major
    order (each row holds its own number) with `rows` [P] the batch row of each pair."""

    values: torch.Tensor  # pre-activations without grad, shaped like idx
    idx: torch.Tensor  # latents
    rows: torch.Tensor | None = None


class SparseAutoencoder(nn.Module):
    def __init__(
        self,
        architecture: str,
        d_in: int,
        d_sae: int,
        k: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        jumprelu_init_threshold: float = 0.001,
        jumprelu_bandwidth: float = 0.001,
    ):
        super().__init__()
        if architecture in ("topk", "batchtopk") and not k:
            raise ValueError(f"architecture {architecture!r} needs k")
        self.architecture = architecture
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.bandwidth = jumprelu_bandwidth
        factory = {"dtype": dtype, "device": device}
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, **factory))
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, **factory))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory))
        if architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((d_sae,), math.log(jumprelu_init_threshold), **factory))
        if architecture == "batchtopk":
            # Learned during training as an EMA; used at inference (and saved as jumprelu threshold).
            self.register_buffer("batch_threshold", torch.zeros((), **factory))
        # Not a weight: the factor applied to raw inputs during training; folded in at save.
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg, d_in: int, device: torch.device | str | None = None) -> SparseAutoencoder:
        return cls(
            cfg.architecture,
            d_in,
            cfg.d_sae,
            cfg.k if cfg.architecture in ("topk", "batchtopk") else None,
            dtype=getattr(torch, cfg.dtype),
            device=device,
            jumprelu_init_threshold=cfg.jumprelu_init_threshold,
            jumprelu_bandwidth=cfg.jumprelu_bandwidth,
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.W_dec)
        normalize_decoder_rows(self.W_dec)
        self.W_enc.copy_(self.W_dec.t())  # encoder starts as the decoder's transpose
        self.b_enc.zero_()
        self.b_dec.zero_()

    @property
    def threshold(self) -> torch.Tensor | None:
        if self.architecture == "jumprelu":
            # A loaded SAE keeps the saved threshold bit for bit (exp(log(t)) may differ by an ulp).
            loaded = getattr(self, "loaded_threshold", None)
            return loaded if loaded is not None else self.log_threshold.exp()
        if self.architecture == "batchtopk":
            return self.batch_threshold.expand(self.d_sae)
        return None

    # -- inference (dense latents), identical to what SAELens computes on the saved files
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_enc  # [B, d_sae]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        if self.architecture == "standard":
            return pre.relu()
        if self.architecture == "topk":
            vals, idx = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        return pre.relu() * (pre > self.threshold)  # jumprelu, and batchtopk at inference

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- training
    def training_step(
        self,
        x: torch.Tensor,
        *,
        sparsity_coefficient: float = 0.0,
        dead_mask: torch.Tensor | None = None,
        aux_k: int = 0,
        aux_coefficient: float = 0.0,
        reference: bool = False,
    ) -> StepOutput:
        """Forward pass and loss on a (scaled) batch x [B, d_in].

        `dead_mask` None means "no latent can be dead now" (the trainer knows this without a host sync
        most steps), which skips AuxK. `reference=True` runs the plain dense TopK/BatchTopK path that the
        sparse fast path is tested against."""
        if self.architecture in ("topk", "batchtopk") and not reference:
            return self._sparse_step(x, dead_mask, aux_k, aux_coefficient)
        pre = self.pre_activations(x)
        zero = pre.new_zeros(())
        aux = zero
        if self.architecture == "standard":
            z = pre.relu()
            x_hat = self.decode(z)
            # L1 weighted by decoder row norms, so shrinking the decoder cannot buy sparsity.
            sparsity = (z * self.W_dec.norm(dim=1)).sum(-1).mean()
            active = z > 0
        elif self.architecture == "jumprelu":
            threshold = self.log_threshold.exp()
            z = JumpReLU.apply(pre, threshold, self.bandwidth)
            x_hat = self.decode(z)
            sparsity = HeavisideStep.apply(pre, threshold, self.bandwidth).sum(-1).mean()
            active = z > 0
        elif self.architecture == "topk":  # dense reference of _sparse_step
            vals, idx = pre.topk(self.k, dim=-1, sorted=False)
            z = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
            x_hat = self.decode(z)
            sparsity = zero
            active = z > 0
        else:  # batchtopk, dense reference of _sparse_step: the k × B largest activations of the whole batch
            z = batch_topk(pre.relu(), self.k)
            x_hat = self.decode(z)
            sparsity = zero
            active = z > 0
            self._update_batch_threshold(z, active)
        if self.architecture in ("topk", "batchtopk") and dead_mask is not None and aux_k > 0:
            aux = aux_coefficient * self._aux_k_loss_dense(x, x_hat, pre, dead_mask, aux_k)
        recon = (x_hat - x).square().sum(-1).mean()
        loss = recon + sparsity_coefficient * sparsity + aux
        return StepOutput(
            loss=loss,
            x_hat=x_hat,
            recon_loss=recon,
            sparsity_loss=sparsity,
            aux_loss=aux,
            l0=active.sum(-1).float().mean(),
            fired_counts=active.sum(0),
        )

    def _sparse_step(self, x, dead_mask, aux_k, aux_coefficient) -> StepOutput:
        """TopK and BatchTopK without any dense [B, d_sae] tensor in the backward pass: the encoder's only
        dense work is its forward matmul; decoder and encoder gradients touch the selected latents only."""
        x_cent = x - self.b_dec
        with torch.no_grad():
            pre = torch.addmm(self.b_enc.to(x.dtype), x_cent, self.W_enc.to(x.dtype))  # [B, d_sae]: the floor
            if self.architecture == "topk":
                selection = Selection(*row_topk(pre, self.k))  # a C kernel on CPU float32, else torch.topk
            else:
                selection = self._batch_topk_selection(pre)
            layout = LatentLayout(selection.idx, self.d_sae, selection.rows, batch=len(x))
        idx = selection.idx
        vals = SelectedPreActivations.apply(x_cent, self.W_enc, self.b_enc, selection.values, idx, layout).relu()
        x_hat = sparse_decode(vals, idx, self.W_dec, layout) + self.b_dec
        recon = SquaredError.apply(x_hat, x)
        aux = recon.new_zeros(())
        if dead_mask is not None and aux_k > 0:
            aux = aux_coefficient * self._aux_k_loss_sparse(x, x_cent, x_hat, pre, dead_mask, aux_k)
        active = vals > 0
        if self.architecture == "batchtopk":
            self._update_batch_threshold(vals.detach(), active)
        # scatter_add rather than bincount: bincount's output size depends on the data (a host sync on CUDA)
        counts = torch.zeros(self.d_sae, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, idx.flatten(), active.flatten().to(torch.int64))
        return StepOutput(
            loss=recon + aux,
            x_hat=x_hat,
            recon_loss=recon,
            sparsity_loss=recon.new_zeros(()),
            aux_loss=aux,
            l0=counts.sum() / len(x),
            fired_counts=counts,
        )

    @torch.no_grad()
    def _batch_topk_selection(self, pre: torch.Tensor) -> Selection:
        """BatchTopK's k × B largest relu'd pre-activations as a flat list of pairs.

        A lower bound for the batch threshold comes cheaply (the (k·B)-th largest of every row's 2k best)
        and is raised by bisection while at least k·B entries stay at or above it; every positive entry
        at or above it is a candidate (early in training a few rows hold hundreds, most rows none), and the
        selection is the k·B largest candidates, kept in row-major order. Exact; a few host syncs a step."""
        selected = self.k * len(pre)
        best = row_topk(pre, min(2 * self.k, self.d_sae))[0].flatten()
        low = float(best.kthvalue(max(best.numel() - selected + 1, 1)).values)
        low, holds = _raise_lower_bound(pre, low, float(best.max()), selected)
        found = cpu_kernels.collect_positive_at_least(pre, low, holds)
        if found is None:  # torch: CUDA, other dtypes, no C compiler
            rows, latents = ((pre >= low) & (pre > 0)).nonzero(as_tuple=True)
            found = pre[rows, latents], latents, rows
        values, latents, rows = found
        chosen = values.topk(min(selected, len(values)), sorted=False).indices.sort().values
        return Selection(values[chosen], latents[chosen], rows[chosen])

    def _aux_k_loss_sparse(self, x, x_cent, x_hat, pre, dead_mask, aux_k) -> torch.Tensor:
        """AuxK as in `_aux_k_loss_dense`, through the same sparse functions as the main selection."""
        with torch.no_grad():
            masked = pre.masked_fill(~dead_mask, -torch.inf)
            aux_idx = masked.topk(min(aux_k, self.d_sae), dim=-1, sorted=False).indices
            layout = LatentLayout(aux_idx, self.d_sae)  # shared by both backward passes
        selected = pre.gather(1, aux_idx)
        aux_vals = SelectedPreActivations.apply(x_cent, self.W_enc, self.b_enc, selected, aux_idx, layout)
        aux_vals = torch.where(dead_mask[aux_idx], aux_vals.relu(), torch.zeros_like(aux_vals))
        return _aux_from_residual(sparse_decode(aux_vals, aux_idx, self.W_dec, layout), x, x_hat, dead_mask)

    def _aux_k_loss_dense(self, x, x_hat, pre, dead_mask, aux_k) -> torch.Tensor:
        masked = pre.masked_fill(~dead_mask, -torch.inf)
        vals, idx = masked.topk(min(aux_k, self.d_sae), dim=-1, sorted=False)
        vals = torch.where(dead_mask[idx], vals.relu(), torch.zeros_like(vals))
        aux_z = torch.zeros_like(pre).scatter_(-1, idx, vals)
        return _aux_from_residual(aux_z @ self.W_dec, x, x_hat, dead_mask)

    @torch.no_grad()
    def _update_batch_threshold(self, z: torch.Tensor, active: torch.Tensor) -> None:
        smallest = (
            torch.where(active, z, torch.full_like(z, torch.inf)).amin() if z.numel() else z.new_full((), torch.inf)
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
        # Branch-free on the device (no host sync): a batch with nothing active leaves the threshold as is.
        first = self.batch_threshold == 0
        blended = BATCHTOPK_THRESHOLD_DECAY * self.batch_threshold + (1 - BATCHTOPK_THRESHOLD_DECAY) * smallest
        updated = torch.where(first, smallest, blended)
        self.batch_threshold.copy_(torch.where(torch.isfinite(smallest), updated, self.batch_threshold))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each decoder row's gradient its component along the row (rows stay unit norm)."""
        if self.W_dec.grad is not None:
            rows = self.W_dec
            parallel = (self.W_dec.grad * rows).sum(-1, keepdim=True)
            self.W_dec.grad.sub_(parallel * rows)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        normalize_decoder_rows(self.W_dec)

    # -- files
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Weights for raw (unscaled) inputs, in SAELens names."""
        s = float(self.input_scale)
        tensors = {
            "W_enc": self.W_enc.detach() * s,
            "b_enc": self.b_enc.detach().clone(),
            "W_dec": self.W_dec.detach() / s,
            "b_dec": self.b_dec.detach() / s,
        }
        if self.threshold is not None:
            tensors["threshold"] = self.threshold.detach().clone()
        return {name: t.contiguous().cpu() for name, t in tensors.items()}

    def saved_architecture(self) -> str:
        return "jumprelu" if self.architecture == "batchtopk" else self.architecture


def _raise_lower_bound(pre: torch.Tensor, low: float, high: float, selected: int) -> tuple[float, torch.Tensor]:
    """(bound, per-row counts of the positive entries >= bound): `low` raised by bisection towards `high`
    while at least `selected` positive entries stay at or above it (then the selected-th largest relu'd
    value is still >= the bound), until at most twice `selected` do. One counting pass per step."""
    holds = cpu_kernels.count_positive_at_least(pre, low)
    low = max(low, 0.0)
    for _ in range(8):
        if int(holds.sum()) <= 2 * selected or high <= low:
            break
        middle = (low + high) / 2
        counts = cpu_kernels.count_positive_at_least(pre, middle)
        if int(counts.sum()) >= selected:
            low, holds = middle, counts
        else:
            high = middle
    return low, holds


def _aux_from_residual(aux_hat, x, x_hat, dead_mask) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the top dead latents reconstruct the residual of the live ones.

    Normalised by the number of tokens only, so the loss is the same whether a batch is split
    across ranks or not; multiplied by "any latent dead" on the device so that a caller's
    conservative guess costs time, never exactness."""
    residual = (x - x_hat).detach()
    return (aux_hat - residual).pow(2).sum(-1).mean() * dead_mask.any()


def normalize_decoder_rows(W_dec: torch.Tensor) -> None:
    W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor, layout: LatentLayout) -> torch.Tensor:
    """Σ over each row's selected pairs of vals · W_dec[latent], without a dense [B, d_sae] tensor."""
    return SparseDecode.apply(vals, idx, W_dec, layout)


class LatentLayout:
    """The selected (row, latent) pairs (idx [B, k], or a flat row-major list with `pair_rows`) grouped by
    latent, as a CSR [d_sae × B] structure.

    Weight gradients are then sparse-matrix × dense products: dW[i] = Σ over the pairs of latent i of
    value · row. Built once per step and shared by the encoder and decoder backward passes (same pairs).
    For a flat list it also holds `offsets` [B], where each row's pairs start (embedding_bag's bags)."""

    def __init__(self, idx: torch.Tensor, d_sae: int, pair_rows: torch.Tensor | None = None, batch: int | None = None):
        self.batch, self.d_sae = (idx.shape[0] if batch is None else batch), d_sae
        self.pair_rows, self.offsets = pair_rows, None
        if pair_rows is not None:
            per_row = torch.zeros(self.batch, dtype=torch.int64, device=idx.device)
            per_row.scatter_add_(0, pair_rows, torch.ones_like(pair_rows))
            self.offsets = per_row.cumsum(0) - per_row
        # order: the stable argsort of idx by latent; rows: each sorted pair's batch row; crow: CSR starts
        self.order, self.rows, self.crow = latent_layout(idx, d_sae, pair_rows)

    def bags(self, idx: torch.Tensor, weight: torch.Tensor, per_pair: torch.Tensor) -> torch.Tensor:
        """[B, d]: Σ over each row's pairs of per_pair · weight[latent] (fused gather-scale-sum)."""
        return F.embedding_bag(idx, weight, self.offsets, per_sample_weights=per_pair, mode="sum")

    def weight_grad(self, values: torch.Tensor, dense_rows: torch.Tensor) -> torch.Tensor:
        """[d_sae, d_in] = Σ over pairs of values[b, j] · dense_rows[b] into latent idx[b, j]."""
        fast = cpu_kernels.weight_grad(self.crow, self.rows, self.order, values, dense_rows, self.d_sae)
        if fast is not None:
            return fast
        # Sparse kernels exist for float32/float64 everywhere (MKL has no bf16 CSR matmul): compute there.
        dtype = dense_rows.dtype if dense_rows.dtype in (torch.float32, torch.float64) else torch.float32
        matrix = torch.sparse_csr_tensor(
            self.crow, self.rows, values.flatten()[self.order].to(dtype), (self.d_sae, self.batch), dtype=dtype
        )
        return (matrix @ dense_rows.to(dtype)).to(dense_rows.dtype)


def _row_dots_eager(W: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    rows = F.embedding(idx, W)  # [B, k, d_in], a contiguous gather
    return torch.bmm(rows, g.unsqueeze(-1)).squeeze(-1)


def _row_dots_fusable(W: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (W[idx] * g[:, None, :]).sum(-1)  # written so inductor fuses gather, product and sum


_kernels = {"row_dots": _row_dots_eager}


def use_compiled_kernels(enabled: bool = True) -> None:
    """Swap in torch.compile'd kernels (TrainConfig.torch_compile): the decoder's gather-dot then never
    materialises [B, k, d_in], at a one-off compile per process. Float32 CPU runs use the C kernel
    (`cpu_kernels.row_dots`) either way; this is for CUDA and other dtypes."""
    _kernels["row_dots"] = torch.compile(_row_dots_fusable, dynamic=False) if enabled else _row_dots_eager


def row_dots(W: torch.Tensor, idx: torch.Tensor, g: torch.Tensor, pair_rows: torch.Tensor | None = None):
    """W[latent] · g[row] for every selected pair, shaped like idx: [B, k] (row b), or flat with `pair_rows`."""
    fast = cpu_kernels.row_dots(W, idx, g, pair_rows)
    if fast is not None:
        return fast
    return _kernels["row_dots"](W, idx, g) if pair_rows is None else (W[idx] * g[pair_rows]).sum(-1)


class SelectedPreActivations(torch.autograd.Function):
    """The selected pre-activations (values = pre[b, idx[b, j]], computed without grad by the caller)
    with gradients that touch only the selected (row, latent) pairs.

    d/dW_enc[:, i] = Σ x_cent[b] g[b, j] over idx[b, j] = i; d/db_enc likewise; d/dx_cent[b] =
    Σ_j g[b, j] W_enc[:, idx[b, j]]. Cost O(B·k·d_in) instead of two dense O(B·d_in·d_sae) matmuls."""

    @staticmethod
    def forward(ctx, x_cent, W_enc, b_enc, values, idx, layout):
        ctx.save_for_backward(x_cent, W_enc, idx)
        ctx.layout = layout
        return values.clone()  # a new tensor, so autograd can own it

    @staticmethod
    def backward(ctx, grad):
        x_cent, W_enc, idx = ctx.saved_tensors
        g = grad.to(W_enc.dtype)  # [B, k]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc.shape[1], dtype=W_enc.dtype, device=W_enc.device).index_add_(
                0, idx.flatten(), g.flatten()
            )
        if ctx.needs_input_grad[1]:
            grad_W = ctx.layout.weight_grad(g, x_cent.to(W_enc.dtype)).t()
        if ctx.needs_input_grad[0]:
            # Fused gather-scale-sum over the selected encoder columns: no [pairs, d_in] temporary.
            columns = W_enc.t().contiguous()  # [d_sae, d_in], one cheap copy
            grad_x = ctx.layout.bags(idx, columns, g).to(x_cent.dtype)
        return grad_x, grad_W, grad_b, None, None, None


class SquaredError(torch.autograd.Function):
    """Σ‖x̂ − x‖² / B, the reconstruction loss, as one subtraction forward and one scaled copy backward
    (the chain sub → square → sum → mean costs four [B, d_in] passes each way). x gets no gradient."""

    @staticmethod
    def forward(ctx, x_hat, x):
        diff = x_hat - x
        ctx.save_for_backward(diff)
        return diff.view(-1).dot(diff.view(-1)) / len(x)

    @staticmethod
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        return diff * (2 * grad / len(diff)), None


class SparseDecode(torch.autograd.Function):
    """x̂[b] = Σ_j vals[b, j] W_dec[idx[b, j]], forward and backward in O(B·k·d_in)."""

    @staticmethod
    def forward(ctx, vals, idx, W_dec, layout):
        ctx.save_for_backward(vals, idx, W_dec)
        ctx.layout = layout
        return layout.bags(idx, W_dec, vals.to(W_dec.dtype))

    @staticmethod
    def backward(ctx, grad):
        vals, idx, W_dec = ctx.saved_tensors
        g = grad.to(W_dec.dtype)  # [B, d_in]
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_vals = row_dots(W_dec, idx, g, ctx.layout.pair_rows).to(vals.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = ctx.layout.weight_grad(vals.to(W_dec.dtype), g)
        return grad_vals, None, grad_W, None


def batch_topk(acts: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k × B largest entries of acts [B, d_sae] across the whole batch."""
    flat = acts.flatten()
    vals, idx = flat.topk(k * acts.shape[0], sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(acts)


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


class HeavisideStep(torch.autograd.Function):
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
        return torch.zeros_like(pre), grad_threshold, None


# ---------------------------------------------------------------------------------------------
# SAELens on-disk format


def sae_lens_cfg(sae: SparseAutoencoder, dtype: str = "float32", extra_meta: dict | None = None) -> dict:
    cfg = {
        "architecture": sae.saved_architecture(),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if sae.architecture == "topk":
        cfg["k"] = sae.k
    meta = {"sae_lens_version": SAE_LENS_VERSION, "sae_lens_training_version": SAE_LENS_VERSION}
    # SAELens 6 reads `meta`; `metadata` is kept as well for readers that look for that name.
    cfg["meta"] = dict(meta)
    cfg["metadata"] = {
        **meta,
        "trained_with": "sae_lab",
        "trained_architecture": sae.architecture,
        **(extra_meta or {}),
    }
    return cfg


def save(sae: SparseAutoencoder, out_dir: str | Path, dtype: str = "float32", extra_meta: dict | None = None) -> None:
    """Write cfg.json and sae_weights.safetensors (weights folded for raw inputs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.to(getattr(torch, dtype)) for n, t in sae.export_tensors().items()}
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CFG_FILE).write_text(json.dumps(sae_lens_cfg(sae, dtype, extra_meta), indent=2))


def load(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read an SAE written by `save` (or any SAELens standard/topk/jumprelu folder)."""
    path = Path(path)
    cfg = json.loads((path / CFG_FILE).read_text())
    tensors = load_file(str(path / WEIGHTS_FILE), device=str(device))
    arch = cfg["architecture"]
    if arch not in ("standard", "topk", "jumprelu"):
        raise ValueError(f"{path}: architecture {arch!r} is not one of standard, topk, jumprelu")
    sae = from_saved_tensors(
        arch, int(cfg["d_in"]), int(cfg["d_sae"]), cfg.get("k"), tensors, tensors["W_enc"].dtype, device
    )
    sae.eval()
    return sae


def from_saved_tensors(arch, d_in, d_sae, k, tensors, dtype, device) -> SparseAutoencoder:
    """An inference SAE from SAELens-named tensors (a file's, or `export_tensors()`); a jumprelu
    threshold is kept exactly as given."""
    sae = SparseAutoencoder(arch, d_in, d_sae, k, dtype=dtype, device=device)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, name).copy_(tensors[name])
        if arch == "jumprelu":
            sae.log_threshold.copy_(tensors["threshold"].clamp_min(1e-30).log())
            sae.register_buffer("loaded_threshold", tensors["threshold"].to(device).clone())
    return sae
