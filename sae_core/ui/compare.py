"""The SAEs page's comparison view, without Streamlit: which SAEs, their figures as one frame, the Pareto frontier
of sparsity against fidelity.

An SAE is better with a lower L0 (fewer active latents per token) and a lower FVU (or a higher CE loss score):
the frontier is the SAEs no other SAE beats on both at once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..files import CFG_FILE, EVAL_FILE, SWEEP_FILE
from ..outputs import read_json, sweep_members

# The figures compared (eval.json's keys) and the table's columns for them; FVU and L0 from training's holdout,
# the rest after a model evaluation.
FIGURES = ("l0", "fvu", "ce_loss_score", "kl_div_score", "explained_variance", "dead_fraction", "mmcs")
# (x, y, y higher is better) of each chart
CHARTS = (("l0", "fvu", False), ("l0", "ce_loss_score", True))


@dataclass(frozen=True)
class Compared:
    """One SAE in the comparison: how it is named, its folder, what its sweep set (empty for a lone SAE)."""

    name: str
    folder: Path
    overrides: dict = field(default_factory=dict)


def sweep_folders(saes: Iterable[Path]) -> list[Path]:
    """The sweeps' run folders among trained SAEs' parents (a member's folder is a child of its sweep's)."""
    found: list[Path] = []
    for sae in saes:
        if (sae.parent / SWEEP_FILE).is_file() and sae.parent not in found:
            found.append(sae.parent)
    return found


def sweep_entries(run_dir: Path) -> list[Compared]:
    """A sweep's completed members (they have eval.json), named as the sweep names them."""
    return [Compared(m.name, m.folder, m.overrides) for m in sweep_members(run_dir) if m.status == "completed"]


def picked_entries(folders: Iterable[Path], home: Path) -> list[Compared]:
    """Hand-picked SAE folders, named by their place in the lab (a sweep's member keeps its overrides)."""
    entries = []
    for folder in folders:
        name = str(folder.relative_to(home)) if folder.is_relative_to(home) else str(folder)
        overrides = next((m.overrides for m in sweep_members(folder.parent) if m.folder == folder), {})
        entries.append(Compared(name, folder, overrides))
    return entries


def comparison_frame(entries: Sequence[Compared], home: Path) -> pd.DataFrame:
    """A row per SAE: its name, folder (relative to `home`, what Explore opens), the config that sets it
    apart (text), its architecture and width, and every figure of FIGURES its eval.json holds (else None);
    `frontier_fvu` / `frontier_ce` say whether it is on that chart's Pareto frontier."""
    rows = []
    for entry in entries:
        figures, cfg = read_json(entry.folder / EVAL_FILE), read_json(entry.folder / CFG_FILE)
        metadata = cfg.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        folder = str(entry.folder.relative_to(home)) if entry.folder.is_relative_to(home) else ""
        rows.append(
            {
                "name": entry.name,
                "folder": folder,
                "config": json.dumps(entry.overrides, sort_keys=True) if entry.overrides else "",
                "architecture": str(metadata.get("trained_architecture") or cfg.get("architecture") or ""),
                "d_sae": _number(cfg.get("d_sae")),
                **{name: _number(figures.get(name)) for name in FIGURES},
            }
        )
    frame = pd.DataFrame(rows, columns=["name", "folder", "config", "architecture", "d_sae", *FIGURES])
    for (x, y, higher), column in zip(CHARTS, ("frontier_fvu", "frontier_ce"), strict=True):
        on = set(pareto_frontier(frame[x].tolist(), frame[y].tolist(), higher_is_better=higher))
        frame[column] = [i in on for i in range(len(frame))]
    return frame


def pareto_frontier(xs: Sequence[float | None], ys: Sequence[float | None], *, higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats: one beats another when its x (L0, lower is better) is no
    higher and its y no worse (lower, or higher with `higher_is_better`), and it is strictly better on one.
    Points missing either value are left out. Sorted by x (then by y, best first): the frontier's line."""
    points = [
        (x, -y if higher_is_better else y, i)
        for i, (x, y) in enumerate(zip(map(_number, xs), map(_number, ys), strict=True))
        if x is not None and y is not None
    ]
    points.sort()
    frontier: list[int] = []
    last: tuple[float, float] | None = None
    for x, y, i in points:
        # sorted by x then y: a point is on the frontier when its y beats every point at a lower or equal x,
        # or ties exactly with the last frontier point (neither beats the other)
        if last is None or y < last[1] or (x, y) == last:
            frontier.append(i)
            last = (x, y)
    return frontier


def clicked_folder(event, selection: str) -> str | None:
    """The `folder` of the point a chart's click selected (Streamlit's on_select event), or None."""
    chosen = (event.get("selection") or {}).get(selection) if event else None
    first = chosen[0] if isinstance(chosen, list) and chosen else None
    folder = first.get("folder") if isinstance(first, dict) else None
    return folder if isinstance(folder, str) and folder else None


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(value) -> float | None:
    return float(value) if _finite(value) else None
