"""The sparse TopK/BatchTopK step's operations: autograd functions that touch only the selected latents.

No dense [batch × d_sae] tensor exists in the backward pass: decoder and encoder gradients are sums over
the selected (row, latent) pairs, grouped by latent in a `LatentLayout`. Which kernel computes each
product is chosen by a `Kernels` object the model owns (C kernels on CPU float32, torch elsewhere,
optionally torch.compile'd), never by process-wide state. `tests/engine/test_sae.py` checks everything
here against the plain dense reference.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import cpu_kernels

# torch says this once per process for the CSR products below; it is noise in every job's log.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


@dataclass
class Selection:
    """The selected (row, latent) pairs of a batch: TopK's [B, k], or BatchTopK's flat list in row-major
    order (each row holds its own number) with `rows` [P] the batch row of each pair."""

    values: torch.Tensor  # pre-activations without grad, shaped like idx
    idx: torch.Tensor  # latents
    rows: torch.Tensor | None = None


def _row_dots_eager(W: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    rows = F.embedding(idx, W)  # [B, k, d_in], a contiguous gather
    return torch.bmm(rows, g.unsqueeze(-1)).squeeze(-1)


def _row_dots_fusable(W: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (W[idx] * g[:, None, :]).sum(-1)  # written so inductor fuses gather, product and sum


@functools.cache
def _compiled_row_dots():
    # One compiled function per process, shared by every model that asks for it.
    return torch.compile(_row_dots_fusable, dynamic=False)


class Kernels:
    """How a model computes its sparse products. `compiled` (TrainConfig.torch_compile) swaps in a
    torch.compile'd decoder gather-dot, which never materialises [B, k, d_in], at a one-off compile per
    process; float32 CPU runs use the C kernel (`cpu_kernels.row_dots`) either way."""

    def __init__(self, compiled: bool = False):
        self.compiled = compiled
        self.dense_row_dots = _compiled_row_dots() if compiled else _row_dots_eager

    def row_dots(self, W: torch.Tensor, idx: torch.Tensor, g: torch.Tensor, pair_rows: torch.Tensor | None = None):
        """W[latent] · g[row] for every selected pair, shaped like idx: [B, k] (row b), or flat with `pair_rows`."""
        fast = cpu_kernels.row_dots(W, idx, g, pair_rows)
        if fast is not None:
            return fast
        return self.dense_row_dots(W, idx, g) if pair_rows is None else (W[idx] * g[pair_rows]).sum(-1)


class LatentLayout:
    """The selected (row, latent) pairs (idx [B, k], or a flat row-major list with `pair_rows`) grouped by
    latent, as a CSR [d_sae × B] structure.

    Weight gradients are then sparse-matrix × dense products: dW[i] = Σ over the pairs of latent i of
    value · row. Built once per step and shared by the encoder and decoder backward passes (same pairs).
    For a flat list it also holds `offsets` [B], where each row's pairs start (embedding_bag's bags)."""

    def __init__(
        self,
        idx: torch.Tensor,
        d_sae: int,
        pair_rows: torch.Tensor | None = None,
        batch: int | None = None,
        kernels: Kernels | None = None,
    ):
        self.batch, self.d_sae = (idx.shape[0] if batch is None else batch), d_sae
        self.pair_rows, self.offsets = pair_rows, None
        self.kernels = kernels or Kernels()
        if pair_rows is not None:
            per_row = torch.zeros(self.batch, dtype=torch.int64, device=idx.device)
            per_row.scatter_add_(0, pair_rows, torch.ones_like(pair_rows))
            self.offsets = per_row.cumsum(0) - per_row
        # order: the stable argsort of idx by latent; rows: each sorted pair's batch row; crow: CSR starts
        self.order, self.rows, self.crow = cpu_kernels.latent_layout(idx, d_sae, pair_rows)

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

    def row_dots(self, W: torch.Tensor, idx: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.kernels.row_dots(W, idx, g, self.pair_rows)


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor, layout: LatentLayout) -> torch.Tensor:
    """Σ over each row's selected pairs of vals · W_dec[latent], without a dense [B, d_sae] tensor."""
    return SparseDecode.apply(vals, idx, W_dec, layout)


class SelectedPreActivations(torch.autograd.Function):
    """The selected pre-activations (values = pre[b, idx[b, j]] of x_cent = x − b_dec, computed without
    grad by the caller) with gradients that touch only the selected (row, latent) pairs.

    d/dW_enc[:, i] = Σ x_cent[b] g[b, j] over idx[b, j] = i; d/db_enc[i] = Σ g[b, j] likewise. x_cent
    depends on the parameters only through b_dec, so d/db_dec = −Σ_b Σ_j g[b, j] W_enc[:, idx[b, j]]
    = −W_enc · d/db_enc: one [d_in × d_sae] matrix-vector product instead of a [B, d_in] gradient for x_cent
    that would only be summed (18 of 83 ms of a CPU step at d_in 2304). Cost O(B·k·d_in) instead of two
    dense O(B·d_in·d_sae) matmuls."""

    @staticmethod
    def forward(ctx, x_cent, b_dec, W_enc, b_enc, values, idx, layout):  # noqa: ARG004  (biases: for gradients)
        ctx.save_for_backward(x_cent, W_enc, idx)
        ctx.layout = layout
        return values.clone()  # a new tensor, so autograd can own it

    @staticmethod
    def backward(ctx, grad):
        x_cent, W_enc, idx = ctx.saved_tensors
        g = grad.to(W_enc.dtype)  # [B, k]
        grad_b_dec = grad_W = grad_b_enc = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_b_enc = torch.zeros(W_enc.shape[1], dtype=W_enc.dtype, device=W_enc.device).index_add_(
                0, idx.flatten(), g.flatten()
            )
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(W_enc @ grad_b_enc)
        if ctx.needs_input_grad[2]:
            grad_W = ctx.layout.weight_grad(g, x_cent.to(W_enc.dtype)).t()
        return None, grad_b_dec, grad_W, grad_b_enc if ctx.needs_input_grad[3] else None, None, None, None


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
            grad_vals = ctx.layout.row_dots(W_dec, idx, g).to(vals.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = ctx.layout.weight_grad(vals.to(W_dec.dtype), g)
        return grad_vals, None, grad_W, None
