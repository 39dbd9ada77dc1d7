"""Matryoshka BatchTopK: BatchTopK whose nested prefixes of latents (the first 128, 512, ... of them) must each
reconstruct the input on their own, which keeps general features in the early latents and reduces feature
absorption (Bussmann et al. 2025; Nabeshima 2024). Saved as jumprelu, as SAELens does."""

from __future__ import annotations

from ..limits import MAX_WIDTH
from .base import Architecture, ArchitectureOptions, MemoryTerms, option
from .batchtopk import BATCHTOPK_MEMORY
from .groups import TopKFamilyOptions, topk_family_memory

# Without matryoshka_widths: prefixes of d_sae/64, d_sae/16, d_sae/4 latents and all of them.
DEFAULT_LEVEL_DIVISORS = (64, 16, 4, 1)
MAX_LEVELS = 64


class MatryoshkaOptions(TopKFamilyOptions):
    matryoshka_widths: list[int] | None = option(
        None, label="Matryoshka widths",
        help="Nested prefix sizes, increasing, the last equal to d_sae (e.g. 128, 512, 2048, 16384); each "
        "prefix of the latents is trained to reconstruct on its own. Empty: d_sae/64, /16, /4 and d_sae.",
    )  # fmt: skip

    def option_problems(self, d_sae: int) -> list[str]:
        problems = super().option_problems(d_sae)
        widths = self.matryoshka_widths
        if widths is None:
            return problems
        if not 1 <= len(widths) <= MAX_LEVELS:
            return [*problems, f"matryoshka_widths: give 1 to {MAX_LEVELS} widths"]
        if any(not 0 < w <= MAX_WIDTH for w in widths) or any(a >= b for a, b in zip(widths, widths[1:], strict=False)):
            problems.append("matryoshka_widths: must be positive and strictly increasing")
        elif widths[-1] != d_sae:
            problems.append(f"matryoshka_widths: the last width ({widths[-1]}) must equal d_sae ({d_sae})")
        elif widths[0] < self.k:
            problems.append(f"matryoshka_widths: the first width ({widths[0]}) must be at least k ({self.k})")
        return problems

    def effective_widths(self, d_sae: int) -> list[int]:
        if self.matryoshka_widths is not None:
            return list(self.matryoshka_widths)
        widths = [d_sae // d for d in DEFAULT_LEVEL_DIVISORS if d_sae // d >= max(self.k, 1)]
        return sorted(set(widths) | {d_sae})


def matryoshka_memory(options: ArchitectureOptions, d_in: int) -> MemoryTerms:
    """BatchTopK's terms, and for every inner level its cumulative reconstruction and its difference to the
    input, kept for the backward pass (2 [batch, d_in] tensors a level)."""
    assert isinstance(options, MatryoshkaOptions)
    terms = topk_family_memory(BATCHTOPK_MEMORY, 4)(options, d_in)
    levels = len(options.matryoshka_widths) if options.matryoshka_widths else len(DEFAULT_LEVEL_DIVISORS)
    return MemoryTerms(**{**terms.__dict__, "extra_inputs_per_token": 2 * (levels - 1)})


ARCHITECTURE = Architecture(
    name="matryoshka_batchtopk",
    description="BatchTopK whose nested prefixes each reconstruct (+ AuxK); saved as jumprelu",
    options=MatryoshkaOptions,
    engine="sae_core.engine.saes.matryoshka_batchtopk:MatryoshkaBatchTopKSAE",
    saved_as="jumprelu",
    transcoder_saved_as="jumprelu_transcoder",
    memory=matryoshka_memory,
)
