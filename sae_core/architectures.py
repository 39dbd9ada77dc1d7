"""What each SAE architecture is, as facts every layer can ask (no torch): the registry of names.

The torch classes in `engine/sae.py` implement them; the config, the memory model and the pages only
need these facts, so they ask here instead of comparing architecture strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Architecture:
    name: str
    # Sparsity comes from keeping k latents per token (the TopK family): the config's `k` applies, the
    # training step takes the sparse fast path, and dead latents get the AuxK loss.
    uses_k: bool
    # The SAELens architecture its files are written as (BatchTopK's inference rule is a JumpReLU).
    saved_as: str
    # The penalty `l1_coefficient` weighs, as the pages name it; None when sparsity comes from k.
    penalty: str | None
    description: str


ArchitectureName = Literal["standard", "topk", "batchtopk", "jumprelu"]

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("standard", False, "standard", "L1", "ReLU + L1 penalty weighted by decoder norms"),
        Architecture("topk", True, "topk", None, "the k largest latents of each token (+ AuxK)"),
        Architecture("batchtopk", True, "jumprelu", None, "the k x batch largest latents of a batch (+ AuxK)"),
        Architecture("jumprelu", False, "jumprelu", "L0", "ReLU above a learned threshold + L0 penalty"),
    )
}
ARCHITECTURE_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)
# What `engine.saelens.load` reads: the architectures some architecture is saved as.
SAVED_ARCHITECTURES: tuple[str, ...] = tuple(dict.fromkeys(a.saved_as for a in ARCHITECTURES.values()))


def architecture(name: str) -> Architecture:
    """The facts of `name`; ValueError naming the allowed ones otherwise."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"architecture {name!r} is not one of {', '.join(ARCHITECTURE_NAMES)}") from None
