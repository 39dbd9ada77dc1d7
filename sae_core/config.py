"""Training configuration: one typed, documented, validated object.

The same `TrainConfig` validates the web form, the CLI's `--config` file and the
job row in the store. Its JSON keys are a contract (see DESIGN.md): unknown keys
are an error, and every error names the field and what is allowed.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Literal, Self

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from .architectures import (
    ARCHITECTURE_NAMES,
    DEFAULT_ARCHITECTURE,
    Architecture,
    ArchitectureOptions,
    all_option_keys,
    architecture,
)
from .jsonfile import ConfigError
from .limits import (
    HOOK_PATTERN,
    MAX_COEFFICIENT,
    MAX_CONTEXT,
    MAX_HOLDOUT,
    MAX_PATH_CHARS,
    MAX_SEED,
    MAX_STEPS,
    MAX_TOKENS,
    MAX_WIDTH,
)
from .model_source import ModelSourceFields
from .strict_config import StrictConfig, describe_validation_error
from .text import brief

MAX_SHUFFLE_BYTES = 64 * 2**30  # shuffle buffer (host RAM per rank, see data/order.py)
MAX_READER_THREADS = 64
READY_BATCHES = 4  # batches each rank's loader keeps assembled ahead of the training loop
# The default lr at 2**14 latents (scaled by 1/sqrt(width) around it). Gao et al. (2024) fit 2e-4 for runs of
# many millions of tokens; at 100-5,000 steps that leaves the SAE far from converged, and 4x that trained
# better on every row of bench/quality_vs_saelens.py (toy and MiniLM, 4-32x wide, k 8-128), 5,000 steps included.
DEFAULT_LR_AT_16K = 8e-4
# The encoder starts as the decoder's transpose times this: smaller first latents (a first reconstruction
# that does not overshoot) and, under Adam's ~lr-sized steps, an encoder that moves faster relative to its
# size. 0.5 beat 1 on every row of bench/quality_vs_saelens.py; 0.25 and 0.1 left more latents dead.
DEFAULT_ENCODER_INIT_SCALE = 0.5


class TrainConfig(StrictConfig, ModelSourceFields):
    """Everything one SAE training run needs. Defaults train well on their own.

    The fields below are every architecture's; an architecture adds its own options (architectures/), flat
    beside them in the JSON. A TrainConfig is therefore always an instance of its architecture's config
    class, TrainConfig's fields plus that architecture's options (`config_class`): constructing or validating
    a TrainConfig picks the class from the data's `architecture`."""

    def __new__(cls, *args, **data):  # noqa: ARG004  (pydantic models take keywords only)
        return super().__new__(config_class(data.get("architecture")) if cls is TrainConfig else cls)

    def __reduce__(self):
        # The architecture's class is made at run time, so pickles (Streamlit's caches) rebuild from the data.
        return (TrainConfig.model_validate, (self.model_dump(mode="json"),))

    @classmethod
    def model_validate(cls, obj, **kwargs):
        if cls is TrainConfig and isinstance(obj, dict):
            chosen = config_class(obj.get("architecture"))
            if chosen is TrainConfig:  # an unknown architecture: its options are not the problem to report
                obj = {key: value for key, value in obj.items() if key not in all_option_keys()}
            return super(TrainConfig, chosen).model_validate(obj, **kwargs)
        return super().model_validate(obj, **kwargs)

    @classmethod
    def model_validate_json(cls, json_data, **kwargs):
        if cls is TrainConfig:
            data = json.loads(json_data)
            if isinstance(data, dict):
                return cls.model_validate(data, **kwargs)
        return super().model_validate_json(json_data, **kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> Self:
        chosen = config_class(data.get("architecture")) if cls is TrainConfig else cls
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            arch = data.get("architecture", DEFAULT_ARCHITECTURE)
            raise ConfigError(describe_validation_error(exc, list(chosen.model_fields), arch)) from None

    activation_source: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="Path of the activations: a .safetensors file, a .npy file, or a directory of shards of either "
        "kind. Or, instead, a model to stream them from (model, hook, dataset: model_source.py).",
    )
    activation_key: str = Field(
        "activations", min_length=1, max_length=256, description="Tensor name inside .safetensors files."
    )
    architecture: str = Field(
        DEFAULT_ARCHITECTURE, description=f"SAE kind: {', '.join(ARCHITECTURE_NAMES)} (architectures/)."
    )
    d_sae: int = Field(gt=0, le=MAX_WIDTH, description="Number of latents (dictionary size).")
    batch_size: int = Field(
        4096, gt=0, le=MAX_TOKENS, description="GLOBAL tokens per optimizer step, split evenly across ranks."
    )
    total_steps: int = Field(gt=0, le=MAX_STEPS, description="Optimizer steps to train.")
    micro_batch_size: int | None = Field(
        None,
        gt=0,
        le=MAX_TOKENS,
        description="Tokens per forward/backward on one rank; the per-rank batch is processed in chunks of this size "
        "with gradients accumulated (one all-reduce per step). Default: the whole per-rank batch.",
    )
    lr: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Adam learning rate; default 8e-4 / sqrt(d_sae / 2**14): Gao et al.'s (2024) width scaling, "
        "4x higher, which trains far better at budgets up to thousands of steps (bench/quality_vs_saelens.py).",
    )
    lr_warmup_steps: int | None = Field(
        None, ge=0, le=MAX_STEPS, description="Linear LR warm-up steps; default 1% of total_steps."
    )
    lr_decay_steps: int | None = Field(
        None, ge=0, le=MAX_STEPS, description="Linear decay to zero over the last N steps; default 10% of total_steps."
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed for the data order, and for initialisation unless init_seed is set."
    )
    init_seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="Seed for the SAE's initialisation; default: seed. A sweep varies it to train "
        "seeds side by side on one data order.",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Dtype the weights are stored in.")
    autocast: Literal["bf16"] | None = Field(None, description="null or 'bf16': bf16 autocast for matmuls on CUDA.")
    checkpoint_every: int = Field(
        1000, gt=0, le=MAX_STEPS, description="Steps between checkpoints (one is always written at the end)."
    )
    keep_checkpoints: int = Field(3, gt=0, le=1000, description="How many recent checkpoints are kept.")
    log_every: int = Field(10, gt=0, le=MAX_STEPS, description="Steps between metric records.")
    holdout_tokens: int = Field(
        4096,
        ge=0,
        le=MAX_HOLDOUT,
        description="Rows kept out of training for evaluation: random rows, or for a set extracted from a model its "
        "last rows (whole contexts, which the model evaluation runs again).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu.")
    shuffle_block_bytes: int = Field(
        2**20,
        ge=4096,
        le=2**30,
        description="Rows are read in contiguous blocks of about this many bytes (at least one row), visited in a "
        "seeded random order each epoch.",
    )
    shuffle_buffer_bytes: int = Field(
        256 * 2**20,
        ge=4096,
        le=MAX_SHUFFLE_BYTES,
        description="Rows of this many bytes of consecutive blocks are shuffled together before they form batches; "
        "a set no larger than this is shuffled as a whole. Each rank holds about twice its share in RAM.",
    )
    shuffle: bool = Field(
        True,
        description="Shuffle the rows (blocks in a seeded order, each window's rows mixed). false: read the rows "
        "in their stored order, every epoch alike: for a set already shuffled as it was written, such as a "
        "model's stream kept with cache_to (it then trains on the stream's very batches).",
    )
    reader_threads: int = Field(
        4, gt=0, le=MAX_READER_THREADS, description="Threads per rank reading blocks ahead of the training loop."
    )
    dead_tokens_window: int = Field(
        1_000_000,
        gt=0,
        le=MAX_STEPS * MAX_TOKENS,
        description="A latent that has not fired for this many tokens counts as dead.",
    )
    b_dec_init: Literal["mean", "geometric_median", "zeros"] = Field(
        "geometric_median", description="How b_dec is initialised from the first batch of data."
    )
    encoder_init_scale: float = Field(
        DEFAULT_ENCODER_INIT_SCALE,
        gt=0,
        le=MAX_COEFFICIENT,
        description="The encoder starts as the decoder's transpose times this (decoder rows have unit norm).",
    )
    grad_clip: float | None = Field(
        1.0, gt=0, le=MAX_COEFFICIENT, description="Max gradient norm; null disables clipping."
    )
    torch_compile: bool = Field(
        False,
        description="Compile the decoder's gather-dot with torch.compile for CUDA and non-float32 runs: faster "
        "steps after a one-off compile (~20 s per process, cached on disk). Float32 CPU runs use a C kernel anyway.",
    )

    @field_validator("architecture")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in ARCHITECTURE_NAMES:
            raise ValueError(f"got {brief(repr(name), 60)}; allowed: {', '.join(ARCHITECTURE_NAMES)}")
        return name

    @model_validator(mode="after")
    def _cross_field_checks(self) -> TrainConfig:
        if problems := self.source_problems() + self.options.option_problems(self.d_sae):
            raise ValueError("; ".join(problems))
        if self.autocast == "bf16" and self.device == "cpu":
            raise ValueError("autocast 'bf16' needs device 'cuda' or 'auto' (it is only applied on CUDA)")
        if self.lr_warmup_steps is not None and self.lr_warmup_steps > self.total_steps:
            raise ValueError(
                f"lr_warmup_steps ({self.lr_warmup_steps}) must be at most total_steps ({self.total_steps})"
            )
        if self.lr_decay_steps is not None and self.lr_decay_steps > self.total_steps:
            raise ValueError(f"lr_decay_steps ({self.lr_decay_steps}) must be at most total_steps ({self.total_steps})")
        if self.shuffle_buffer_bytes < self.shuffle_block_bytes:
            raise ValueError(
                f"shuffle_buffer_bytes ({self.shuffle_buffer_bytes}) must be at least shuffle_block_bytes "
                f"({self.shuffle_block_bytes})"
            )
        return self

    @property
    def arch(self) -> Architecture:
        """The facts of the chosen architecture (architectures/)."""
        return architecture(self.architecture)

    @property
    def options(self) -> ArchitectureOptions:
        """This config as its architecture's options (the config class inherits them)."""
        assert isinstance(self, ArchitectureOptions), "a TrainConfig is built through its architecture's class"
        return self

    # -- resolved defaults (kept as None in the file so the saved config stays what the user wrote)
    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR_AT_16K / math.sqrt(self.d_sae / 2**14)

    @property
    def effective_init_seed(self) -> int:
        return self.init_seed if self.init_seed is not None else self.seed

    @property
    def effective_lr_warmup_steps(self) -> int:
        return self.lr_warmup_steps if self.lr_warmup_steps is not None else self.total_steps // 100

    @property
    def effective_lr_decay_steps(self) -> int:
        return self.lr_decay_steps if self.lr_decay_steps is not None else self.total_steps // 10

    def read_ahead_bytes(self, world_size: int) -> int:
        """Host RAM each rank's loader may fill with blocks read ahead: its share of two windows (the one
        being trained on and the next), so reading the next overlaps training on this one."""
        return 2 * self.shuffle_buffer_bytes // world_size

    def loader_bytes(self, world_size: int, d_in: int) -> int:
        """Host RAM of each rank's loader: blocks read ahead plus READY_BATCHES assembled float32 batches."""
        return self.read_ahead_bytes(world_size) + READY_BATCHES * self.per_rank_batch(world_size) * d_in * 4

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


_CONFIG_CLASSES: dict[str, type[TrainConfig]] = {}


def config_class(name: object) -> type[TrainConfig]:
    """The config class of architecture `name` (None: the default one): TrainConfig's fields first, then the
    architecture's options. TrainConfig itself for an unknown name, whose `architecture` field then says why."""
    name = DEFAULT_ARCHITECTURE if name is None else name
    if not isinstance(name, str) or name not in ARCHITECTURE_NAMES:
        return TrainConfig
    if name not in _CONFIG_CLASSES:
        options = architecture(name).options
        _CONFIG_CLASSES[name] = create_model(
            "TrainConfig",
            __base__=(options, TrainConfig),  # type: ignore[arg-type]  # a tuple of bases is allowed
            __module__=__name__,
            __doc__=TrainConfig.__doc__,
        )
    return _CONFIG_CLASSES[name]


MAX_EXTRACT_TOKENS = 2**40  # rows an extraction writes


class ExtractConfig(StrictConfig):
    """One extraction: a language model's activations at one module, over a text dataset, as shards."""

    model: str = Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="A local Hugging Face model folder, or a hub name found in the local Hugging Face cache "
        "(nothing is downloaded).",
    )
    hook: str = Field(
        min_length=1,
        max_length=300,
        pattern=HOOK_PATTERN,
        description="Module path in the model (model.layers.12, transformer.h.6.mlp, encoder.layer.2): its output "
        "(the first tensor of a tuple) is the activation. `python -m sae_core hooks MODEL` lists them.",
    )
    dataset: str = Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="Text: a .txt file (a document per line), .jsonl/.json (field text_field), .parquet, a folder of "
        "those, a folder written by datasets.save_to_disk, or a hub dataset name found in the local Hugging Face "
        "cache (nothing is downloaded).",
    )
    text_field: str = Field("text", min_length=1, max_length=200, description="The field holding the text.")
    split: str = Field("train", min_length=1, max_length=200, description="Split of a multi-split dataset.")
    context_size: int = Field(128, ge=2, le=MAX_CONTEXT, description="Tokens per context fed to the model.")
    n_tokens: int = Field(gt=0, le=MAX_EXTRACT_TOKENS, description="Activation rows to write.")
    batch_size: int = Field(32, gt=0, le=2**16, description="Contexts per forward pass.")
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="The model's dtype: auto = as saved (float32 on a CPU for half-precision weights)."
    )
    storage_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Dtype of the activations written."
    )
    prepend_bos: bool | None = Field(
        None, description="Start every context with the tokenizer's BOS (or CLS) token; null: as the tokenizer does."
    )
    exclude_special_tokens: bool = Field(
        True, description="Positions holding special tokens (BOS, EOS, PAD, ...) are fed to the model but not written."
    )
    shard_rows: int = Field(
        65536, gt=0, le=2**31, description="About this many rows per shard (shards hold whole contexts)."
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Which contexts go to which shard (contexts are shuffled).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu.")


MAX_EVAL_CONTEXTS, MAX_EVAL_SAES = 2**24, 256  # SAEs: what one evaluation job evaluates in one pass


class EvaluateConfig(StrictConfig):
    """One evaluation of an SAE with its model: CE loss and KL with the SAE spliced in at its hook."""

    sae: str = Field(
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="The SAE folder (cfg.json + sae_weights.safetensors): one SAE Lab trained, or any in SAELens's "
        "on-disk format; or a sweep's run folder (it holds sweep.json): every completed member is evaluated.",
    )
    saes: list[Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS)]] = Field(
        default_factory=list, max_length=MAX_EVAL_SAES - 1,
        description="More SAE (or sweep) folders evaluated in the same pass as `sae`, on the same contexts and one "
        f"model forward per batch; each trained on the same model and hook (at most {MAX_EVAL_SAES} SAEs in all).",
    )  # fmt: skip
    contexts: int = Field(
        256, gt=0, le=MAX_EVAL_CONTEXTS, description="Contexts to evaluate on (at most the held-out ones there are)."
    )
    model: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="The causal language model; default: the one the SAE's activations were extracted from.",
    )
    hook: str | None = Field(
        None,
        min_length=1,
        max_length=300,
        pattern=HOOK_PATTERN,
        description="Module path whose output the SAE replaces; default: the one its activations came from.",
    )
    dataset: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="Text to evaluate on (as ExtractConfig's dataset); default: the held-out contexts of the SAE's "
        "own training data.",
    )
    text_field: str = Field("text", min_length=1, max_length=200, description="The field holding the text.")
    split: str = Field("train", min_length=1, max_length=200, description="Split of a multi-split dataset.")
    context_size: int = Field(
        128,
        ge=2,
        le=MAX_CONTEXT,
        description="Tokens per context packed from `dataset` (held-out contexts keep theirs).",
    )
    batch_size: int = Field(8, gt=0, le=2**16, description="Contexts per forward pass.")
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="The model's dtype: auto = as saved (float32 on a CPU for half-precision weights)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu.")

    @field_validator("saes")
    @classmethod
    def _each_sae_once(cls, value: list[str], info: ValidationInfo) -> list[str]:
        named = [info.data.get("sae"), *value]
        if twice := next((p for i, p in enumerate(named) if p in named[:i]), None):
            raise ValueError(f"{brief(twice, 200)} is named twice")
        return value


class InspectConfig(StrictConfig):
    """One inspection of an SAE: per-latent statistics and examples over rows of activations."""

    sae: str = Field(min_length=1, max_length=MAX_PATH_CHARS, description="The SAE folder to inspect.")
    tokens: int = Field(
        1_000_000, gt=0, le=MAX_EXTRACT_TOKENS,
        description="Rows to stream through the encoder: the last rows of the activations (the held-out ones first).",
    )  # fmt: skip
    activations: str | None = Field(
        None, min_length=1, max_length=MAX_PATH_CHARS,
        description="Activation folder or file to inspect on; default: the one the SAE was trained on.",
    )  # fmt: skip
    top_k: int = Field(20, gt=0, le=1000, description="Top-activating examples kept per latent.")
    chunk_rows: int = Field(2048, gt=0, le=2**20, description="Rows encoded at once (memory: chunk_rows × d_sae).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu.")


JobConfig = TrainConfig | ExtractConfig | EvaluateConfig | InspectConfig  # what a queued job runs (jobs/kinds.py)
