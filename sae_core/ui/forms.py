"""The Train page's widget values turned into a TrainConfig (or a sweep of them), an architecture's option widgets
as data, GPU selector rows, and URL parameters (pure)."""

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
from ..gpu.memory import StreamSource, sweep_estimate
from ..sweep import PLACEMENTS, Sweep, sweep_from_dict


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
    stream: StreamValues | None = None  # "From a model": instead of activation_source


@dataclass
class StreamValues:
    """The Train page's "From a model" widgets: the model, its hooks (several: a sweep over hook), the text."""

    model: str
    hooks: list[str]
    dataset: str
    text_field: str = "text"
    split: str = "train"
    context_size: int = 128
    model_batch_size: int = 32
    mixing_contexts: int = 256
    cache_to: str = ""  # keep the stream here (one activation folder per key read); blank: not kept
    evaluate_contexts: int = 0  # evaluate with the model after training on this many held-out contexts; 0: not
    transcoder: bool = False  # every member a transcoder of its hook's module (reads its input, predicts its output)
    transcoder_skip: bool = False


def suggested_cache_to(datasets: Path, model: str) -> str:
    """Where the Train page suggests keeping a model's stream: `<datasets>/<model's last name>-stream`."""
    name = Path(model.strip().rstrip("/\\")).name or "model"
    return str(datasets / f"{name}-stream")


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
MODEL_MISSING = "model: choose one, or type a model folder or the hub name of a model in the local cache"
TEXT_MISSING = "text dataset: choose one, or type a text file, folder or hub dataset name"
HOOKS_MISSING = "hooks: choose at least one module of the model"
MISSING = (DATASET_MISSING, MODEL_MISSING, TEXT_MISSING, HOOKS_MISSING)  # nothing chosen yet: hints, not errors


def form_to_config(values: FormValues) -> tuple[TrainConfig | Sweep | None, list[str]]:
    """TrainConfig from the form, or the list of problems (each names its field and what is allowed; a blank
    dataset is DATASET_MISSING); from a model with several hooks, a sweep over `hook`."""
    if values.stream is not None and len(values.stream.hooks) > 1:  # several hooks: a sweep over hook
        return form_to_sweep(values, SweepValues(architectures=[values.architecture]))
    errors: list[str] = []
    data = _form_data(values, errors)
    if errors:
        return None, errors
    try:
        return TrainConfig.from_dict(data), []
    except ConfigError as exc:
        return None, split_config_error(str(exc))


def _source_data(values: FormValues, errors: list[str]) -> dict[str, Any]:
    """Where the activations come from: activation files, or a model's hooks over a text."""
    stream = values.stream
    if stream is None:
        if not values.activation_source.strip():
            errors.append(DATASET_MISSING)
        return {"activation_source": values.activation_source.strip()}
    errors += [m for m, given in ((MODEL_MISSING, stream.model), (TEXT_MISSING, stream.dataset)) if not given.strip()]
    if stream.model.strip() and not stream.hooks:
        errors.append(HOOKS_MISSING)
    data = {
        "model": stream.model.strip(), "dataset": stream.dataset.strip(), "text_field": stream.text_field,
        "split": stream.split, "context_size": stream.context_size, "model_batch_size": stream.model_batch_size,
        "mixing_contexts": stream.mixing_contexts, "cache_to": stream.cache_to.strip() or None,
        "evaluate_contexts": stream.evaluate_contexts, "transcoder": stream.transcoder,
        "transcoder_skip": stream.transcoder_skip,
    }  # fmt: skip
    return {**data, "hook": stream.hooks[0]} if len(stream.hooks) == 1 else data


def _form_data(values: FormValues, errors: list[str]) -> dict[str, Any]:
    """The form's values as TrainConfig keys (what cannot be read goes to `errors`)."""
    return {
        **_source_data(values, errors),
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


# --------------------------------------------------------------------------- a sweep
@dataclass(frozen=True)
class SweepField:
    """A field the Train page's sweep section takes values of, as a comma-separated text."""

    name: str
    label_md: str  # our words (a field's name, an option's label), shown as is: escaping would put a backslash
    kind: str  # "int" or "float"     # before each underscore into the field's accessible name
    placeholder: str


# The sweep section's fields besides the architectures: d_sae, the architecture's main option (its first: k, or
# the sparsity coefficient), the learning rate and the initialisation seed. Any other field: a sweep config file.
SWEEP_FIELDS = ("d_sae", "lr", "init_seed")
_PLACEHOLDERS = {"d_sae": "e.g. 4096, 16384", "lr": "e.g. 1e-4, 3e-4", "init_seed": "e.g. 0, 1, 2"}


def sweep_fields(arch: str) -> list[SweepField]:
    """What the sweep section asks values of, for architecture `arch` (its main option second)."""
    main = option_fields(arch)[0]
    fields = [
        SweepField(name, f"{name} values", _kind_of(TrainConfig.model_fields[name].annotation)[0], _PLACEHOLDERS[name])
        for name in SWEEP_FIELDS
    ]
    fields.insert(1, SweepField(main.name, f"{main.label} values", main.kind, f"e.g. {main.default}, …"))
    return fields


def parse_sweep_values(field: SweepField, text: str) -> tuple[list, str | None]:
    """The values typed for `field` ('4096, 16384'): ([values], None), or ([], the problem naming the field).
    Blank is [] (the field keeps the form's setting)."""
    parts = [part for part in (text or "").replace(",", " ").split() if part]
    values: list = []
    for part in parts:
        try:
            value: Any = int(part) if field.kind == "int" else float(part)
        except ValueError:
            what = "a whole number" if field.kind == "int" else "a number such as 3e-4"
            return [], f"sweep {field.name}: {part[:40]!r} is not {what}; separate values by commas"
        if value in values:
            return [], f"sweep {field.name}: {part} is listed twice"
        values.append(value)
    return values, None


@dataclass
class SweepValues:
    """What the sweep section's widgets hold: the values typed per field, the architectures, the placement."""

    texts: dict[str, str] = field(default_factory=dict)
    architectures: list[str] = field(default_factory=list)
    placement: str = "auto"


def form_to_sweep(values: FormValues, sweep: SweepValues) -> tuple[Sweep | None, list[str]]:
    """A sweep of the form's settings over the values typed (every combination), or the list of problems (each
    names its field). A swept field need not be valid in the form (the grid sets it)."""
    errors: list[str] = []
    grid: dict[str, list] = {}
    if values.stream is not None and len(values.stream.hooks) > 1:
        grid["hook"] = list(values.stream.hooks)  # one forward feeds every hook's members
    architectures = list(dict.fromkeys(sweep.architectures))
    if not architectures:
        errors.append("sweep architectures: choose at least one")
    for spec in sweep_fields(values.architecture):
        if spec.name == option_fields(values.architecture)[0].name and len(architectures) > 1:
            grid["architecture"] = architectures  # before the main option: members are named arch first
        parsed, problem = parse_sweep_values(spec, sweep.texts.get(spec.name, ""))
        if problem:
            errors.append(problem)
        elif parsed:
            grid[spec.name] = parsed
    if architectures and "architecture" not in grid and architectures != [values.architecture]:
        grid["architecture"] = architectures
    if sweep.placement not in PLACEMENTS:
        errors.append(f"sweep placement: {sweep.placement!r} is not one of {', '.join(PLACEMENTS)}")
    if not grid and not errors:
        errors.append("sweep: give the values of at least one field (separated by commas), or turn the sweep off")
    data = _form_data(values, errors)
    if errors:
        return None, errors
    if "architecture" in grid:  # keep only the options every swept architecture has
        shared = set.intersection(*(set(architecture(a).options.model_fields) for a in grid["architecture"]))
        data = {k: v for k, v in data.items() if k not in values.options or k in shared}
    base = {k: v for k, v in data.items() if k not in grid}
    try:
        return sweep_from_dict({**base, "sweep": grid, "placement": sweep.placement}), []
    except ConfigError as exc:
        return None, split_config_error(str(exc))


def sweep_layouts(sweep: Sweep, world: int, d_in: int, stream: StreamSource | None = None) -> dict[str, int | str]:
    """Each layout's per-GPU estimate on `world` GPUs (streamed from a model: `stream`), or why it cannot run."""
    layouts: dict[str, int | str] = {}
    for layout in ("batch", "members"):
        try:
            layouts[layout] = sweep_estimate(sweep, world, d_in, layout, stream).total_bytes
        except ConfigError as exc:
            layouts[layout] = str(exc)
    return layouts


def sweep_need(sweep: Sweep, world: int, d_in: int, stream: StreamSource | None = None) -> int | None:
    """The per-GPU memory a sweep needs on `world` GPUs, for marking GPUs too full: the layout asked for, or for
    "auto" the smaller of the layouts that can run (the gate picks one that fits); None if none can."""
    asked = [sweep.placement] if sweep.placement != "auto" else ["batch"] if world == 1 else ["batch", "members"]
    needs = [v for k, v in sweep_layouts(sweep, world, d_in, stream).items() if k in asked and isinstance(v, int)]
    return min(needs) if needs else None


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
