"""BatchTopK: the k × batch largest latents of a batch, a learned threshold at inference (Bussmann et al. 2024)."""

from __future__ import annotations

from .base import Architecture, MemoryTerms
from .groups import TopKFamilyOptions, topk_family_memory


class BatchTopKOptions(TopKFamilyOptions):
    pass


# forward: pre-activations and AuxK's masked copy (2f), the bool masks of the candidate search where torch does
# it (3); sparse backward; the selection holds every row's 2k best, the candidates and the chosen (~4k).
BATCHTOPK_MEMORY = MemoryTerms(
    forward_per_latent=(2, 3), backward_per_latent=(0, 0), autocast_latent_copies=0, eval_per_latent=13
)

ARCHITECTURE = Architecture(
    name="batchtopk",
    description="the k x batch largest latents of a batch (+ AuxK); saved as jumprelu",
    options=BatchTopKOptions,
    engine="sae_core.engine.saes.batchtopk:BatchTopKSAE",
    saved_as="jumprelu",
    transcoder_saved_as="jumprelu_transcoder",
    memory=topk_family_memory(BATCHTOPK_MEMORY, 4),
)
