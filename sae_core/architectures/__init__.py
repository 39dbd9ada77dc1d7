"""The registry of SAE architectures: one line each. Facts only (no torch): every layer asks here.

Adding an architecture: `architectures/<name>.py` (its options, saved-as name, memory terms, step cost),
`engine/saes/<name>.py` (its torch module) and its name in REGISTERED below. See base.py.
"""

from __future__ import annotations

import importlib

from .base import Architecture, ArchitectureOptions, MemoryTerms

# The registry: the modules of this package that define an ARCHITECTURE, in the order the pages list them.
REGISTERED = ("standard", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk", "gated")

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a for a in (importlib.import_module(f"{__name__}.{module}").ARCHITECTURE for module in REGISTERED)
}
ARCHITECTURE_NAMES: tuple[str, ...] = tuple(ARCHITECTURES)
DEFAULT_ARCHITECTURE = "topk"
# What `engine.saelens.load` reads: the architectures some architecture is saved as.
# Transcoders: each saved name (SAELens's transcoder, skip_transcoder, jumprelu_transcoder, ...) with the
# architecture whose module loads it and whether it has a skip term.
SAVED_TRANSCODERS: dict[str, tuple[str, bool]] = {
    a.saved_transcoder(skip): (a.saved_architecture, skip)
    for a in ARCHITECTURES.values()
    if a.transcoder_saved_as is not None
    for skip in (False, True)
}
TRANSCODER_ARCHITECTURES: tuple[str, ...] = tuple(a.name for a in ARCHITECTURES.values() if a.transcoder_saved_as)
SAVED_ARCHITECTURES: tuple[str, ...] = (
    *dict.fromkeys(a.saved_architecture for a in ARCHITECTURES.values()),
    *SAVED_TRANSCODERS,
)


def architecture(name: str) -> Architecture:
    """The facts of `name`; ValueError naming the allowed ones otherwise."""
    try:
        return ARCHITECTURES[name]
    except (KeyError, TypeError):
        raise ValueError(f"architecture {name!r} is not one of {', '.join(ARCHITECTURE_NAMES)}") from None


def option_owners(key: str) -> list[str]:
    """The architectures that have `key` among their options (to name a misplaced option)."""
    return [a.name for a in ARCHITECTURES.values() if key in a.options.model_fields]


def all_option_keys() -> set[str]:
    return {key for a in ARCHITECTURES.values() for key in a.options.model_fields}


__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_NAMES",
    "DEFAULT_ARCHITECTURE",
    "SAVED_ARCHITECTURES",
    "SAVED_TRANSCODERS",
    "TRANSCODER_ARCHITECTURES",
    "Architecture",
    "ArchitectureOptions",
    "MemoryTerms",
    "all_option_keys",
    "architecture",
    "option_owners",
]
