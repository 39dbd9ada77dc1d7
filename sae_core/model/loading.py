"""Hugging Face models and tokenizers from disk: a local folder, or a hub name already in the local cache.

Nothing here downloads: a hub name is looked up in the local cache alone (catalog.hub_snapshot), so a
machine without the model gets a message saying where to put it. Nothing here runs code shipped with a
model: a config or tokenizer config with an `auto_map` is refused before transformers reads it, and
transformers is told `trust_remote_code=False` as well (it would otherwise ask on stdin, and a `y` there
runs the model folder's Python). A model is loaded as the class its config names (a causal LM as its LM
class, an encoder as its base model), so module paths read as in the model's own code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.catalog import hub_snapshot
from ..files import MODEL_CONFIG_FILE, MODEL_SETTINGS_FILES
from ..jsonfile import ConfigError, read_json_object
from ..text import brief

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_SETTINGS_BYTES = 64 * 2**20  # a tokenizer config carrying its whole vocabulary stays far below this


class ModelError(ValueError):
    """A problem with the model or the hook, phrased for a person: which, what is wrong, what is allowed."""


def _quiet_transformers():
    """transformers, with its progress bars and load reports off (they would fill the job's log)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def resolve_model(name: str) -> Path:
    """The folder holding `name`: the local cache's snapshot of a hub name the cache holds, else the path
    itself (the rule the gate applies: catalog.hub_snapshot)."""
    path = hub_snapshot(name, "model") or Path(name).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model: {brief(name, 100)!r} not found (no such folder, nor a model in the local Hugging Face "
            "cache); SAE Lab never downloads a model: save it to a folder (for example under SAE_LAB_HOME/models) "
            "or the cache first"
        )
    if not (path / MODEL_CONFIG_FILE).is_file():
        raise ModelError(f"model: {brief(path)} is not a Hugging Face model folder (it has no config.json)")
    return path


def refuse_remote_code(model_dir: Path) -> None:
    """ModelError when the model's config or tokenizer config has an `auto_map`: classes from Python files
    shipped with the model, which SAE Lab never runs."""
    for name in MODEL_SETTINGS_FILES:
        if not (model_dir / name).exists():
            continue
        try:
            settings = read_json_object(model_dir / name, f"model: {name}", "settings", _MAX_SETTINGS_BYTES)
        except ConfigError as exc:
            raise ModelError(str(exc)) from None
        if "auto_map" in settings:
            raise ModelError(
                f"model: its {name} has an auto_map (classes from Python files shipped with the model); SAE Lab "
                "never runs a model's own code: use a model whose architecture transformers has built in"
            )


def load_tokenizer(model_dir: Path):
    refuse_remote_code(model_dir)
    transformers = _quiet_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"model: {brief(model_dir)} has no tokenizer that loads ({brief(exc, 160)})") from None


def load_config(model_dir: Path):
    refuse_remote_code(model_dir)
    transformers = _quiet_transformers()
    try:
        return transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"model: {brief(model_dir)} has a config that does not load ({brief(exc, 160)})") from None


def model_class(config):
    """The model class the saved config names (GPT2LMHeadModel, LlamaForCausalLM, BertModel, ...), else
    AutoModel; ModelError when it names something of transformers that is not a model class."""
    transformers = _quiet_transformers()
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None) if isinstance(name, str) else name
        if cls is None:
            continue
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ModelError(
                f"model: config.json's architectures names {brief(name, 60)!r}, which is not a transformers model class"
            )
        return cls
    return transformers.AutoModel


def torch_dtype(config, model_dtype: str, device: torch.device) -> torch.dtype:
    """`model_dtype`, or for "auto" the saved dtype, widened to float32 on a CPU for half precision."""
    if model_dtype != "auto":
        return _DTYPES[model_dtype]
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = saved if isinstance(saved, torch.dtype) else _DTYPES.get(str(saved), torch.float32)
    return torch.float32 if device.type == "cpu" and dtype != torch.float32 else dtype


def load_model(model_dir: Path, model_dtype: str, device: torch.device):
    """The model in eval mode on `device` (weights in `model_dtype`)."""
    config = load_config(model_dir)
    cls = model_class(config)
    transformers = _quiet_transformers()
    try:
        model = cls.from_pretrained(
            str(model_dir),
            config=config,
            dtype=torch_dtype(config, model_dtype, device),
            local_files_only=True,
            **({"trust_remote_code": False} if cls is transformers.AutoModel else {}),
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"model: {brief(model_dir)} does not load as {cls.__name__} ({brief(exc, 160)})") from None
    return model.to(device).eval()


def meta_model(model_dir: Path):
    """The model's modules with no weights (meta device): shapes for free, even for a 70 B model."""
    config = load_config(model_dir)
    cls = model_class(config)
    with torch.device("meta"):
        auto = cls is _quiet_transformers().AutoModel
        model = cls.from_config(config, trust_remote_code=False) if auto else cls(config)
    return model.eval()
