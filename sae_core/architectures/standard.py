"""Standard: ReLU latents and an L1 penalty weighted by decoder norms; `target_l0` adapts the penalty."""

from __future__ import annotations

from .base import Architecture, MemoryTerms, fixed_memory
from .groups import TargetL0Options


class StandardOptions(TargetL0Options):
    pass


ARCHITECTURE = Architecture(
    name="standard",
    description="ReLU + L1 penalty weighted by decoder norms",
    options=StandardOptions,
    engine="sae_core.engine.saes.standard:StandardSAE",
    transcoder_saved_as="transcoder",
    # forward: pre-activations, ReLU latents, the L1 product (3f); backward: latents and two gradients (3f)
    memory=fixed_memory(MemoryTerms(forward_per_latent=(3, 0), backward_per_latent=(3, 0))),
)
