"""The Train page's widget values turned into a TrainConfig, an architecture's option widgets as data, GPU
selector rows, and URL parameters (pure)."""

from __future__ import annotations

import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import annotated_types

from ..architectures import DEFAULT_ARCHITECTURE, architecture
from ..config import ConfigError, TrainConfig


@dataclass
class FormValues:
    """What the Train page's widgets hold, before it is a TrainConfig."""

    activation_source: str
    architecture: str = DEFAULT_ARCHITECTURE
    size_mode: str = "d_sae"  # "d_sae" | "expansion"
    d_sae: int | None = 4096
    expansion_factor: float | None = 8.0
    d_in: int | None = None  # from the dataset, needed for the expansion factor
    options: dict = field(default_factory=dict)  # the architecture's options the person set (option_widgets)
    batch_size: int | None = 4096
    total_steps: int | None = 1000
    lr: str = ""  # text: blank = the documented default
    lr_warmup_steps: str = ""
    lr_decay_steps: str = ""
    dtype: str = "float32"
    autocast: bool = False
    checkpoint_every: int | None = 1000
    device: str = "auto"
    extra: dict = field(default_factory=dict)


def _optional_number(text: str, name: str, kind: type, errors: list[str]) -> Any:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number such as 3e-4"
        errors.append(f"{name}: {text!r} is not {what} (leave blank for the default)")
        return None


def resolve_d_sae(values: FormValues, errors: list[str]) -> int | None:
    if values.size_mode == "d_sae":
        return values.d_sae
    if values.expansion_factor is None or values.expansion_factor <= 0:
        errors.append("expansion factor: must be greater than 0")
        return None
    if not values.d_in:
        errors.append("expansion factor: needs a readable dataset to know d_in; pick a dataset or give d_sae")
        return None
    return int(round(values.expansion_factor * values.d_in))


DATASET_MISSING = "dataset: choose a dataset or enter the path of an activation file or shard directory"


def form_to_config(values: FormValues) -> tuple[TrainConfig | None, list[str]]:
    """TrainConfig from the form, or the list of problems (each names its field and what is allowed; a blank
    dataset is DATASET_MISSING)."""
    errors: list[str] = []
    if not values.activation_source.strip():
        errors.append(DATASET_MISSING)
    data: dict[str, Any] = {
        "activation_source": values.activation_source.strip(),
        "architecture": values.architecture,
        "d_sae": resolve_d_sae(values, errors),
        "batch_size": values.batch_size,
        "total_steps": values.total_steps,
        "lr": _optional_number(values.lr, "lr", float, errors),
        "lr_warmup_steps": _optional_number(values.lr_warmup_steps, "lr_warmup_steps", int, errors),
        "lr_decay_steps": _optional_number(values.lr_decay_steps, "lr_decay_steps", int, errors),
        "dtype": values.dtype,
        "autocast": "bf16" if values.autocast else None,
        "checkpoint_every": values.checkpoint_every,
        "device": values.device,
        **values.options,
        **values.extra,
    }
    if errors:
        return None, errors
    try:
        return TrainConfig.from_dict(data), []
    except ConfigError as exc:
        return None, split_config_error(str(exc))


@dataclass(frozen=True)
class OptionField:
    """One option of an architecture as the Train page shows it, read from its options model: the label, the
    help, the bounds and the default of the field (architectures/<name>.py)."""

    name: str
    label: str
    help: str
    kind: str  # "int", "float", "choice", "bool", or "ints" (a comma-separated list)
    default: Any
    optional: bool  # None is allowed: a blank widget means the documented default
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple = ()
    advanced: bool = False


def option_fields(arch: str) -> list[OptionField]:
    """The options of architecture `arch`, in their model's order."""
    fields = []
    for name, info in architecture(arch).options.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        kind, optional, choices = _kind_of(info.annotation)
        low: float | None = None
        high: float | None = None
        for bound in info.metadata:
            if isinstance(bound, annotated_types.Ge):
                low = float(bound.ge)  # type: ignore[arg-type]  # numbers here
            elif isinstance(bound, annotated_types.Gt):  # the least whole number above it, for an int
                low = float(bound.gt) + (1 if kind == "int" else 0)  # type: ignore[arg-type]
            elif isinstance(bound, annotated_types.Le):
                high = float(bound.le)  # type: ignore[arg-type]
            elif isinstance(bound, annotated_types.Lt):
                high = float(bound.lt)  # type: ignore[arg-type]
        fields.append(
            OptionField(
                name,
                str(extra.get("label", name)),
                info.description or "",
                kind,
                info.default,
                optional,
                low,
                high,
                choices,
                bool(extra.get("advanced", False)),
            )  # fmt: skip
        )
    return fields


def _kind_of(annotation: Any) -> tuple[str, bool, tuple]:
    """(widget kind, whether None is allowed, choices) of a field's type."""
    args = typing.get_args(annotation)
    optional = isinstance(annotation, types.UnionType) and type(None) in args
    if optional:
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is Literal:
        return "choice", optional, typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        return "ints", optional, ()
    return {int: "int", float: "float", bool: "bool"}.get(annotation, "float"), optional, ()


def parse_option_text(option: OptionField, text: str) -> tuple[Any, str | None]:
    """The value typed into an optional or list option's text box: (value, None), or (None, the problem).
    Blank is None (the documented default)."""
    text = (text or "").strip()
    if not text:
        return None, None
    try:
        if option.kind == "ints":
            return [int(part) for part in text.replace(" ", ",").split(",") if part], None
        return (int(text) if option.kind == "int" else float(text)), None
    except ValueError:
        what = {"ints": "whole numbers separated by commas", "int": "a whole number"}.get(option.kind, "a number")
        return None, f"{option.name}: {text[:60]!r} is not {what} (leave blank for the default)"


def split_config_error(message: str) -> list[str]:
    """ConfigError joins problems with '; ' — one line each for the page."""
    return [part.strip() for part in message.split("; ") if part.strip()]


@dataclass(frozen=True)
class GpuChoice:
    """One row of the GPU selector, decided from the GPU's status and the per-GPU estimate."""

    index: int
    name: str
    memory_used: int | None
    memory_total: int | None
    memory_free: int | None
    util_gpu: float | None
    busy_reason: str | None
    low_memory: bool

    @property
    def selectable(self) -> bool:
        return self.busy_reason is None and not self.low_memory


def gpu_choice(
    index: int,
    name: str,
    memory_used: int | None,
    memory_total: int | None,
    memory_free: int | None,
    util_gpu: float | None,
    busy_reason: str | None,
    required_bytes: int | None,
) -> GpuChoice:
    low = required_bytes is not None and memory_free is not None and memory_free < required_bytes
    return GpuChoice(index, name, memory_used, memory_total, memory_free, util_gpu, busy_reason, low)


def path_mtime(path: str | Path) -> float:
    """Modification time, 0 when missing: a cache key that changes when a dataset is rewritten."""
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def parse_job_param(value: str | None) -> int | None:
    """?job=12 → 12; anything else (missing, junk, negative) → None rather than an error."""
    try:
        job_id = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return job_id if job_id > 0 else None


def parse_index_param(value: str | None, size: int) -> int | None:
    """?latent=17 → 17 when 0 ≤ 17 < size; anything else (missing, junk, out of range) → None."""
    try:
        index = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return index if 0 <= index < size else None
