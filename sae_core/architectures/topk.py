"""TopK: the k largest latents of each token, with AuxK for dead latents (Gao et al. 2024)."""

from __future__ import annotations

from .base import Architecture, MemoryTerms
from .groups import TopKFamilyOptions, topk_family_memory


class TopKOptions(TopKFamilyOptions):
    pass


ARCHITECTURE = Architecture(
    name="topk",
    description="the k largest latents of each token (+ AuxK)",
    options=TopKOptions,
    engine="sae_core.engine.saes.topk:TopKSAE",
    # SAELens has no TopK transcoder: the name is ours (engine.saelens.load reads it, SAELens does not)
    transcoder_saved_as="topk_transcoder",
    # forward: pre-activations (without grad) and AuxK's masked copy (2f); the backward touches the k selected
    # latents per token only (engine/sparse.py); the decode is sparse, so autocast copies no latents.
    memory=topk_family_memory(
        MemoryTerms(forward_per_latent=(2, 0), backward_per_latent=(0, 0), autocast_latent_copies=0), 1
    ),
    step_over_floor=2.0,
)
