"""What an SAE architecture is, as facts every layer can ask without torch.

An architecture is two modules: its facts here (`architectures/<name>.py`: options, how it is saved, memory
terms, step cost) and its torch module (`engine/saes/<name>.py`: inference rule and training losses), plus one
line in the registry (`architectures/__init__.py`). Nothing else names it: the config, the memory estimate, the
scaling model, the trainer and the Train page ask the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def option(default: Any, *, label: str, help: str, advanced: bool = False, **bounds: Any) -> Any:
    """A config field an architecture owns. `label` and `help` are what the Train page shows; `bounds`
    (gt, ge, lt, le) bound the value and the widget; `advanced` options sit in the page's expander."""
    return Field(default, description=help, json_schema_extra={"label": label, "advanced": advanced}, **bounds)


class ArchitectureOptions(BaseModel):
    """The config keys an architecture owns. They sit flat in TrainConfig's JSON (`"k": 32`): the config
    class of an architecture is TrainConfig's fields plus these, so a key of another architecture is named
    as misplaced and an unknown key as unknown."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def option_problems(self, d_sae: int) -> list[str]:  # noqa: ARG002  (the interface: subclasses use it)
        """Problems of these options together with the rest of the config (field names in each message)."""
        return []


@dataclass(frozen=True)
class MemoryTerms:
    """What one training step of an architecture holds beyond the weights, per element of its tensors
    (gpu/memory.py turns these into bytes). `f` below is the weights' dtype size."""

    # Parameters per latent besides its W_enc column and W_dec row (b_enc, gates), in the weights' dtype, and
    # those kept in float32 whatever it is (JumpReLU's threshold).
    parameters_per_latent: int = 1
    float32_parameters_per_latent: int = 0
    # Bytes per element of [batch, d_sae] alive at the forward pass's and the backward pass's peak, as
    # (multiples of f, fixed bytes of bool masks). A sparse backward holds none.
    forward_per_latent: tuple[int, int] = (3, 0)
    backward_per_latent: tuple[int, int] = (3, 0)
    # bf16 [batch, d_sae] copies autocast makes (the dense decode's latents); 0 when decoding is sparse.
    autocast_latent_copies: int = 2
    # Bytes per element of [chunk, d_sae] while the fp32 inference copy evaluates the holdout.
    eval_per_latent: int = 8
    # (row, latent) pairs held per token: selected ones (values in f, int64 indices), and AuxK's.
    selected_per_token: int = 0
    aux_per_token: int = 0
    # Extra [batch, d_in] tensors in f beyond the one reconstruction (Matryoshka's nested ones).
    extra_inputs_per_token: int = 0


def fixed_memory(terms: MemoryTerms) -> Callable[[ArchitectureOptions, int], MemoryTerms]:
    """The memory terms of an architecture whose step does not depend on its options."""
    return lambda options, d_in: terms  # noqa: ARG005  (the same whatever the options)


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str  # one line, shown beside the selector
    options: type[ArchitectureOptions]
    # The torch module, "package.module:Class", imported only where tensors are (engine/saes/__init__.py).
    engine: str
    # The SAELens architecture its files are written as (BatchTopK's inference rule is a JumpReLU); its own
    # name when None.
    saved_as: str | None = None
    # The SAELens architecture a transcoder of it is written as (its skip variant: `skip_transcoder_name`);
    # None: it cannot be trained as a transcoder (config.py refuses it by name).
    transcoder_saved_as: str | None = None
    memory: Callable[[ArchitectureOptions, int], MemoryTerms] = field(default=fixed_memory(MemoryTerms()))
    # A training step's time over its encoder matmul (2·B·d_in·d_sae FLOPs), for the scaling model: the dense
    # architectures do a forward and two backward matmuls (~3x); TopK's sparse backward ~2x (bench/RESULTS.md).
    step_over_floor: float = 3.0

    @property
    def saved_architecture(self) -> str:
        return self.saved_as or self.name

    def saved_transcoder(self, skip: bool) -> str:
        """The SAELens architecture its transcoder is written as (ValueError where it has none)."""
        if self.transcoder_saved_as is None:
            raise ValueError(f"architecture {self.name!r} cannot be trained as a transcoder")
        return skip_transcoder_name(self.transcoder_saved_as) if skip else self.transcoder_saved_as


def skip_transcoder_name(plain: str) -> str:
    """SAELens's name of a transcoder's skip variant: transcoder → skip_transcoder, jumprelu_transcoder →
    jumprelu_skip_transcoder."""
    return plain.replace("transcoder", "skip_transcoder")
