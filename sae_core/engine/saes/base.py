"""What every SAE architecture's torch module shares: the weights, pre-activations, decoding, the unit-norm
decoder, the export of its tensors in SAELens's names, and the step's input and output.

Shapes follow SAELens: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]. Inputs are
centred by b_dec before encoding. Training runs on inputs scaled by `input_scale` (so E‖x‖² ≈ d_in whatever
the model); the SAELens export folds that scale into the weights, so files on disk work on raw activations.

A transcoder (`transcoder=True`) reads one activation and predicts another (a module's input and its output):
W_dec [d_sae, d_out] and b_dec [d_out] live in the output's space, so the input is centred by `b_in` instead
(a buffer set from the data, folded into b_enc at export: SAELens's transcoders do not centre their input),
the target is scaled by its own `target_scale`, and a skip transcoder adds x @ W_skip.T (W_skip [d_out, d_in],
SAELens's shape, zero at first) to the reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import nn

from ...architectures import Architecture, ArchitectureOptions
from ...config import DEFAULT_ENCODER_INIT_SCALE
from ..sparse import Kernels, Selection


@dataclass
class StepContext:
    """What a training step knows of the run besides its batch."""

    step: int = 0
    total_steps: int = 1
    # Latents silent for the dead window; None: none can be dead yet (the dead-latent losses are skipped).
    dead_mask: torch.Tensor | None = None


@dataclass
class StepOutput:
    """What one training forward pass produces (tensors; no host sync here)."""

    x_hat: torch.Tensor  # [B, d_out] reconstruction (of the input, or a transcoder's target)
    # The loss's terms by name, each as weighted in the loss ("mse", "aux", "l1", "inner_mse_128", ...):
    # the trainer backprops their sum and logs each. Every step of a run returns the same names.
    losses: dict[str, torch.Tensor]
    l0: torch.Tensor  # mean active latents per token
    fired_counts: torch.Tensor  # [d_sae] tokens of this batch on which each latent fired
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # logged beside the losses, not optimised
    loss: torch.Tensor = field(init=False)  # scalar to backprop

    def __post_init__(self) -> None:
        self.loss = torch.stack(list(self.losses.values())).sum()


class SparseAutoencoder(nn.Module):
    """The weights and the inference rule's frame. An architecture (engine/saes/<name>.py) defines `encode`
    and `training_step`, and its options come from its facts (`spec.options`)."""

    spec: ClassVar[Architecture]  # the architecture's facts (architectures/<name>.py)
    input_scale: torch.Tensor  # a buffer: the factor applied to raw inputs during training
    b_in: torch.Tensor  # a transcoder's buffer: where its (scaled) inputs are centred
    target_scale: torch.Tensor  # a transcoder's buffer: the factor applied to raw targets during training
    W_skip: nn.Parameter | None

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        options: ArchitectureOptions | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        kernels: Kernels | None = None,
        encoder_init_scale: float = DEFAULT_ENCODER_INIT_SCALE,
        d_out: int | None = None,
        transcoder: bool = False,
        skip: bool = False,
    ):
        super().__init__()
        if (skip or d_out is not None) and not transcoder:
            raise ValueError("d_out and skip are a transcoder's (transcoder=True)")
        if transcoder and self.spec.transcoder_saved_as is None:
            raise ValueError(f"architecture {self.spec.name!r} cannot be trained as a transcoder")
        self.d_in, self.d_sae = d_in, d_sae
        self.d_out = d_in if d_out is None else d_out
        self.transcoder, self.skip = transcoder, skip
        self.options = options if options is not None else self.spec.options()
        self.encoder_init_scale = encoder_init_scale
        self.kernels = kernels or Kernels()
        self.W_dec = nn.Parameter(torch.empty(d_sae, self.d_out, dtype=dtype, device=device))
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae, dtype=dtype, device=device))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, dtype=dtype, device=device))
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in, dtype=dtype, device=device)) if skip else None
        # Not a weight: the factor applied to raw inputs during training; folded in at save.
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=device))
        if transcoder:  # only a transcoder has them: an SAE's checkpoints keep their keys
            self.register_buffer("b_in", torch.zeros(d_in, dtype=dtype, device=device))
            self.register_buffer("target_scale", torch.ones((), dtype=torch.float32, device=device))
        self.reset_parameters()

    @property
    def architecture(self) -> str:
        return self.spec.name

    @property
    def saved_architecture(self) -> str:
        return self.spec.saved_transcoder(self.skip) if self.transcoder else self.spec.saved_architecture

    @property
    def encoder_centre(self) -> torch.Tensor:
        """What inputs are centred by before encoding: b_dec (learned) for an SAE, b_in for a transcoder."""
        return self.b_in if self.transcoder else self.b_dec

    @property
    def output_scale(self) -> torch.Tensor:
        """The factor the reconstructed activations carry during training (the input's, for an SAE)."""
        return self.target_scale if self.transcoder else self.input_scale

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.W_dec)
        normalize_decoder_rows(self.W_dec)
        if self.transcoder:  # input and output are different spaces: the encoder is drawn alike, not tied
            rows = torch.empty(self.d_sae, self.d_in, dtype=self.W_enc.dtype, device=self.W_enc.device)
            nn.init.kaiming_uniform_(rows)
            normalize_decoder_rows(rows)
            self.W_enc.copy_(rows.t() * self.encoder_init_scale)
        else:  # the decoder's transpose, scaled down (see DEFAULT_ENCODER_INIT_SCALE in config.py for why)
            self.W_enc.copy_(self.W_dec.t() * self.encoder_init_scale)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- inference (dense latents), identical to what SAELens computes on the saved files
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.W_enc.dtype) - self.encoder_centre) @ self.W_enc + self.b_enc  # [B, d_sae]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction from latents z; a skip transcoder's also needs its input x."""
        return z @ self.W_dec + self.decoder_offset(x)

    def decoder_offset(self, x: torch.Tensor | None) -> torch.Tensor:
        """What the reconstruction holds besides the latents' decoder rows: b_dec, and a skip transcoder's
        x @ W_skip.T ([B, d_out]; b_dec alone is [d_out])."""
        if self.W_skip is None:
            return self.b_dec
        if x is None:
            raise ValueError("a skip transcoder's reconstruction needs its input: decode(z, x)")
        return torch.addmm(self.b_dec, x.to(self.W_skip.dtype), self.W_skip.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    def inference_selection(self, x: torch.Tensor) -> Selection | None:  # noqa: ARG002  (TopK's override uses it)
        """The positive latents of `encode(x)` as selected pairs without a dense [B, d_sae] tensor, where the
        inference rule gives them directly (TopK); None: take them from `encode`."""
        return None

    # -- training
    def training_step(
        self,
        x: torch.Tensor,
        ctx: StepContext | None = None,
        reference: bool = False,
        target: torch.Tensor | None = None,
    ) -> StepOutput:
        """Forward pass and loss on a (scaled) batch x [B, d_in]: the reconstruction losses compare the output
        with `target` [B, d_out] (a transcoder's, scaled), or with x itself. `reference=True` runs the plain
        dense path that an architecture's fast step (the TopK family's sparse one) is tested against."""
        raise NotImplementedError

    def after_optimizer_step(self, out: StepOutput, ctx: StepContext) -> None:
        """What the architecture updates once per optimizer step, from the step's (merged) output."""

    def dense_output(self, x_hat: torch.Tensor, z: torch.Tensor, losses: dict[str, torch.Tensor]) -> StepOutput:
        """The StepOutput of a dense training pass with latents z [B, d_sae]."""
        active = z > 0
        return StepOutput(x_hat, losses, l0=active.sum(-1).float().mean(), fired_counts=active.sum(0))

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

    # -- SAELens's files
    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Weights for raw (unscaled) inputs, in SAELens's names for the saved architecture."""
        s, s_out = float(self.input_scale), float(self.output_scale)
        b_enc = self.b_enc.detach().clone()
        if self.transcoder:  # (s x − b_in) W_enc + b_enc = x (s W_enc) + (b_enc − b_in W_enc)
            b_enc = b_enc - self.b_in.detach() @ self.W_enc.detach()
        tensors = {
            "W_enc": self.W_enc.detach() * s,
            "b_enc": b_enc,
            "W_dec": self.W_dec.detach() / s_out,
            "b_dec": self.b_dec.detach() / s_out,
            **self.extra_export_tensors(),
        }
        if self.W_skip is not None:  # (s x) W_skip.T / s_out
            tensors["W_skip"] = self.W_skip.detach() * (s / s_out)
        return {name: t.contiguous().cpu() for name, t in tensors.items()}

    def extra_export_tensors(self) -> dict[str, torch.Tensor]:
        """The saved architecture's tensors besides W_enc, b_enc, W_dec and b_dec (none by default)."""
        return {}

    @torch.no_grad()
    def load_saved_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the weights of SAELens-named tensors (a saved file's, or `export_tensors()`)."""
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", *(("W_skip",) if self.skip else ())):
            getattr(self, name).copy_(tensors[name])

    def saved_config(self) -> dict:
        """The saved architecture's fields of cfg.json besides the sizes (TopK's k)."""
        return {}

    def target_of(self, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """What a training step's reconstruction is compared with: the target, or the input itself."""
        if target is None:
            if self.transcoder:
                raise ValueError("a transcoder's training step needs its target")
            return x
        return target

    @classmethod
    def options_from_saved(cls, saved: dict) -> ArchitectureOptions:  # noqa: ARG003  (TopK reads k)
        """The options an inference SAE needs, from a saved cfg.json."""
        return cls.spec.options()


def normalize_decoder_rows(W_dec: torch.Tensor) -> None:
    W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


def all_ranks_mean(value: torch.Tensor) -> torch.Tensor:
    """`value` averaged over the ranks (itself on one process): ranks hold equal shares of a global batch."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value
