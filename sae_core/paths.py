"""Where SAE Lab keeps its files, and who may read them: everything lives under SAE_LAB_HOME (default
./lab_data), private to the user unless SAE_LAB_SHARED_GROUP names a group to share it with."""

from __future__ import annotations

import grp
import os
from pathlib import Path

from . import files

SHARED_GROUP_ENV = "SAE_LAB_SHARED_GROUP"


def use_private_files() -> None:
    """Make every file and folder this process (and the processes it starts) creates private: 0600/0700,
    or 0660/0770 for SAE_LAB_SHARED_GROUP, whatever umask the shell had. Called by every entry point."""
    os.umask(0o007 if os.environ.get(SHARED_GROUP_ENV) else 0o077)


def file_mode() -> int:
    """The mode of a lab file: the user's alone, or the shared group's too (for files made outside our
    umask's reach: SQLite creates its files 0644 whatever the umask allows)."""
    return 0o660 if os.environ.get(SHARED_GROUP_ENV) else 0o600


def home_path() -> Path:
    """The lab's root folder as configured (SAE_LAB_HOME, default ./lab_data), without creating it."""
    return Path(os.environ.get("SAE_LAB_HOME", "lab_data")).resolve()


def lab_home() -> Path:
    """The lab's root folder, created on first use (with SAE_LAB_SHARED_GROUP: owned by that group, whose
    setgid bit makes everything created inside belong to it too)."""
    home = home_path()
    if not home.exists():
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        if group := os.environ.get(SHARED_GROUP_ENV):
            os.chown(home, -1, grp.getgrnam(group).gr_gid)
            home.chmod(0o2770)
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
