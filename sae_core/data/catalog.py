"""Where a lab's data may come from, and what lies there (no torch).

Activations and text: SAE_LAB_HOME/datasets, the lab's job folders (an extraction writes its activations
there) and the roots an operator names in SAE_LAB_DATA_ROOTS. Models: SAE_LAB_HOME/models, the same named
roots, and the local Hugging Face cache. A shared URL must not let anyone probe the server's files: a path
outside the allowed roots gets one answer, whatever lies there (it is not opened, and its existence is not
revealed).

A name (a model's or a text's) is a hub name only when the local Hugging Face cache holds that repository;
every other name is a path, relative ones included, and must lie inside the roots. Nothing here or in the
processes the lab starts asks the hub anything (OFFLINE_ENV): a name the cache lacks costs no time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

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

# For every process the lab starts: huggingface_hub, datasets and transformers read only their local caches.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# The toy set the Home page offers on a first run: small enough to write and train on in a minute.
TOY_DEFAULTS = {"tokens": 65_536, "d_in": 64, "features": 256, "seed": 0}


def list_datasets(datasets_dir: Path) -> list[Path]:
    """Activation sets in the datasets folder: files of a known kind, shard directories, and the activation
    folders (one per hook) of a kept stream (`cache_to`: a folder of folders with a manifest each)."""
    if not datasets_dir.is_dir():
        return []
    found: list[Path] = []
    for entry in sorted(datasets_dir.iterdir()):
        if _is_activation_set(entry):
            found.append(entry)
        elif entry.is_dir() and not entry.name.startswith("."):
            found += _kept_streams(entry)
    return found


def _kept_streams(folder: Path) -> list[Path]:
    """The complete activation folders (a manifest each) directly inside `folder`: a kept stream's hooks."""
    return sorted(p.parent for p in folder.glob(f"*/{MANIFEST_FILE}") if not p.parent.name.startswith("."))


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
    return [home / MODELS_DIR, hub_cache(), *named_roots()]


def hub_cache() -> Path:
    """The local Hugging Face hub cache, found as huggingface_hub finds it (read at each call: tests and
    operators may point HF_HOME elsewhere)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    default_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(os.environ.get("HF_HOME") or default_home).expanduser() / "hub"


def hub_snapshot(name: str, kind: Literal["model", "dataset"]) -> Path | None:
    """The folder of hub repository `name` (`org/name` or `name`) in the local cache, or None when `name` is
    not one the cache holds: then it is a path. Only the cache is read, never the hub."""
    cache = hub_cache()
    if not cache.is_dir():
        return None
    from huggingface_hub import snapshot_download  # here: the pages that never name a model do not pay for it

    try:
        folder = Path(snapshot_download(name, repo_type=kind, cache_dir=cache, local_files_only=True))
    except Exception:  # noqa: BLE001  (not a repository id, not in the cache, an unreadable cache: not a hub name)
        return None
    return folder if _inside(folder, [cache]) else None


def offline_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a child process that may load a model or a text: the Hugging Face libraries kept offline."""
    return {**env, **OFFLINE_ENV}


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


def model_allowed(name: str, home: Path) -> bool:
    """Whether a model may be loaded from `name`: a hub name in the local cache, or a path inside the roots."""
    return hub_snapshot(name, "model") is not None or in_model_roots(name, home)


def text_allowed(name: str, home: Path) -> bool:
    """Whether a text dataset may be read from `name`: a hub dataset in the local cache, or a path inside the
    roots."""
    return hub_snapshot(name, "dataset") is not None or in_data_roots(name, home)


def list_extracted(home: Path) -> list[Path]:
    """The lab's complete activation folders in its job folders, newest job first: an extraction's job folder
    (it holds a manifest), and a streamed training's kept stream inside its job folder (`jobs/<id>/<name>/<hook>`
    with a manifest each, as cache_to writes it)."""
    jobs = home / JOBS_DIR
    if not jobs.is_dir():
        return []
    found: list[Path] = []
    for job in sorted((p for p in jobs.iterdir() if p.name.isdigit()), key=lambda p: int(p.name), reverse=True):
        if (job / MANIFEST_FILE).is_file():
            found.append(job)
        elif job.is_dir():
            for inner in sorted(job.iterdir()):
                if inner.is_dir() and not inner.name.startswith(".") and (inner / MANIFEST_FILE).is_file():
                    found.append(inner)
                elif inner.is_dir() and not inner.name.startswith("."):
                    found += _kept_streams(inner)
    return found


def list_models(home: Path) -> list[str]:
    """Models to extract from: folders of SAE_LAB_HOME/models with a config.json, then the hub names the
    local Hugging Face cache holds (`models--org--name` -> `org/name`)."""
    models_dir = home / MODELS_DIR
    local = sorted(str(p) for p in models_dir.iterdir() if (p / "config.json").is_file()) if models_dir.is_dir() else []
    cache = hub_cache()
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
