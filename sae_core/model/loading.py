"""Hugging Face models and tokenizers from disk: a local folder, or a hub name already in the local cache.

Nothing here downloads: a hub name is looked up with `local_files_only`, so a machine without the model
gets a message saying where to put it. A model is loaded as the class its config names (a causal LM as
its LM class, an encoder as its base model), so module paths read as in the model's own code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.text import is_hub_name
from ..text import brief

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A problem with the model or the hook, phrased for a person: which, what is wrong, what is allowed."""


def _quiet_transformers():
    """transformers, with its progress bars and load reports off (they would fill the job's log)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def resolve_model(name: str) -> Path:
    """The folder holding `name`: the path itself, or the local cache's snapshot of a hub name."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model: {brief(path)} is not a Hugging Face model folder (it has no config.json)")
        return path
    if not is_hub_name(name):
        raise ModelError(f"model: {brief(path)} not found")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001  (any miss of the cache means the same to the user)
        raise ModelError(
            f"model: {brief(name, 100)!r} is not a folder and not in the local Hugging Face cache; SAE Lab never "
            "downloads a model: save it to a folder (for example under SAE_LAB_HOME/models) or the cache first"
        ) from None


def load_tokenizer(model_dir: Path):
    transformers = _quiet_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"model: {brief(model_dir)} has no tokenizer that loads ({brief(exc, 160)})") from None


def load_config(model_dir: Path):
    transformers = _quiet_transformers()
    try:
        return transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"model: {brief(model_dir)} has a config that does not load ({brief(exc, 160)})") from None


def model_class(config):
    """The class the saved config names (GPT2LMHeadModel, LlamaForCausalLM, BertModel, ...), else AutoModel."""
    transformers = _quiet_transformers()
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
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
    try:
        model = cls.from_pretrained(
            str(model_dir), dtype=torch_dtype(config, model_dtype, device), local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"model: {brief(model_dir)} does not load as {cls.__name__} ({brief(exc, 160)})") from None
    return model.to(device).eval()


def meta_model(model_dir: Path):
    """The model's modules with no weights (meta device): shapes for free, even for a 70 B model."""
    config = load_config(model_dir)
    cls = model_class(config)
    with torch.device("meta"):
        model = cls.from_config(config) if cls is _quiet_transformers().AutoModel else cls(config)
    return model.eval()
