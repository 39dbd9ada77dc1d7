"""A training config's model source: the fields that name a model, a hook and a text to stream activations from,
instead of activation files (`activation_source`). The names are the extraction's (ExtractConfig); TrainConfig
takes them as a mixin and checks them with the rest (`source_problems`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from .architectures import ARCHITECTURES, TRANSCODER_ARCHITECTURES
from .limits import HOOK_PATTERN, MAX_CONTEXT, MAX_PATH_CHARS

STREAM_KEY_PREFIX = "out:"  # an SAE reads its hook's output: {"out:<hook>": rows}; a transcoder also "in:<hook>"
_NO_SOURCE = object()  # neither activation_source nor model given: named with the other missing fields
MAX_MIXING_CONTEXTS = 2**20
DEFAULT_MIXING_CONTEXTS = 256


def stream_key(hook: str, side: str = "out") -> str:
    """The key of a hook's rows in a stream's batches: `out:<hook>` its output, `in:<hook>` its input."""
    return f"{side}:{hook}"


class ModelSourceFields(BaseModel):
    model: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="Train straight from this model instead of activation files: a local Hugging Face model folder, "
        "or a hub name found in the local Hugging Face cache. Its activations at `hook` over `dataset` are "
        "computed as training reads them (nothing is written unless cache_to says where).",
    )
    hook: str | None = Field(
        None,
        min_length=1,
        max_length=300,
        pattern=HOOK_PATTERN,
        description="With model: the module whose output the SAE reads (a sweep may vary it: one forward feeds "
        "every hook); a transcoder reads its input and predicts its output.",
    )
    dataset: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="With model: the text (as ExtractConfig's dataset).",
    )
    text_field: str = Field("text", min_length=1, max_length=200, description="With model: the field holding the text.")
    split: str = Field("train", min_length=1, max_length=200, description="With model: the split of the dataset.")
    context_size: int = Field(128, ge=2, le=MAX_CONTEXT, description="With model: tokens per context.")
    prepend_bos: bool | None = Field(
        None, description="With model: start every context with BOS (or CLS); null: as the tokenizer does."
    )
    exclude_special_tokens: bool = Field(
        True, description="With model: positions holding special tokens are run but not trained on."
    )
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="With model: the model's dtype (auto = as saved; float32 on a CPU for half precision)."
    )
    model_batch_size: int = Field(32, gt=0, le=2**16, description="With model: contexts per forward pass.")
    mixing_contexts: int = Field(
        DEFAULT_MIXING_CONTEXTS,
        gt=0,
        le=MAX_MIXING_CONTEXTS,
        description="With model: the activations of this many contexts are shuffled together before they form "
        "batches (memory: mixing_contexts x context_size x d_in floats per hook).",
    )
    cache_to: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_PATH_CHARS,
        description="With model: also write the stream as activation folders here, one per hook read "
        "(`<cache_to>/<hook>/`, the extraction's format, manifest last): the windows' rows in the order training "
        "read them, then the held-out contexts. A training on such a folder with `shuffle: false` and the same "
        "batch_size and holdout_tokens reads the very batches the stream gave.",
    )
    evaluate_contexts: int = Field(
        0,
        ge=0,
        le=2**20,
        description="With model: after training, evaluate each SAE spliced into the model (CE loss and KL "
        "recovered, as `evaluate` does) on up to this many held-out contexts, with the model already loaded; "
        "the figures join eval.json. 0: no model evaluation.",
    )
    transcoder: bool = Field(
        False,
        description="With model: train a transcoder: it reads the input of the module `hook` names and predicts "
        "that module's output (e.g. an MLP block); saved in SAELens's transcoder format and evaluated spliced in "
        "place of the module. Standard and the TopK/JumpReLU families; a sweep may vary it.",
    )
    transcoder_skip: bool = Field(
        False,
        description="With transcoder: add a learned linear skip term from the input to the output (a skip "
        "transcoder, W_skip [d_out, d_in], zero at first).",
    )

    @model_validator(mode="before")
    @classmethod
    def _mark_missing_source(cls, data):
        if isinstance(data, dict) and data.get("activation_source") is None and data.get("model") is None:
            return {**data, "activation_source": _NO_SOURCE}
        return data

    @field_validator("activation_source", mode="before", check_fields=False)
    @classmethod
    def _source_given(cls, value):
        if value is _NO_SOURCE:
            raise ValueError("required (or train from a model: model, hook and dataset)")
        return value

    @property
    def streamed(self) -> bool:
        """Whether the activations come from a model, computed as training reads them."""
        return self.model is not None

    def source_problems(self) -> list[str]:
        """What is wrong with where the activations come from: activation files or a model, never both."""
        source = getattr(self, "activation_source", None)
        if source is not None and self.model is not None:
            return ["activation_source and model: give one (activation files, or a model to stream from)"]
        if self.model is not None:
            problems = [
                f"{name}: required to train from a model" for name in ("hook", "dataset") if getattr(self, name) is None
            ] + self.transcoder_problems()
            if getattr(self, "shuffle", True) is False:
                problems.append("shuffle: only for activation files (a model's stream mixes mixing_contexts contexts)")
            return problems
        return [
            f"{name}: only for training from a model (set model, hook and dataset)"
            for name, field in ModelSourceFields.model_fields.items()
            if getattr(self, name) != field.default
        ]

    def transcoder_problems(self) -> list[str]:
        """A transcoder's: an architecture that can be one (named otherwise), a skip term only on one."""
        if self.transcoder_skip and not self.transcoder:
            return ["transcoder_skip: only for a transcoder (set transcoder: true)"]
        name = getattr(self, "architecture", None)
        if self.transcoder and name in ARCHITECTURES and ARCHITECTURES[name].transcoder_saved_as is None:
            return [
                f"transcoder: architecture {name} cannot be trained as a transcoder (one of "
                f"{', '.join(TRANSCODER_ARCHITECTURES)} can)"
            ]
        return []

    @property
    def input_key(self) -> str | None:
        """The stream key of what a streamed member reads: its hook's output, or a transcoder's module input."""
        if self.hook is None:
            return None
        return stream_key(self.hook, "in") if self.transcoder else stream_key(self.hook)

    @property
    def target_key(self) -> str | None:
        """The stream key a transcoder predicts (its module's output); None for an SAE (it reconstructs its input)."""
        return stream_key(self.hook) if self.transcoder and self.hook is not None else None

    @property
    def stream_keys(self) -> list[str]:
        """Every stream key a streamed member reads."""
        return [key for key in (self.input_key, self.target_key) if key is not None]


def activation_files(cfg) -> str:
    """The activation files a training config reads; ConfigError for one that streams from a model, where the
    caller needs files (naming what to give instead)."""
    from .jsonfile import ConfigError

    if cfg.activation_source is None:
        raise ConfigError(
            f"activation_source: the SAE was trained from a model ({cfg.model}, hook {cfg.hook}), not from "
            "activation files: give the activations (or the text) to use"
        )
    return cfg.activation_source
