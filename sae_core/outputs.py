"""A run's output folder on disk, read without torch: trained SAEs, their figures, checkpoints, the zip.

The training engine writes these folders (engine/trainer.py, engine/checkpoint.py); the pages, the CLI
and the queue read them here. File names come from `files.py`.

What the app serves to a shared URL is read only through here, and only from inside SAE_LAB_HOME: a folder
must resolve inside the home, and a file must be a regular file that is not a symbolic link (a link in a
job folder, or a crafted `out_dir` in the database, cannot make a page read or zip anything else).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from .files import (
    CFG_FILE,
    CHECKPOINT_CHECKSUMS,
    CHECKPOINT_MARKER,
    CHECKPOINT_PREFIX,
    CHECKPOINT_STATE,
    CHECKPOINT_TENSORS,
    CHECKPOINTS_DIR,
    DATASETS_DIR,
    EVAL_FILE,
    LOGS_DIR,
    REFUSED_FILE,
    SAE_REQUIRED,
    SAE_ZIP_FILE,
    SAE_ZIP_MEMBERS,
    SWEEP_FILE,
    WEIGHTS_FILE,
)

DEAD_LOG10 = -9.99  # the trainer clamps frequencies at 1e-10 before log10: that value means "never fired"

# --------------------------------------------------------------------------- what may be served


def served_dir(path: str | Path, home: Path) -> Path | None:
    """`path` if it is a directory that resolves inside `home` (links resolved), else None."""
    try:
        real = Path(os.path.realpath(path))
        return Path(path) if real.is_dir() and real.is_relative_to(os.path.realpath(home)) else None
    except (OSError, ValueError):
        return None


def plain_file(path: Path) -> bool:
    """A regular file that is not a symbolic link (what the pages read and zip)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------- checkpoints


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (marked COMPLETE after their files were written), oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / CHECKPOINT_MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


CHECKSUMMED_FILES = (CHECKPOINT_TENSORS, CHECKPOINT_STATE)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_checksums(folder: Path) -> dict:
    """What checksums.json holds for the checkpoint files in `folder`: each one's size and sha256."""
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
        for name in CHECKSUMMED_FILES
    }


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why the files of `checkpoint` are not the ones written (a sentence naming the file, relative to the run
    folder), or None when each matches its size and sha256. A checkpoint without checksums.json (written before
    they were kept) has nothing to compare: None, and `has_checksums` says so."""
    where = f"{CHECKPOINTS_DIR}/{checkpoint.name}"
    if not has_checksums(checkpoint):
        return None
    try:
        expected = json.loads((checkpoint / CHECKPOINT_CHECKSUMS).read_text())
        entries = {name: (int(expected[name]["bytes"]), str(expected[name]["sha256"])) for name in CHECKSUMMED_FILES}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{where}/{CHECKPOINT_CHECKSUMS} is unreadable ({type(exc).__name__}): nothing can be verified"
    for name, (size, digest) in entries.items():
        path = checkpoint / name
        try:
            actual = path.stat().st_size
            if actual != size:
                return f"{where}/{name} is {actual:,} bytes, {size:,} were written (truncated or overwritten)"
            if file_sha256(path) != digest:
                return f"{where}/{name} does not match its sha256 (its bytes changed after it was written)"
        except OSError as exc:
            return f"{where}/{name} cannot be read ({exc.strerror or type(exc).__name__})"
    return None


def has_checksums(checkpoint: Path) -> bool:
    return (checkpoint / CHECKPOINT_CHECKSUMS).exists()


# --------------------------------------------------------------------------- trained SAEs


def is_trained_sae(directory: Path) -> bool:
    return all(plain_file(directory / name) for name in SAE_REQUIRED)


def find_trained_saes(home: Path) -> list[Path]:
    """Every directory under `home` holding cfg.json + sae_weights.safetensors (checkpoints excluded)."""
    found = []
    for root, dirs, names in os.walk(home):
        # Checkpoint dirs hold intermediate states, logs and datasets hold no SAEs: don't descend.
        dirs[:] = sorted(
            d for d in dirs if d not in (CHECKPOINTS_DIR, LOGS_DIR, DATASETS_DIR) and not d.startswith(".")
        )
        if CFG_FILE in names and WEIGHTS_FILE in names and is_trained_sae(Path(root)):
            found.append(Path(root))
    return sorted(found, key=_sae_sort_key)


def _sae_sort_key(path: Path) -> tuple:
    # jobs/<id> sorted numerically, newest (largest id) first; others by path after them.
    try:
        return (0, -int(path.name), str(path))
    except ValueError:
        return (1, 0, str(path))


# --------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class MemberStatus:
    """One member of a sweep as its folder shows it: "completed" (eval.json), "failed" (error.txt, the reason),
    else "running" (or never started, when the sweep itself ended)."""

    name: str
    folder: Path
    overrides: dict
    status: str
    error: str | None
    figures: dict


def sweep_members(run_dir: str | Path) -> list[MemberStatus]:
    """The members of the sweep written into `run_dir` (its sweep.json), in grid order, each with its status;
    [] for a folder that holds no sweep."""
    run_dir = Path(run_dir)
    listed = read_json(run_dir / SWEEP_FILE).get("members")
    members = []
    for entry in listed if isinstance(listed, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        folder = run_dir / Path(entry["name"]).name  # only ever a child of the run's folder
        figures = read_json(folder / EVAL_FILE)
        error = _read_text(folder / REFUSED_FILE) if not figures else None
        status = "completed" if figures else "failed" if error is not None else "running"
        overrides = entry.get("overrides")
        overrides = overrides if isinstance(overrides, dict) else {}
        members.append(MemberStatus(entry["name"], folder, overrides, status, error, figures))
    return members


def _read_text(path: Path, limit: int = 4000) -> str | None:
    if not plain_file(path):
        return None
    try:
        return path.read_text(errors="replace")[:limit].strip()
    except OSError:
        return None


def read_json(path: Path) -> dict:
    """A JSON object from a plain file; {} when it is missing, a link, unreadable or not an object."""
    if not plain_file(path):
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def read_log10_frequency(path: Path) -> np.ndarray | None:
    """The per-latent log10 firing frequency from sparsity.safetensors (None if absent, a link, unreadable)."""
    if not plain_file(path):
        return None
    try:
        tensors = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError):
        return None
    values = tensors.get("sparsity")
    if values is None and tensors:
        values = next(iter(tensors.values()))
    return None if values is None else values.astype("float64").ravel()


# --------------------------------------------------------------------------- the download


def zip_is_current(zip_path: Path, sae_dir: Path) -> bool:
    """The prepared zip exists and is newer than every file it packs."""
    if not plain_file(zip_path):
        return False
    zip_mtime = zip_path.stat().st_mtime
    for name in SAE_ZIP_MEMBERS:
        member = sae_dir / name
        if plain_file(member) and member.stat().st_mtime > zip_mtime:
            return False
    return True


def build_sae_zip(sae_dir: Path, zip_path: Path | None = None) -> Path:
    """Pack the SAE files into `sae_dir/sae.zip` without compression (weights don't compress, and
    ZIP_STORED copies in chunks so a multi-GB SAE never sits in memory). Written beside, then renamed,
    so a half-written zip is never offered."""
    if not is_trained_sae(sae_dir):
        raise FileNotFoundError(f"{sae_dir} holds no trained SAE (needs {' and '.join(SAE_REQUIRED)})")
    zip_path = zip_path or sae_dir / SAE_ZIP_FILE
    partial = zip_path.with_name(zip_path.name + ".partial")
    partial.unlink(missing_ok=True)  # a link left there must not be written through
    with zipfile.ZipFile(partial, "x", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in SAE_ZIP_MEMBERS:
            member = sae_dir / name
            if plain_file(member):  # never through a link
                zf.write(member, arcname=name)
    os.replace(partial, zip_path)  # replaces a link at zip_path itself, never its target
    return zip_path
