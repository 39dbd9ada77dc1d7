"""Sweeps: one training job that trains a grid of SAEs on one read of the data (no torch).

A training config becomes a sweep when it carries `"sweep": {FIELD: [values, ...]}` (every combination, in the
order the fields are written) or `"members": [{FIELD: value, ...}, ...]` (an explicit list of overrides). The
other keys are the base every member starts from; a field the grid sets need not appear there. Each member is a
complete TrainConfig, validated as a single run would be, and named by the values that set it apart
(`d_sae=16384,k=64,arch=topk`); its SAE folder is that name under the run's output folder.

A member may change anything that does not change the batch: the fields in BATCH_FIELDS are read once for every
member, so they are the same for all (`init_seed` varies a member's initialisation; `seed` fixes the data
order). `placement` says how several ranks share the work: "batch" splits each batch across ranks (DDP, as a
single run), "members" gives each rank its share of the members on the whole batch (no gradient all-reduce),
"auto" lets the gate pick the one that fits.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config import ConfigError, TrainConfig
from .jsonfile import read_json_object
from .text import brief

SWEEP_KEY, MEMBERS_KEY, PLACEMENT_KEY = "sweep", "members", "placement"
Placement = Literal["batch", "members"]
PLACEMENTS: tuple[str, ...] = ("auto", "batch", "members")
MAX_MEMBERS = 256
# What every member reads or loops over together: the data, its order, the batch and the loop's cadence.
BATCH_FIELDS = (
    "activation_source",
    "activation_key",
    "batch_size",
    "total_steps",
    "seed",
    "holdout_tokens",
    "device",
    "shuffle_block_bytes",
    "shuffle_buffer_bytes",
    "shuffle",
    "reader_threads",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    # a model source: one forward pass (of the same contexts, mixed alike) feeds every member; `hook` may vary
    "model",
    "dataset",
    "text_field",
    "split",
    "context_size",
    "prepend_bos",
    "exclude_special_tokens",
    "model_dtype",
    "model_batch_size",
    "mixing_contexts",
    "cache_to",  # one stream, kept once
    "evaluate_contexts",  # one pass of the model over the held-out contexts evaluates every member
)
# How a member's name shows a field (the rest by their own names).
SHORT_NAMES = {"architecture": "arch", "l1_coefficient": "l1", "matryoshka_widths": "widths"}
_UNSAFE_IN_FOLDER = re.compile(r"[^A-Za-z0-9_.,=+\-]")


@dataclass(frozen=True)
class Member:
    """One SAE of a sweep: its name (also its folder under the run's), what it overrides, its whole config."""

    name: str
    overrides: dict
    config: TrainConfig

    def folder(self, run_dir: str | Path) -> Path:
        return Path(run_dir) / self.name


@dataclass(frozen=True)
class Sweep:
    """A sweep config, expanded: the base keys, the members in grid order, and the placement asked for."""

    base: dict
    grid: dict[str, list] | None
    listed: list[dict] | None
    placement: str
    members: tuple[Member, ...]

    @property
    def shared(self) -> TrainConfig:
        """The first member's config: its BATCH_FIELDS are every member's."""
        return self.members[0].config

    def to_dict(self) -> dict:
        """The sweep as the JSON it was read from (the placement resolved when the gate set it)."""
        extra = {SWEEP_KEY: self.grid} if self.grid is not None else {MEMBERS_KEY: self.listed}
        return {**self.base, **extra, PLACEMENT_KEY: self.placement}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # -- what the job store and the kinds table ask of a job config (as of a StrictConfig)
    def model_dump_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def model_validate_json(cls, text: str) -> Sweep:
        return sweep_from_dict(json.loads(text))

    @property
    def total_steps(self) -> int:
        return self.shared.total_steps

    @property
    def device(self) -> str:
        return self.shared.device

    def with_placement(self, placement: Placement) -> Sweep:
        return Sweep(self.base, self.grid, self.listed, placement, self.members)

    def member(self, name: str) -> Member:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(name)


def is_sweep(data: dict) -> bool:
    return isinstance(data, dict) and (SWEEP_KEY in data or MEMBERS_KEY in data)


def read_training_config(path: str | Path) -> TrainConfig | Sweep:
    """A training config file: a single run's TrainConfig or a Sweep (ConfigError naming what is wrong)."""
    return training_config_from_dict(read_json_object(path, "config file", "TrainConfig keys"))


def training_config_from_dict(data: dict) -> TrainConfig | Sweep:
    return sweep_from_dict(data) if is_sweep(data) else TrainConfig.from_dict(data)


def sweep_from_dict(data: dict) -> Sweep:
    """Expand and check a sweep config; ConfigError naming the key, or the member and its field."""
    base = {key: value for key, value in data.items() if key not in (SWEEP_KEY, MEMBERS_KEY, PLACEMENT_KEY)}
    placement = data.get(PLACEMENT_KEY, "auto")
    if placement not in PLACEMENTS:
        raise ConfigError(f"placement: got {brief(repr(placement), 40)}; allowed: {', '.join(PLACEMENTS)}")
    if SWEEP_KEY in data and MEMBERS_KEY in data:
        raise ConfigError("sweep and members: give one of them (a grid, or a list of members), not both")
    grid = _grid(data[SWEEP_KEY]) if SWEEP_KEY in data else None
    listed = _listed(data[MEMBERS_KEY]) if MEMBERS_KEY in data else None
    overrides = _combinations(grid) if grid is not None else listed or []
    varying = list(dict.fromkeys(key for override in overrides for key in override))
    members = [_member(base, override, varying) for override in overrides]
    _check_distinct(members)
    _check_batch_fields(members)
    return Sweep(base, grid, listed, placement, tuple(members))


def _grid(grid) -> dict[str, list]:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError('sweep: must be an object of fields and their values, such as {"d_sae": [4096, 16384]}')
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep.{brief(key, 40)}: must be a non-empty list of values")
        _check_varies(key, f"sweep.{brief(key, 40)}")
    size = 1
    for values in grid.values():
        size *= len(values)
    if size > MAX_MEMBERS:
        raise ConfigError(f"sweep: {size:,} combinations; at most {MAX_MEMBERS} members per sweep")
    return grid


def _listed(members) -> list[dict]:
    if not isinstance(members, list) or not members:
        raise ConfigError("members: must be a non-empty list of objects, each the fields that member changes")
    if len(members) > MAX_MEMBERS:
        raise ConfigError(f"members: {len(members):,} members; at most {MAX_MEMBERS} per sweep")
    for i, override in enumerate(members):
        if not isinstance(override, dict):
            raise ConfigError(f'members[{i}]: must be an object of fields, such as {{"k": 32}}')
        for key in override:
            _check_varies(key, f"members[{i}].{brief(key, 40)}")
    return members


def _check_varies(key: str, where: str) -> None:
    if key in BATCH_FIELDS:
        raise ConfigError(
            f"{where}: {key} fixes the batch every member reads, so it cannot vary within a sweep "
            f"(fields that cannot: {', '.join(BATCH_FIELDS)})"
        )
    if key in (SWEEP_KEY, MEMBERS_KEY, PLACEMENT_KEY):
        raise ConfigError(f"{where}: a sweep cannot be nested")


def _combinations(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def member_name(override: dict, varying: list[str]) -> str:
    """`d_sae=16384,k=64,arch=topk`: the member's values of the fields that vary, in the sweep's order; usable
    as a folder name."""
    parts = [f"{SHORT_NAMES.get(key, key)}={_shown(override[key])}" for key in varying if key in override]
    name = _UNSAFE_IN_FOLDER.sub("_", ",".join(parts)) or "base"
    return name[:200]


def _shown(value) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "+".join(_shown(v) for v in value)
    return str(value)


def _member(base: dict, override: dict, varying: list[str]) -> Member:
    name = member_name(override, varying)
    try:
        config = TrainConfig.from_dict({**base, **override})
    except ConfigError as exc:
        raise ConfigError(f"member {name}: {exc}") from None
    return Member(name, dict(override), config)


def _check_distinct(members: list[Member]) -> None:
    seen: dict[str, int] = {}
    for i, member in enumerate(members):
        if member.name in seen:
            raise ConfigError(f"members[{seen[member.name]}] and members[{i}] are the same member ({member.name})")
        seen[member.name] = i


def _check_batch_fields(members: list[Member]) -> None:
    """Defaults may differ by architecture in principle; what fixes the batch must not differ at all."""
    first = members[0].config
    for member in members[1:]:
        for key in BATCH_FIELDS:
            if getattr(member.config, key) != getattr(first, key):
                raise ConfigError(f"member {member.name}: {key} differs from the other members'")
