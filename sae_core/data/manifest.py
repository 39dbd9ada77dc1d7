"""`manifest.json`: the index of an activation folder, so that a set of thousands of shards opens at once.

The manifest names every shard with its row count, and the width and dtype they all share; with it,
`open_activations` maps a shard only when a row of it is first read (no header is touched up front). It
also carries where the rows came from (model, hook, tokenizer, ... when a model produced them). The
writer (extraction) writes it last, through a temporary file and a rename: a folder with a manifest is
complete. A folder without one is still read by opening every shard. No torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..files import ACTIVATION_SUFFIXES, MANIFEST_FILE
from ..jsonfile import ConfigError, read_json_object
from ..text import brief
from .formats import ALLOWED_DTYPES, DatasetError

MANIFEST_KIND = "activations"
MAX_MANIFEST_BYTES = 256 * 2**20  # ~3 M shards; more than any set we expect, less than a stray big file
# Provenance: what produced the rows (the extraction writes them; DESIGN.md's contract names them).
PROVENANCE_FIELDS = (
    "model", "hook", "context_size", "tokenizer", "bos_token_id", "special_token_ids", "n_contexts", "dataset", "text_field",
    "split", "exclude_special_tokens",
    "held_out_rows",  # a kept stream (data/stream_cache.py): the last rows, whole contexts; those before are mixed
    "hook_side",  # a kept stream of a module's input (a transcoder's): "in"; absent: the hook's output
)  # fmt: skip


@dataclass(frozen=True)
class ShardEntry:
    file: str  # a plain file name inside the folder
    rows: int


@dataclass(frozen=True)
class Manifest:
    d_in: int
    dtype: str
    shards: tuple[ShardEntry, ...]
    provenance: dict = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> str:
        body = {
            "kind": MANIFEST_KIND,
            **self.provenance,
            "d_in": self.d_in,
            "dtype": self.dtype,
            "n_rows": self.n_rows,
            "shards": [{"file": s.file, "rows": s.rows} for s in self.shards],
        }
        return json.dumps(body, indent=1)


def read_manifest(directory: Path) -> Manifest | None:
    """The folder's manifest, None when it has none; a DatasetError names the field of a bad one."""
    path = directory / MANIFEST_FILE
    if not path.exists():
        return None
    shown = brief(path)
    try:
        data = read_json_object(path, "manifest", "the folder's shards", MAX_MANIFEST_BYTES)
    except ConfigError as exc:
        raise DatasetError(str(exc)) from None
    if data.get("kind") != MANIFEST_KIND:
        raise DatasetError(f"{shown}: kind must be {MANIFEST_KIND!r}, got {brief(data.get('kind'), 40)!r}")
    d_in = _count(data, "d_in", shown, minimum=1)
    dtype = data.get("dtype")
    if dtype not in ALLOWED_DTYPES:
        raise DatasetError(f"{shown}: dtype must be one of {', '.join(ALLOWED_DTYPES)}, got {brief(dtype, 40)!r}")
    shards = _shard_entries(data.get("shards"), shown)
    manifest = Manifest(d_in, dtype, shards, {k: data[k] for k in PROVENANCE_FIELDS if k in data})
    if "n_rows" in data and _count(data, "n_rows", shown) != manifest.n_rows:
        raise DatasetError(f"{shown}: n_rows is {data['n_rows']} but the shards hold {manifest.n_rows} rows")
    return manifest


def _count(data: dict, name: str, shown: str, minimum: int = 0) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DatasetError(f"{shown}: {name} must be an integer ≥ {minimum}, got {brief(value, 40)!r}")
    return value


def _shard_entries(raw, shown: str) -> tuple[ShardEntry, ...]:
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{shown}: shards must be a non-empty list of {{file, rows}}")
    entries: list[ShardEntry] = []
    listed: dict[str, int] = {}  # file -> its first index
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise DatasetError(f"{shown}: shards[{i}] must be an object {{file, rows}}")
        name = item.get("file")
        if not _is_plain_shard_name(name):
            raise DatasetError(
                f"{shown}: shards[{i}].file must be a file name in the folder ending in "
                f"{' or '.join(ACTIVATION_SUFFIXES)}, got {brief(name, 60)!r}"
            )
        first = listed.setdefault(str(name), i)
        if first != i:  # its rows would count twice: in training and in the held-out rows at once
            raise DatasetError(f"{shown}: shards[{i}].file {brief(name, 60)!r} is listed twice (also shards[{first}])")
        entries.append(ShardEntry(str(name), _count(item, "rows", f"{shown}: shards[{i}]")))
    return tuple(entries)


def _is_plain_shard_name(name) -> bool:
    """A name, not a path: a manifest may not point outside its folder."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not name.startswith(".")
        and Path(name).suffix.lower() in ACTIVATION_SUFFIXES
    )


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write `manifest.json` atomically (temporary file, fsync, rename): readers see all of it or none."""
    path = directory / MANIFEST_FILE
    temporary = directory / f".{MANIFEST_FILE}.tmp"
    with open(temporary, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    return path
