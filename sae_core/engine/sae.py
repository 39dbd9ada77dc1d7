"""The SAE architectures as torch modules: one class each, chosen from a registry by name.

Shapes follow SAELens: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in],
threshold [d_sae] (jumprelu, and batchtopk once saved). Inputs are centred by b_dec before encoding.
Each class owns its inference rule (`encode`) and its training loss (`training_step`); the facts
about it (uses k, saved as) are its `spec` from `architectures.py`.

Training runs on inputs scaled by `input_scale` (so E‖x‖² ≈ d_in whatever the model); the SAELens
export (`saelens.py`) folds that scale into the weights, so files on disk work on raw activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..architectures import ARCHITECTURES, Architecture, architecture
from ..config import DEFAULT_ENCODER_INIT_SCALE
from . import cpu_kernels
from .sparse import Kernels, LatentLayout, SelectedPreActivations, Selection, SquaredError, sparse_decode

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


class SparseAutoencoder(nn.Module):
    """What every architecture shares: the weights, the pre-activations, decoding, the unit-norm decoder
    constraint and the export of its tensors. Subclasses define `encode` and the training loss."""

    spec: ClassVar[Architecture]
    input_scale: torch.Tensor  # a buffer: the factor applied to raw inputs during training

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        kernels: Kernels | None = None,
        encoder_init_scale: float = DEFAULT_ENCODER_INIT_SCALE,
    ):
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        self.encoder_init_scale = encoder_init_scale
        self.k: int | None = None
        self.kernels = kernels or Kernels()
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in, dtype=dtype, device=device))
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))
        # Not a weight: the factor applied to raw inputs during training; folded in at save.
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        self.reset_parameters()

    @classmethod
    def config_options(cls, cfg) -> dict:  # noqa: ARG003  (the interface: subclasses read their options)
        """Constructor options of this architecture that a TrainConfig sets (besides sizes and dtype)."""
        return {}

    @property
    def architecture(self) -> str:
        return self.spec.name

    @property
    def saved_architecture(self) -> str:
        return self.spec.saved_as

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.W_dec)
        normalize_decoder_rows(self.W_dec)
        # The decoder's transpose, scaled down (see DEFAULT_ENCODER_INIT_SCALE in config.py for why).
        self.W_enc.copy_(self.W_dec.t() * self.encoder_init_scale)
        self.b_enc.zero_()
        self.b_dec.zero_()

    @property
    def threshold(self) -> torch.Tensor | None:
        """The per-latent threshold of the inference rule, where the architecture has one."""
        return None

    # -- inference (dense latents), identical to what SAELens computes on the saved files
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_enc  # [B, d_sae]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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
        most steps), which skips AuxK. `reference=True` runs the plain dense path that an architecture's
        fast step (the TopK family's sparse one) is tested against."""
        if not reference and (fast := self.fast_step(x, dead_mask, aux_k, aux_coefficient)) is not None:
            return fast
        pre = self.pre_activations(x)
        z, sparsity = self.dense_latents(pre)
        x_hat = self.decode(z)
        aux = self.dense_aux_loss(x, x_hat, pre, dead_mask, aux_k, aux_coefficient)
        recon = (x_hat - x).square().sum(-1).mean()
        active = z > 0
        return StepOutput(
            loss=recon + sparsity_coefficient * sparsity + aux,
            x_hat=x_hat,
            recon_loss=recon,
            sparsity_loss=sparsity,
            aux_loss=aux,
            l0=active.sum(-1).float().mean(),
            fired_counts=active.sum(0),
        )

    def fast_step(self, x, dead_mask, aux_k, aux_coefficient) -> StepOutput | None:  # noqa: ARG002
        """The architecture's own faster training step, when it has one; None: the dense path is it."""
        return None

    def dense_latents(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents z [B, d_sae] with gradients, sparsity penalty) of the training forward pass."""
        raise NotImplementedError

    def dense_aux_loss(self, x, x_hat, pre, dead_mask, aux_k, aux_coefficient) -> torch.Tensor:  # noqa: ARG002
        """The auxiliary loss of the dense path: none, but for the TopK family's AuxK."""
        return pre.new_zeros(())

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

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the weights of SAELens-named tensors (a saved file's, or `export_tensors()`)."""
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(self, name).copy_(tensors[name])


class StandardSAE(SparseAutoencoder):
    """ReLU latents; the L1 penalty is weighted by decoder row norms."""

    spec = ARCHITECTURES["standard"]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_activations(x).relu()

    def dense_latents(self, pre):
        z = pre.relu()
        # Weighted by decoder row norms, so shrinking the decoder cannot buy sparsity.
        return z, (z * self.W_dec.norm(dim=1)).sum(-1).mean()


class JumpReLUSAE(SparseAutoencoder):
    """ReLU above a learned per-latent threshold, trained with an L0 penalty and straight-through
    gradients to the threshold (Rajamanoharan et al. 2024)."""

    spec = ARCHITECTURES["jumprelu"]
    loaded_threshold: torch.Tensor | None

    def __init__(self, d_in: int, d_sae: int, *, init_threshold: float = 0.001, bandwidth: float = 0.001, **base):
        super().__init__(d_in, d_sae, **base)
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(
            torch.full((d_sae,), math.log(init_threshold), dtype=self.W_enc.dtype, device=self.W_enc.device)
        )
        self.register_buffer("loaded_threshold", None)  # a loaded file's threshold (load_saved_tensors)

    @classmethod
    def config_options(cls, cfg) -> dict:
        return {"init_threshold": cfg.jumprelu_init_threshold, "bandwidth": cfg.jumprelu_bandwidth}

    @property
    def threshold(self) -> torch.Tensor:
        # A loaded SAE keeps the saved threshold bit for bit (exp(log(t)) may differ by an ulp).
        return self.loaded_threshold if self.loaded_threshold is not None else self.log_threshold.exp()

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """The weights, and exactly the saved threshold for inference."""
        super().load_saved_tensors(tensors)
        self.log_threshold.copy_(tensors["threshold"].clamp_min(1e-30).log())
        self.register_buffer("loaded_threshold", tensors["threshold"].to(self.W_enc.device).clone())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold)

    def dense_latents(self, pre):
        threshold = self.log_threshold.exp()
        z = JumpReLU.apply(pre, threshold, self.bandwidth)
        return z, HeavisideStep.apply(pre, threshold, self.bandwidth).sum(-1).mean()


class TopKSAE(SparseAutoencoder):
    """The k largest pre-activations of each token, with AuxK for dead latents (Gao et al. 2024).

    Training takes the sparse step: the encoder's only dense work is its forward matmul, and decoder and
    encoder gradients touch the selected latents only (`sparse.py`)."""

    spec = ARCHITECTURES["topk"]
    k: int

    def __init__(self, d_in: int, d_sae: int, *, k: int, **base):
        if not k:
            raise ValueError(f"architecture {self.spec.name!r} needs k")
        super().__init__(d_in, d_sae, **base)
        self.k = k

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    # -- selection: which (row, latent) pairs a batch keeps
    @torch.no_grad()
    def select(self, pre: torch.Tensor) -> Selection:
        return Selection(*cpu_kernels.row_topk(pre, self.k))  # a C kernel on CPU float32, else torch.topk

    def dense_latents(self, pre):
        vals, idx = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu()), pre.new_zeros(())

    def after_selection(self, vals: torch.Tensor, active: torch.Tensor) -> None:
        """Hook for what an architecture learns from the batch's selection (BatchTopK's threshold)."""

    def fast_step(self, x, dead_mask, aux_k, aux_coefficient) -> StepOutput:
        """The sparse step: no dense [B, d_sae] tensor in the backward pass."""
        with torch.no_grad():  # b_dec's gradient through x_cent comes from SelectedPreActivations
            x_cent = x - self.b_dec
            pre = torch.addmm(self.b_enc.to(x.dtype), x_cent, self.W_enc.to(x.dtype))  # [B, d_sae]: the floor
            selection = self.select(pre)
            layout = LatentLayout(selection.idx, self.d_sae, selection.rows, batch=len(x), kernels=self.kernels)
        idx = selection.idx
        vals = SelectedPreActivations.apply(
            x_cent, self.b_dec, self.W_enc, self.b_enc, selection.values, idx, layout
        ).relu()
        x_hat = sparse_decode(vals, idx, self.W_dec, layout) + self.b_dec
        recon = SquaredError.apply(x_hat, x)
        aux = recon.new_zeros(())
        if dead_mask is not None and aux_k > 0:
            aux = aux_coefficient * self._aux_k_loss_sparse(x, x_cent, x_hat, pre, dead_mask, aux_k)
        active = vals > 0
        self.after_selection(vals.detach(), active)
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

    # -- AuxK: the top dead latents reconstruct the residual of the live ones
    def dense_aux_loss(self, x, x_hat, pre, dead_mask, aux_k, aux_coefficient) -> torch.Tensor:
        if dead_mask is None or aux_k <= 0:
            return pre.new_zeros(())
        masked = pre.masked_fill(~dead_mask, -torch.inf)
        vals, idx = masked.topk(min(aux_k, self.d_sae), dim=-1, sorted=False)
        vals = torch.where(dead_mask[idx], vals.relu(), torch.zeros_like(vals))
        aux_z = torch.zeros_like(pre).scatter_(-1, idx, vals)
        return aux_coefficient * _aux_from_residual(aux_z @ self.W_dec, x, x_hat, dead_mask)

    def _aux_k_loss_sparse(self, x, x_cent, x_hat, pre, dead_mask, aux_k) -> torch.Tensor:
        """AuxK as in `dense_aux_loss`, through the same sparse functions as the main selection."""
        with torch.no_grad():
            masked = pre.masked_fill(~dead_mask, -torch.inf)
            aux_idx = masked.topk(min(aux_k, self.d_sae), dim=-1, sorted=False).indices
            layout = LatentLayout(aux_idx, self.d_sae, kernels=self.kernels)  # shared by both backward passes
        selected = pre.gather(1, aux_idx)
        aux_vals = SelectedPreActivations.apply(x_cent, self.b_dec, self.W_enc, self.b_enc, selected, aux_idx, layout)
        aux_vals = torch.where(dead_mask[aux_idx], aux_vals.relu(), torch.zeros_like(aux_vals))
        return _aux_from_residual(sparse_decode(aux_vals, aux_idx, self.W_dec, layout), x, x_hat, dead_mask)


class BatchTopKSAE(TopKSAE):
    """The k × B largest pre-activations of a whole batch (each token keeps its own number). At inference
    a learned threshold replaces the batch rule, so it is saved as a JumpReLU (Bussmann et al. 2024)."""

    spec = ARCHITECTURES["batchtopk"]
    batch_threshold: torch.Tensor

    def __init__(self, d_in: int, d_sae: int, *, k: int, **base):
        super().__init__(d_in, d_sae, k=k, **base)
        # Learned during training as an EMA; used at inference (and saved as jumprelu threshold).
        self.register_buffer("batch_threshold", torch.zeros((), dtype=self.W_enc.dtype, device=self.W_enc.device))

    @property
    def threshold(self) -> torch.Tensor:
        return self.batch_threshold.expand(self.d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold)

    def dense_latents(self, pre):
        z = batch_topk(pre.relu(), self.k)
        self.after_selection(z, z > 0)
        return z, pre.new_zeros(())

    @torch.no_grad()
    def select(self, pre: torch.Tensor) -> Selection:
        """BatchTopK's k × B largest relu'd pre-activations as a flat list of pairs.

        A lower bound for the batch threshold comes cheaply (the (k·B)-th largest of every row's 2k best)
        and is raised by bisection while at least k·B entries stay at or above it; every positive entry
        at or above it is a candidate (early in training a few rows hold hundreds, most rows none), and the
        selection is the k·B largest candidates, kept in row-major order. Exact; a few host syncs a step."""
        selected = self.k * len(pre)
        best = cpu_kernels.row_topk(pre, min(2 * self.k, self.d_sae))[0].flatten()
        low = float(best.kthvalue(max(best.numel() - selected + 1, 1)).values)
        low, holds = _raise_lower_bound(pre, low, float(best.max()), selected)
        found = cpu_kernels.collect_positive_at_least(pre, low, holds)
        if found is None:  # torch: CUDA, other dtypes, no C compiler
            rows, latents = ((pre >= low) & (pre > 0)).nonzero(as_tuple=True)
            found = pre[rows, latents], latents, rows
        values, latents, rows = found
        chosen = values.topk(min(selected, len(values)), sorted=False).indices.sort().values
        return Selection(values[chosen], latents[chosen], rows[chosen])

    @torch.no_grad()
    def after_selection(self, vals: torch.Tensor, active: torch.Tensor) -> None:
        z = vals
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


SAE_CLASSES: dict[str, type[SparseAutoencoder]] = {
    cls.spec.name: cls for cls in (StandardSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE)
}


def make_sae(name: str, d_in: int, d_sae: int, k: int | None = None, **options) -> SparseAutoencoder:
    """An SAE of architecture `name`; `k` for the TopK family, `options` for the class (dtype, device,
    kernels, and JumpReLU's init_threshold and bandwidth)."""
    cls = SAE_CLASSES[architecture(name).name]
    if cls.spec.uses_k:
        options["k"] = k
    return cls(d_in, d_sae, **options)


def sae_from_config(cfg, d_in: int, device: torch.device | str | None = None) -> SparseAutoencoder:
    """The SAE a TrainConfig describes, freshly initialised."""
    options = SAE_CLASSES[cfg.architecture].config_options(cfg)
    options.update(
        dtype=getattr(torch, cfg.dtype),
        device=device,
        kernels=Kernels(cfg.torch_compile),
        encoder_init_scale=cfg.encoder_init_scale,
    )
    return make_sae(cfg.architecture, d_in, cfg.d_sae, cfg.k, **options)


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
