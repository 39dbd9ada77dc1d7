"""The Train page's widget values turned into a TrainConfig, GPU selector rows, and URL parameters (pure)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..architectures import architecture
from ..config import ConfigError, TrainConfig


@dataclass
class FormValues:
    """What the Train page's widgets hold, before it is a TrainConfig."""

    activation_source: str
    architecture: str = "topk"
    size_mode: str = "d_sae"  # "d_sae" | "expansion"
    d_sae: int | None = 4096
    expansion_factor: float | None = 8.0
    d_in: int | None = None  # from the dataset, needed for the expansion factor
    k: int | None = 32
    l1_coefficient: float | None = 5.0
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
        **values.extra,
    }
    # Only the sparsity knob of the chosen architecture is sent; the other keeps its default.
    if architecture(values.architecture).uses_k:
        data["k"] = values.k
    else:
        data["l1_coefficient"] = values.l1_coefficient
    if errors:
        return None, errors
    try:
        return TrainConfig.from_dict(data), []
    except ConfigError as exc:
        return None, split_config_error(str(exc))


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
