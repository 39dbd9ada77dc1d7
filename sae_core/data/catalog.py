"""The activation sets a lab offers by name: what lies in SAE_LAB_HOME/datasets (no torch)."""

from __future__ import annotations

from pathlib import Path

from ..files import ACTIVATION_SUFFIXES

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
