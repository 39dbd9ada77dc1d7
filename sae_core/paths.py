"""Where SAE Lab keeps its files: everything lives under SAE_LAB_HOME (default ./lab_data)."""

from __future__ import annotations

import os
from pathlib import Path

from . import files


def lab_home() -> Path:
    """The lab's root folder, created on first use."""
    home = Path(os.environ.get("SAE_LAB_HOME", "lab_data")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def db_path(home: Path | None = None) -> Path:
    return (home or lab_home()) / files.DATABASE_FILE


def datasets_dir(home: Path | None = None) -> Path:
    path = (home or lab_home()) / files.DATASETS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def jobs_dir(home: Path | None = None) -> Path:
    path = (home or lab_home()) / files.JOBS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def job_dir(job_id: int, home: Path | None = None) -> Path:
    return jobs_dir(home) / str(job_id)
