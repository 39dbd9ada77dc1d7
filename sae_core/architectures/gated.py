"""Gated: a gate path decides which latents fire, a magnitude path (the same encoder, rescaled per latent by
exp(r_mag)) how strongly; an L1 penalty on the gate's ReLU and an auxiliary reconstruction from it through a
frozen decoder train the gate (Rajamanoharan et al. 2024). Saved as SAELens's `gated`."""

from __future__ import annotations

from .base import Architecture, MemoryTerms, fixed_memory
from .groups import PenaltyOptions


class GatedOptions(PenaltyOptions):
    pass


ARCHITECTURE = Architecture(
    name="gated",
    description="gate and magnitude paths sharing an encoder + L1 on the gate",
    options=GatedOptions,
    engine="sae_core.engine.saes.gated:GatedSAE",
    # parameters per latent: b_gate, b_mag, r_mag. forward: gate and magnitude pre-activations, the gate's ReLU
    # and its weighted copy, the magnitudes, the latents (6f) and the gate mask (1); backward: gradients of the
    # latents, the magnitudes and the gate's ReLU (3f) beyond the forward's.
    memory=fixed_memory(
        MemoryTerms(
            parameters_per_latent=3,
            forward_per_latent=(6, 1),
            backward_per_latent=(9, 1),
            autocast_latent_copies=4,
            eval_per_latent=16,
        )
    ),
)
