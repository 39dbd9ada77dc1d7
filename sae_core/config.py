"""Training configuration: one typed, documented, validated object.

The same `TrainConfig` validates the web form, the CLI's `--config` file and the
job row in the store. Its JSON keys are a contract (see DESIGN.md): unknown keys
are an error, and every error names the field and what is allowed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .architectures import Architecture, ArchitectureName, architecture


class ConfigError(ValueError):
    """A configuration problem, phrased for a person: field name and what is allowed."""


class TrainConfig(BaseModel):
    """Everything one SAE training run needs. Defaults train well on their own."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    activation_source: str = Field(
        description="Path of the activations: a .safetensors file, a .npy file, or a directory of shards of either kind."
    )
    activation_key: str = Field("activations", description="Tensor name inside .safetensors files.")
    architecture: ArchitectureName = Field(
        "topk", description="SAE kind: standard (ReLU + L1), topk, batchtopk or jumprelu."
    )
    d_sae: int = Field(gt=0, le=2**24, description="Number of latents (dictionary size).")
    k: int = Field(32, gt=0, description="Active latents per token for topk/batchtopk (mean per token for batchtopk).")
    l1_coefficient: float = Field(
        5.0,
        ge=0,
        description="Sparsity penalty weight: L1 (scaled by decoder norms) for standard, L0 for jumprelu.",
    )
    l1_warmup_steps: int | None = Field(
        None, ge=0, description="Steps over which the sparsity penalty ramps up from 0; default 5% of total_steps."
    )
    batch_size: int = Field(4096, gt=0, description="GLOBAL tokens per optimizer step, split evenly across ranks.")
    total_steps: int = Field(gt=0, description="Optimizer steps to train.")
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        description="Tokens per forward/backward on one rank; the per-rank batch is processed in chunks of this size "
        "with gradients accumulated (one all-reduce per step). Default: the whole per-rank batch.",
    )
    lr: float | None = Field(
        None, gt=0, lt=1, description="Adam learning rate; default 2e-4 / sqrt(d_sae / 2**14) (Gao et al. 2024)."
    )
    lr_warmup_steps: int | None = Field(None, ge=0, description="Linear LR warm-up steps; default 1% of total_steps.")
    lr_decay_steps: int | None = Field(
        None, ge=0, description="Linear decay to zero over the last N steps; default 20% of total_steps."
    )
    seed: int = Field(0, ge=0, description="Seed for initialisation and data order.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Dtype the weights are stored in.")
    autocast: Literal["bf16"] | None = Field(None, description="null or 'bf16': bf16 autocast for matmuls on CUDA.")
    checkpoint_every: int = Field(
        1000, gt=0, description="Steps between checkpoints (one is always written at the end)."
    )
    keep_checkpoints: int = Field(3, gt=0, description="How many recent checkpoints are kept.")
    log_every: int = Field(10, gt=0, description="Steps between metric records.")
    holdout_tokens: int = Field(4096, ge=0, description="Rows kept out of training for evaluation.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu.")
    aux_k: int | None = Field(
        None, gt=0, description="Dead latents used by the AuxK loss (topk/batchtopk); default min(512, d_in/2)."
    )
    aux_k_coefficient: float = Field(1 / 32, ge=0, description="Weight of the AuxK loss.")
    dead_tokens_window: int = Field(
        1_000_000, gt=0, description="A latent that has not fired for this many tokens counts as dead."
    )
    b_dec_init: Literal["mean", "geometric_median", "zeros"] = Field(
        "geometric_median", description="How b_dec is initialised from the first batch of data."
    )
    grad_clip: float | None = Field(1.0, gt=0, description="Max gradient norm; null disables clipping.")
    torch_compile: bool = Field(
        False,
        description="Compile the decoder's gather-dot with torch.compile for CUDA and non-float32 runs: faster "
        "steps after a one-off compile (~20 s per process, cached on disk). Float32 CPU runs use a C kernel anyway.",
    )
    jumprelu_bandwidth: float = Field(0.001, gt=0, description="Straight-through estimator bandwidth for jumprelu.")
    jumprelu_init_threshold: float = Field(0.001, gt=0, description="Initial per-latent threshold for jumprelu.")

    @model_validator(mode="after")
    def _cross_field_checks(self) -> TrainConfig:
        if self.arch.uses_k and self.k > self.d_sae:
            raise ValueError(f"k ({self.k}) must be at most d_sae ({self.d_sae}) for {self.architecture}")
        if self.autocast == "bf16" and self.device == "cpu":
            raise ValueError("autocast 'bf16' needs device 'cuda' or 'auto' (it is only applied on CUDA)")
        if self.lr_warmup_steps is not None and self.lr_warmup_steps > self.total_steps:
            raise ValueError(
                f"lr_warmup_steps ({self.lr_warmup_steps}) must be at most total_steps ({self.total_steps})"
            )
        if self.lr_decay_steps is not None and self.lr_decay_steps > self.total_steps:
            raise ValueError(f"lr_decay_steps ({self.lr_decay_steps}) must be at most total_steps ({self.total_steps})")
        return self

    @property
    def arch(self) -> Architecture:
        """The facts of the chosen architecture (architectures.py)."""
        return architecture(self.architecture)

    # -- resolved defaults (kept as None in the file so the saved config stays what the user wrote)
    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.d_sae / 2**14)

    @property
    def effective_lr_warmup_steps(self) -> int:
        return self.lr_warmup_steps if self.lr_warmup_steps is not None else self.total_steps // 100

    @property
    def effective_lr_decay_steps(self) -> int:
        return self.lr_decay_steps if self.lr_decay_steps is not None else self.total_steps // 5

    @property
    def effective_l1_warmup_steps(self) -> int:
        return self.l1_warmup_steps if self.l1_warmup_steps is not None else self.total_steps // 20

    def effective_aux_k(self, d_in: int) -> int:
        """AuxK width: Gao et al. use 512 for large models; d_in/2 keeps small ones from decoding more
        dead latents per token than there are input dimensions."""
        return self.aux_k if self.aux_k is not None else max(1, min(512, d_in // 2))

    def per_rank_batch(self, world_size: int, ranks: str = "ranks") -> int:
        """Tokens each rank processes per step; the global batch must split evenly. `ranks` names the
        ranks in the message ("GPUs" for a GPU selection)."""
        if world_size < 1:
            raise ConfigError(f"world size must be at least 1, got {world_size}")
        if self.batch_size % world_size:
            raise ConfigError(
                f"batch_size {self.batch_size} does not divide evenly across {world_size} {ranks}; "
                f"choose a multiple of {world_size}"
            )
        per_rank = self.batch_size // world_size
        if self.micro_batch_size is not None and per_rank % self.micro_batch_size:
            raise ConfigError(
                f"micro_batch_size {self.micro_batch_size} does not divide the per-rank batch {per_rank} "
                f"(batch_size {self.batch_size} over {world_size} {ranks})"
            )
        return per_rank

    # -- construction helpers with person-readable errors
    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(exc)) from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of TrainConfig keys")
        return cls.from_dict(data)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def field_names() -> list[str]:
    return list(TrainConfig.model_fields)


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem: `field: what is wrong (allowed: ...)`."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "config"
        kind = err["type"]
        if kind == "extra_forbidden":
            lines.append(f"{field}: unknown key (allowed keys: {', '.join(field_names())})")
        elif kind == "missing":
            lines.append(f"{field}: required")
        elif kind == "literal_error":
            allowed = err.get("ctx", {}).get("expected", "")
            lines.append(f"{field}: got {err.get('input')!r}; allowed: {allowed}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{field}: {msg}" if field != "config" else msg)
    return "; ".join(lines)
