"""Where a lab's activations may come from: SAE_LAB_HOME/datasets and the roots an operator names, and the
sets lying in the datasets folder (no torch).

A shared URL must not let anyone probe the server's files: a path outside the allowed roots gets one answer,
whatever lies there (it is not opened, and its existence is not revealed).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..files import ACTIVATION_SUFFIXES, DATASETS_DIR

DATA_ROOTS_ENV = "SAE_LAB_DATA_ROOTS"  # more folders to read activations from, separated by os.pathsep
OUTSIDE_ROOTS = (
    f"SAE Lab reads activations only from SAE_LAB_HOME/{DATASETS_DIR} and the folders named in {DATA_ROOTS_ENV}; "
    "put the set (or a link to it) there, or ask the operator to add its folder"
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


def data_roots(home: Path) -> list[Path]:
    """The folders activations may be read from: the lab's datasets folder, then SAE_LAB_DATA_ROOTS."""
    named = [Path(p).expanduser() for p in os.environ.get(DATA_ROOTS_ENV, "").split(os.pathsep) if p.strip()]
    return [home / DATASETS_DIR, *named]


def in_data_roots(source: str | Path, home: Path) -> bool:
    """Whether `source`, symlinks resolved, lies inside one of the allowed roots (an unreadable path: no)."""
    try:
        real = Path(os.path.realpath(Path(source).expanduser()))
        return any(real.is_relative_to(os.path.realpath(root)) for root in data_roots(home))
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False
