"""Option groups several architectures share: the TopK family's k and AuxK, and a sparsity penalty with its
warm-up and an optional L0 target. An architecture's options class inherits the groups it uses."""

from __future__ import annotations

from ..limits import MAX_COEFFICIENT, MAX_K, MAX_STEPS, MAX_WIDTH
from .base import ArchitectureOptions, MemoryTerms, option

# AuxK width: Gao et al. use 512 for large models; d_in/2 keeps small ones from decoding more dead latents per
# token than there are input dimensions.
MAX_DEFAULT_AUX_K = 512


class TopKFamilyOptions(ArchitectureOptions):
    """Sparsity from keeping k latents per token (TopK) or k × batch per batch (BatchTopK), with AuxK."""

    k: int = option(
        32, gt=0, le=MAX_K, label="k (active latents per token)",
        help="Active latents per token (for the batch variants: the mean per token).",
    )  # fmt: skip
    aux_k: int | None = option(
        None, gt=0, le=MAX_K, label="AuxK latents", advanced=True,
        help="Dead latents the AuxK loss uses to reconstruct the residual; default min(512, d_in/2).",
    )  # fmt: skip
    aux_k_coefficient: float = option(
        1 / 32, ge=0, le=MAX_COEFFICIENT, label="AuxK coefficient", advanced=True, help="Weight of the AuxK loss."
    )

    def option_problems(self, d_sae: int) -> list[str]:
        return [f"k ({self.k}) must be at most d_sae ({d_sae})"] if self.k > d_sae else []

    def effective_aux_k(self, d_in: int) -> int:
        return self.aux_k if self.aux_k is not None else max(1, min(MAX_DEFAULT_AUX_K, d_in // 2))


def topk_family_memory(base: MemoryTerms, selected_per_k: int):
    """Memory terms of a TopK-family architecture: `base` plus its selected pairs (`selected_per_k` per k per
    token: TopK holds k, BatchTopK its candidates and its selection, about 4k) and AuxK's."""

    def terms(options: ArchitectureOptions, d_in: int) -> MemoryTerms:
        assert isinstance(options, TopKFamilyOptions)
        return MemoryTerms(
            **{
                **base.__dict__,
                "selected_per_token": selected_per_k * options.k,
                "aux_per_token": options.effective_aux_k(d_in),
            }
        )

    return terms


class PenaltyOptions(ArchitectureOptions):
    """Sparsity from a penalty weighted by `l1_coefficient`, ramped up from 0 over `l1_warmup_steps`."""

    l1_coefficient: float = option(
        5.0, ge=0, le=MAX_COEFFICIENT, label="L1 coefficient",
        help="Weight of the sparsity penalty: the L1 norm of the latents, each weighted by its decoder row's norm.",
    )  # fmt: skip
    l1_warmup_steps: int | None = option(
        None, ge=0, le=MAX_STEPS, label="Penalty warm-up steps", advanced=True,
        help="Steps over which the sparsity penalty ramps up from 0; default 5% of total_steps.",
    )  # fmt: skip

    def effective_l1_warmup_steps(self, total_steps: int) -> int:
        return self.l1_warmup_steps if self.l1_warmup_steps is not None else total_steps // 20


class TargetL0Options(PenaltyOptions):
    """A penalty whose coefficient adapts during training so that the run ends at the L0 asked for."""

    target_l0: float | None = option(
        None, gt=0, le=MAX_WIDTH, label="Target L0",
        help="Active latents per token to end at: the penalty's coefficient adapts every step (starting from "
        "l1_coefficient) until the L0 of the batches matches. Empty: the coefficient stays as given.",
    )  # fmt: skip

    def option_problems(self, d_sae: int) -> list[str]:
        if self.target_l0 is not None and self.target_l0 >= d_sae:
            return [f"target_l0 ({self.target_l0:g}) must be below d_sae ({d_sae})"]
        return super().option_problems(d_sae)
