"""Atomic checkpoints for exact resume.

Layout: DIR/checkpoints/step_000001000/{state.safetensors, state.json, COMPLETE}.
A checkpoint is written into a hidden temp folder, fsynced, renamed into place, and only then
marked COMPLETE; older ones are pruned after that. A kill at any instant therefore leaves the
previous complete checkpoint untouched and loadable. Nothing is unpickled on load: tensors
come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
TENSORS = "state.safetensors"
STATE = "state.json"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int) -> Path:
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:09d}"
    tmp = root / f".tmp_step_{step:09d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({name: t.detach().contiguous().cpu() for name, t in tensors.items()}, str(tmp / TENSORS))
    (tmp / STATE).write_text(json.dumps(state))
    for name in (TENSORS, STATE):
        _fsync_path(tmp / name)
    _fsync_path(tmp)
    if final.exists():  # a rewrite of the same step (e.g. the final checkpoint after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    (final / MARKER).write_text(str(step))
    _fsync_path(final / MARKER)
    _fsync_path(final)
    _fsync_path(root)
    prune(root, keep)
    return final


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step_") and (p / MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not (path / MARKER).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    return load_file(str(path / TENSORS)), json.loads((path / STATE).read_text())


def prune(root: Path, keep: int) -> None:
    done = complete_checkpoints(root.parent)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in root.glob(".tmp_step_*"):  # from a writer that was killed mid-way
        if not leftover.name.endswith(f"_{os.getpid()}"):
            shutil.rmtree(leftover, ignore_errors=True)


# -- optimizer state <-> flat tensors + JSON (no pickling)


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors = {}
    for param_id, slots in sd["state"].items():
        for slot, value in slots.items():
            tensors[f"optim.{param_id}.{slot}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, param_id, slot = name.split(".", 2)
            state.setdefault(int(param_id), {})[slot] = value
    return {"state": state, "param_groups": meta["param_groups"]}
