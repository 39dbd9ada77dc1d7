"""Where a lab's data may come from, and what lies there (no torch).

Activations and text: SAE_LAB_HOME/datasets, the lab's job folders (an extraction writes its activations
there) and the roots an operator names in SAE_LAB_DATA_ROOTS. Models: SAE_LAB_HOME/models, the same named
roots, and the local Hugging Face cache. A shared URL must not let anyone probe the server's files: a path
outside the allowed roots gets one answer, whatever lies there (it is not opened, and its existence is not
revealed).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..files import ACTIVATION_SUFFIXES, DATASETS_DIR, JOBS_DIR, MANIFEST_FILE, MODELS_DIR, TEXT_SUFFIXES

DATA_ROOTS_ENV = "SAE_LAB_DATA_ROOTS"  # more folders to read activations from, separated by os.pathsep
OUTSIDE_ROOTS = (
    f"SAE Lab reads data only from SAE_LAB_HOME/{DATASETS_DIR}, its job folders and the folders named in "
    f"{DATA_ROOTS_ENV}; put the set (or a link to it) there, or ask the operator to add its folder"
)
OUTSIDE_MODEL_ROOTS = (
    f"SAE Lab loads models only from SAE_LAB_HOME/{MODELS_DIR}, the local Hugging Face cache and the folders "
    f"named in {DATA_ROOTS_ENV}; save the model there, or name a model in the cache by its hub name"
)

# The toy set the Home page offers on a first run: small enough to write and train on in a minute.
TOY_DEFAULTS = {"tokens": 65_536, "d_in": 64, "features": 256, "seed": 0}


def list_datasets(datasets_dir: Path) -> list[Path]:
    """Activation sets in the datasets folder: files of a known kind, and shard directories."""
    if not datasets_dir.is_dir():
        return []
    return [entry for entry in sorted(datasets_dir.iterdir()) if _is_activation_set(entry)]


def _is_activation_set(entry: Path) -> bool:
    if entry.name.startswith("."):
        return False
    if entry.is_dir():
        return any(p.suffix in ACTIVATION_SUFFIXES for p in entry.iterdir())
    return entry.is_file() and entry.suffix in ACTIVATION_SUFFIXES


def named_roots() -> list[Path]:
    return [Path(p).expanduser() for p in os.environ.get(DATA_ROOTS_ENV, "").split(os.pathsep) if p.strip()]


def data_roots(home: Path) -> list[Path]:
    """The folders activations and text may be read from: the lab's datasets and job folders, then
    SAE_LAB_DATA_ROOTS."""
    return [home / DATASETS_DIR, home / JOBS_DIR, *named_roots()]


def model_roots(home: Path) -> list[Path]:
    """The folders models may be loaded from: the lab's models folder, the Hugging Face cache, the named roots."""
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    cache = Path(os.environ["HF_HUB_CACHE"]).expanduser() if os.environ.get("HF_HUB_CACHE") else hf_home / "hub"
    return [home / MODELS_DIR, cache, *named_roots()]


def _inside(source: str | Path, roots: list[Path]) -> bool:
    try:
        real = Path(os.path.realpath(Path(source).expanduser()))
        return any(real.is_relative_to(os.path.realpath(root)) for root in roots)
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def in_data_roots(source: str | Path, home: Path) -> bool:
    """Whether `source`, symlinks resolved, lies inside one of the allowed roots (an unreadable path: no)."""
    return _inside(source, data_roots(home))


def in_model_roots(source: str | Path, home: Path) -> bool:
    return _inside(source, model_roots(home))


def list_extracted(home: Path) -> list[Path]:
    """The lab's complete extractions: job folders holding a manifest, newest first."""
    jobs = home / JOBS_DIR
    if not jobs.is_dir():
        return []
    found = [p for p in jobs.iterdir() if p.name.isdigit() and (p / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name), reverse=True)


def list_models(home: Path) -> list[str]:
    """Models to extract from: folders of SAE_LAB_HOME/models with a config.json, then the hub names the
    local Hugging Face cache holds (`models--org--name` -> `org/name`)."""
    models_dir = home / MODELS_DIR
    local = sorted(str(p) for p in models_dir.iterdir() if (p / "config.json").is_file()) if models_dir.is_dir() else []
    cache = model_roots(home)[1]
    cached = (
        sorted(
            p.name.removeprefix("models--").replace("--", "/") for p in cache.iterdir() if p.name.startswith("models--")
        )
        if cache.is_dir()
        else []
    )
    return local + cached


def list_texts(datasets_dir: Path) -> list[Path]:
    """Text datasets in the datasets folder: files of a text kind, and folders holding them or written by
    `datasets.save_to_disk`."""
    if not datasets_dir.is_dir():
        return []
    return [e for e in sorted(datasets_dir.iterdir()) if not e.name.startswith(".") and _is_text_set(e)]


def _is_text_set(entry: Path) -> bool:
    if entry.is_file():
        return entry.suffix.lower() in TEXT_SUFFIXES
    saved = (entry / "dataset_dict.json").is_file() or (entry / "state.json").is_file()
    return entry.is_dir() and (saved or any(p.suffix.lower() in TEXT_SUFFIXES for p in entry.iterdir()))
