"""Activation datasets: memory-mapped readers, up-front checks, the rank-sharded data order, a toy generator.

Sources are a `.safetensors` file, a `.npy` file, or a directory of shards of either kind. Nothing here reads a whole
set into RAM: every shard is memory-mapped and `ActivationSet.read` copies only the rows asked for, as float32.

Data order (`RankBatches`) is a pure function of (n_rows, holdout, global_batch, seed, epoch, position): every rank
computes the same global batch and takes its own contiguous slice, so the ranks' slices laid end to end are exactly
the batch a 1-rank run sees. That is what lets a 2-rank DDP run end with the weights of a 1-rank run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = [
    "ALLOWED_DTYPES",
    "SUFFIXES",
    "ActivationSet",
    "DatasetError",
    "Prefetcher",
    "RankBatches",
    "Shard",
    "ToyCodes",
    "ToyGenerator",
    "ToySummary",
    "check_dataset",
    "cli_toy",
    "find_nonfinite",
    "open_activations",
    "write_toy",
]

SUFFIXES: tuple[str, ...] = (".safetensors", ".npy")
ALLOWED_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")
FEATURES_KEY = "features"

# safetensors dtype codes we read, and how their bytes are mapped (bfloat16 has no numpy dtype: kept as raw uint16).
_ST_FLOATS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_STORAGE = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}
_ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 2**20
_SCAN_CHUNK_BYTES = 32 * 2**20  # bounded memory for the NaN/Inf scan
_FLOAT32_MAX = float(np.finfo(np.float32).max)

# Independent random streams derived from the one user seed.
_HOLDOUT_STREAM, _EPOCH_STREAM, _TOY_STREAM = 1, 2, 3


class DatasetError(ValueError):
    """A problem with the activation data, phrased for a person: which file, what is wrong, what is allowed."""


# --------------------------------------------------------------------------------------------------------------------
# Opening files
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorEntry:
    """One tensor of a safetensors header; `offset` is absolute in the file."""

    name: str
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _read_safetensors_header(path: Path) -> dict[str, _TensorEntry]:
    """Parse the header (8-byte little-endian length, then JSON) without touching the tensor bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DatasetError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise DatasetError(f"{path}: not a safetensors file (header length {header_len} exceeds the file)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{path}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise DatasetError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_start = 8 + header_len
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        expected = math.prod(shape) * _ST_ITEMSIZE.get(dtype, 0)
        if _ST_ITEMSIZE.get(dtype) and (end - begin != expected or begin < 0 or data_start + end > size):
            raise DatasetError(
                f"{path}: tensor {name!r} is truncated or corrupt "
                f"(shape {list(shape)} {dtype} needs {expected} bytes, header says {end - begin}, file has {size})"
            )
        entries[name] = _TensorEntry(name, dtype, shape, data_start + begin, end - begin)
    return entries


def _logical_dtype_of_safetensors(path: Path, entry: _TensorEntry) -> str:
    if entry.dtype in _ST_FLOATS:
        return _ST_FLOATS[entry.dtype]
    kind = "bool" if entry.dtype == "BOOL" else "integer" if entry.dtype[0] in "IU" else "unsupported"
    raise DatasetError(
        f"{path}: tensor {entry.name!r} has {kind} dtype {entry.dtype}; allowed: {', '.join(ALLOWED_DTYPES)}"
    )


def _logical_dtype_of_numpy(path: Path, dtype: np.dtype) -> str:
    if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):
        return {2: "float16", 4: "float32", 8: "float64"}[dtype.itemsize]
    kind = {"b": "bool", "i": "integer", "u": "integer"}.get(dtype.kind, "unsupported")
    raise DatasetError(f"{path}: array has {kind} dtype {dtype}; allowed: {', '.join(ALLOWED_DTYPES)}")


def _map_safetensors(path: Path, key: str, *, required: bool = True) -> tuple[np.ndarray, str] | None:
    """Memory-map tensor `key` of a safetensors file; returns (raw array, logical dtype)."""
    entries = _read_safetensors_header(path)
    if key not in entries:
        if not required:
            return None
        present = ", ".join(repr(k) for k in entries) or "none"
        raise DatasetError(f"{path}: no tensor named {key!r}; tensors present: {present}")
    entry = entries[key]
    dtype = _logical_dtype_of_safetensors(path, entry)
    if entry.nbytes == 0:  # mmap cannot map zero bytes
        return np.empty(entry.shape, _STORAGE[dtype]), dtype
    return np.memmap(path, dtype=_STORAGE[dtype], mode="r", offset=entry.offset, shape=entry.shape), dtype


def _map_npy(path: Path) -> tuple[np.ndarray, str]:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "empty file" in str(exc) or "cannot mmap" in str(exc):
            array = np.load(path, allow_pickle=False)  # a zero-sized array: nothing to map, nothing to read
        else:
            raise DatasetError(f"{path}: not a readable .npy array ({exc})") from None
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npy file ({exc})") from None
    return array, _logical_dtype_of_numpy(path, array.dtype)


def _map_file(path: Path, key: str) -> tuple[np.ndarray, str]:
    if path.suffix.lower() == ".safetensors":
        return _map_safetensors(path, key)
    return _map_npy(path)


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Rows in their stored dtype -> C-contiguous float32 (exact for float16/bfloat16, rounded for float64)."""
    if dtype == "bfloat16":
        # bfloat16 is the top half of a float32: shifting the bits up is an exact conversion.
        return (raw.astype(np.uint32, order="C") << 16).view(np.float32)
    return raw.astype(np.float32, order="C")


def _is_features_file(path: Path) -> bool:
    """`features.npy`, `features.safetensors` and `<name>.features.npy` hold ground truth, not activations."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return stem == FEATURES_KEY or stem.endswith("." + FEATURES_KEY)


def _list_shards(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    shards = [p for p in files if p.suffix.lower() in SUFFIXES and not _is_features_file(p)]
    if not shards:
        found = f" (found: {', '.join(p.name for p in files[:10])}{' ...' if len(files) > 10 else ''})" if files else ""
        raise DatasetError(
            f"{directory}: directory holds no activation shards; expected files ending in {' or '.join(SUFFIXES)}"
            f"{found}"
        )
    return shards


# --------------------------------------------------------------------------------------------------------------------
# ActivationSet
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Shard:
    """One memory-mapped file of a set: rows [start, start + rows) of the whole."""

    path: Path
    array: np.ndarray  # [rows, d_in], stored dtype (bfloat16 as raw uint16), memory-mapped
    dtype: str  # logical dtype, one of ALLOWED_DTYPES
    start: int

    @property
    def rows(self) -> int:
        return int(self.array.shape[0])

    @property
    def stop(self) -> int:
        return self.start + self.rows


class ActivationSet:
    """A memory-mapped [n_rows, d_in] activation matrix, possibly split over several shard files."""

    def __init__(self, source: Path, shards: list[Shard], features: torch.Tensor | None = None):
        self.source = source
        self.shards = shards
        self.features = features  # [n_features, d_in] float32 ground truth, when the data carries it
        self.n_rows = shards[-1].stop
        self.d_in = int(shards[0].array.shape[1])
        dtypes = sorted({s.dtype for s in shards})
        self.dtype = dtypes[0] if len(dtypes) == 1 else "+".join(dtypes)
        self._starts = np.array([s.start for s in shards] + [self.n_rows], dtype=np.int64)

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return f"ActivationSet({self.describe()})"

    @property
    def nbytes(self) -> int:
        return sum(int(s.array.nbytes) for s in self.shards)

    def describe(self) -> str:
        """One line for people: where, how many rows, how wide, which dtype."""
        files = f"{len(self.shards)} shards" if len(self.shards) > 1 else "1 file"
        truth = f", {self.features.shape[0]} ground-truth features" if self.features is not None else ""
        return f"{self.source}: {self.n_rows:,} rows x {self.d_in} {self.dtype} ({files}{truth})"

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """Rows `rows` (any order, repeats allowed) as float32 [len(rows), d_in], in the order given."""
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise TypeError(f"rows must be a 1-D array of integers, got shape {rows.shape} dtype {rows.dtype}")
        rows = rows.astype(np.int64, copy=False)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            bad = rows[(rows < 0) | (rows >= self.n_rows)][0]
            raise IndexError(f"row {bad} is out of range for {self.source} ({self.n_rows} rows)")
        # Read in ascending order (sequential pages, one pass per shard), then scatter back to the caller's order.
        order = np.argsort(rows, kind="stable")
        ascending = rows[order]
        cuts = np.searchsorted(ascending, self._starts)  # cuts[i]:cuts[i+1] fall in shard i
        out = np.empty((rows.size, self.d_in), dtype=np.float32)
        for i, shard in enumerate(self.shards):
            lo, hi = cuts[i], cuts[i + 1]
            if hi > lo:
                out[order[lo:hi]] = _to_float32(shard.array[ascending[lo:hi] - shard.start], shard.dtype)
        return torch.from_numpy(out)

    def read_range(self, start: int, stop: int) -> torch.Tensor:
        """Contiguous rows [start, stop) as float32 (slices, no index arrays)."""
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"range [{start}, {stop}) is out of bounds for {self.source} ({self.n_rows} rows)")
        parts = [
            _to_float32(s.array[max(start, s.start) - s.start : min(stop, s.stop) - s.start], s.dtype)
            for s in self.shards
            if s.start < stop and start < s.stop
        ]
        if not parts:
            return torch.empty((0, self.d_in), dtype=torch.float32)
        return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))

    def iter_chunks(self, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, float32 [<= chunk_rows, d_in]) for consecutive chunks covering every row once."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        for start in range(0, self.n_rows, chunk_rows):
            yield start, self.read_range(start, min(self.n_rows, start + chunk_rows))


def open_activations(source: str | Path, key: str = "activations") -> ActivationSet:
    """Memory-map an activation source: a .safetensors file (tensor `key`), a .npy file, or a directory of shards.

    Raises DatasetError for anything that cannot be read as a 2-D float matrix: a missing path, an unsupported
    suffix, an empty directory, a missing tensor key, a shape that is not 2-D, a non-float dtype, shards of
    differing width. Values are not scanned here (see `check_dataset`).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(
            f"activation source not found: {path} (expected a .safetensors file, a .npy file or a directory of them)"
        )
    if path.is_dir():
        paths = _list_shards(path)
    elif path.suffix.lower() in SUFFIXES:
        paths = [path]
    else:
        raise DatasetError(
            f"{path}: unsupported file type {path.suffix or '(no suffix)'!r}; "
            f"allowed: {', '.join(SUFFIXES)}, or a directory of such shards"
        )
    shards, start = [], 0
    for p in paths:
        array, dtype = _map_file(p, key)
        if array.ndim != 2:
            what = f"tensor {key!r}" if p.suffix.lower() == ".safetensors" else "array"
            raise DatasetError(
                f"{p}: {what} has shape {list(array.shape)} ({array.ndim}-D); activations must be 2-D [tokens, d_in]"
            )
        if shards and array.shape[1] != shards[0].array.shape[1]:
            first = shards[0]
            raise DatasetError(
                f"shards differ in width: {first.path.name} has d_in {first.array.shape[1]} but {p.name} has "
                f"{array.shape[1]}; all shards in {path} must have the same width"
            )
        shards.append(Shard(p, array, dtype, start))
        start += array.shape[0]
    d_in = int(shards[0].array.shape[1])
    features = _load_features(path, shards, key, d_in)
    return ActivationSet(path, shards, features)


def _features_candidates(source: Path, shards: list[Shard]) -> list[Path]:
    """Where ground-truth features may live, in order of preference."""
    if source.is_dir():
        return [source / f"{FEATURES_KEY}{s}" for s in SUFFIXES] + [shards[0].path]
    return [source, source.with_name(f"{source.stem}.{FEATURES_KEY}.npy")]


def _load_features(source: Path, shards: list[Shard], key: str, d_in: int) -> torch.Tensor | None:
    """The `features` tensor [M, d_in] from the file itself, the first shard, or a sibling file; else None."""
    if key == FEATURES_KEY:
        return None
    for candidate in _features_candidates(source, shards):
        if not candidate.is_file():
            continue
        if candidate.suffix.lower() == ".safetensors":
            found = _map_safetensors(candidate, FEATURES_KEY, required=_is_features_file(candidate))
        elif _is_features_file(candidate):
            found = _map_npy(candidate)
        else:
            found = None
        if found is None:
            continue
        array, dtype = found
        if array.ndim != 2 or array.shape[1] != d_in:
            raise DatasetError(
                f"{candidate}: ground-truth features have shape {list(array.shape)}; expected [n_features, {d_in}]"
            )
        return torch.from_numpy(_to_float32(np.asarray(array), dtype))
    return None


# --------------------------------------------------------------------------------------------------------------------
# Checks before training
# --------------------------------------------------------------------------------------------------------------------


def _bad_rows(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Per-row mask of rows holding NaN/Inf (or, for float64, values that overflow float32). bool [rows]."""
    if dtype == "bfloat16":
        return ((raw & 0x7F80) == 0x7F80).any(axis=1)  # exponent bits all ones: Inf or NaN
    bad = ~np.isfinite(raw)
    if dtype == "float64":
        bad |= np.abs(raw) > _FLOAT32_MAX
    return bad.any(axis=1)


def _describe_value(raw_row: np.ndarray, dtype: str) -> tuple[int, str]:
    values = _to_float32(raw_row[None, :], dtype)[0] if dtype == "bfloat16" else raw_row.astype(np.float64)
    for col, value in enumerate(values):
        if np.isnan(value):
            return col, "NaN"
        if np.isinf(value):
            return col, "Inf" if value > 0 else "-Inf"
        if abs(value) > _FLOAT32_MAX:
            return col, f"{value:.3g}, too large for float32"
    return 0, "a non-finite value"


def find_nonfinite(ds: ActivationSet, chunk_bytes: int = _SCAN_CHUNK_BYTES) -> str | None:
    """Scan every value in chunks of bounded memory; a sentence naming the first bad row, or None if all finite."""
    for shard in ds.shards:
        itemsize = shard.array.dtype.itemsize
        chunk = max(1, chunk_bytes // max(1, ds.d_in * itemsize))
        for lo in range(0, shard.rows, chunk):
            raw = np.asarray(shard.array[lo : lo + chunk])
            mask = _bad_rows(raw, shard.dtype)
            if mask.any():
                local = lo + int(np.argmax(mask))
                col, what = _describe_value(np.asarray(shard.array[local]), shard.dtype)
                where = f" (row {local} of shard {shard.path.name})" if len(ds.shards) > 1 else ""
                return f"{ds.source}: row {shard.start + local}{where}, column {col} holds {what}"
    return None


def check_dataset(cfg: TrainConfig, world_size: int = 1, *, scan_values: bool = True) -> ActivationSet:
    """Open the config's activations and refuse bad data before any training starts.

    Raises ConfigError when the global batch does not split across `world_size` ranks, and DatasetError for every
    data problem (see `open_activations`), too few rows for one global batch plus the holdout, and NaN/Inf values.
    `scan_values=False` skips the full value scan (e.g. on ranks other than 0, which rely on rank 0's scan).
    """
    cfg.per_rank_batch(world_size)
    ds = open_activations(cfg.activation_source, cfg.activation_key)
    needed = cfg.batch_size + cfg.holdout_tokens
    if ds.n_rows < needed:
        raise DatasetError(
            f"{ds.source} has {ds.n_rows:,} rows, fewer than one global batch (batch_size {cfg.batch_size:,}) "
            f"plus the holdout (holdout_tokens {cfg.holdout_tokens:,}) = {needed:,}; "
            "use more data or lower batch_size/holdout_tokens"
        )
    if scan_values and (problem := find_nonfinite(ds)):
        raise DatasetError(f"{problem}; activations must be finite (no NaN or Inf)")
    return ds


# --------------------------------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------------------------------


def holdout_rows_for(n_rows: int, holdout: int, seed: int) -> np.ndarray:
    """The fixed, sorted holdout subset: depends only on (n_rows, holdout, seed), never on ranks or batch size."""
    rng = np.random.default_rng([seed, _HOLDOUT_STREAM])
    return np.sort(rng.choice(n_rows, size=holdout, replace=False)).astype(np.int64)


class RankBatches:
    """Which rows this rank trains on, step after step: deterministic, resumable, identical across world sizes.

    Each epoch is a seeded permutation of the non-holdout rows; global batch i of an epoch is its i-th block of
    `global_batch` rows (an incomplete tail is dropped) and rank r takes the r-th of `world_size` equal slices.
    """

    def __init__(self, n_rows: int, holdout: int, global_batch: int, rank: int, world_size: int, seed: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not split evenly across {world_size} ranks")
        if holdout < 0 or seed < 0:
            raise ValueError(f"holdout ({holdout}) and seed ({seed}) must be non-negative")
        if n_rows - holdout < global_batch:
            raise DatasetError(
                f"{n_rows:,} rows are fewer than one global batch (batch_size {global_batch:,}) "
                f"plus the holdout (holdout_tokens {holdout:,})"
            )
        self.n_rows, self.holdout, self.global_batch, self.seed = n_rows, holdout, global_batch, seed
        self.rank, self.world_size = rank, world_size
        per_rank = global_batch // world_size
        self._rank_slice = slice(rank * per_rank, (rank + 1) * per_rank)
        self._holdout = holdout_rows_for(n_rows, holdout, seed)
        in_training = np.ones(n_rows, dtype=bool)
        in_training[self._holdout] = False
        self._train = np.flatnonzero(in_training)  # int64 [n_rows - holdout]
        self.batches_per_epoch = len(self._train) // global_batch
        self.epoch, self.position = 0, 0  # next global batch = block `position` of epoch `epoch`
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def holdout_rows(self) -> np.ndarray:
        return self._holdout.copy()

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All training rows in the order of epoch `epoch` (cached for the current epoch)."""
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, _EPOCH_STREAM, epoch])
            self._order = self._train[rng.permutation(len(self._train))]
            self._order_epoch = epoch
        return self._order

    def _upcoming(self) -> tuple[int, int]:
        if self.position >= self.batches_per_epoch:
            return self.epoch + 1, 0
        return self.epoch, self.position

    def _global_block(self, epoch: int, position: int) -> np.ndarray:
        start = position * self.global_batch
        return self.epoch_order(epoch)[start : start + self.global_batch]

    def peek_global_rows(self) -> np.ndarray:
        """The whole next global batch (all ranks' rows), without advancing: same on every rank."""
        return self._global_block(*self._upcoming()).copy()

    def next_rows(self) -> np.ndarray:
        """This rank's rows of the next global batch; advances the position."""
        epoch, position = self._upcoming()
        rows = self._global_block(epoch, position)[self._rank_slice].copy()
        self.epoch, self.position = epoch, position + 1
        return rows

    def _fingerprint(self) -> dict:
        return {"n_rows": self.n_rows, "holdout": self.holdout, "global_batch": self.global_batch, "seed": self.seed}

    def state_dict(self) -> dict:
        """JSON-able position; the world size is not part of it (the global order does not depend on it)."""
        return {"epoch": self.epoch, "position": self.position, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        for name, value in self._fingerprint().items():
            if name in state and state[name] != value:
                raise ValueError(f"cannot resume the data order: {name} was {state[name]}, now {value}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"invalid data position: epoch {epoch}, position {position}")
        self.epoch, self.position = epoch, position


class Prefetcher:
    """Reads the next batch in a background thread while the loop trains on the current one.

    Same batches, same order as `dataset.read(batches.next_rows())`. The row order is advanced on the caller's
    thread, so `batches` is never touched concurrently; `state_dict()` describes what `next()` has returned so far,
    not the batch read ahead. Once wrapped, use this object's state_dict/load_state_dict rather than `batches`'.
    """

    def __init__(self, dataset: ActivationSet, batches: RankBatches, *, pin_memory: bool = False):
        self._dataset, self._batches = dataset, batches
        self._pin = pin_memory and torch.cuda.is_available()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sae-data")
        self._consumed = batches.state_dict()
        self._ahead = self._read_ahead()

    def _read_ahead(self) -> tuple[Future, dict]:
        rows = self._batches.next_rows()
        return self._pool.submit(self._load, rows), self._batches.state_dict()

    def _load(self, rows: np.ndarray) -> torch.Tensor:
        batch = self._dataset.read(rows)
        return batch.pin_memory() if self._pin else batch

    def next(self) -> torch.Tensor:
        future, state_after = self._ahead
        batch = future.result()
        self._consumed = state_after
        self._ahead = self._read_ahead()
        return batch

    __next__ = next

    def __iter__(self) -> Prefetcher:
        return self

    def state_dict(self) -> dict:
        return dict(self._consumed)

    def load_state_dict(self, state: dict) -> None:
        wait_for([self._ahead[0]])  # the stale read-ahead is discarded, errors included
        self._batches.load_state_dict(state)
        self._consumed = self._batches.state_dict()
        self._ahead = self._read_ahead()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------------------
# Toy data with ground truth
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyCodes:
    """Ground-truth sparse codes of one chunk: feature `feature[i]` fires on chunk row `row[i]` with `magnitude[i]`.

    Entries are unique per (row, feature) and sorted by row, then feature.
    """

    row: np.ndarray  # int64 [E]
    feature: np.ndarray  # int64 [E]
    magnitude: np.ndarray  # float32 [E], > 0


def _check_toy_args(tokens: int, d_in: int, features: int, seed: int) -> None:
    for name, value, low in (("tokens", tokens, 1), ("d_in", d_in, 1), ("features", features, 1), ("seed", seed, 0)):
        if not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")
    if features * d_in > 2**28:
        raise ValueError(
            f"features x d_in (--features x --d-in) = {features * d_in:,} is too large (at most {2**28:,}); lower one"
        )


class ToyGenerator:
    """Activations that are sparse non-negative combinations of known unit directions, plus small noise.

    In a chunk of n tokens feature i fires Binomial(n, p_i) times on uniformly random tokens (two firings on one
    token merge, so its firing frequency is about p_i); the p_i are log-uniform over `freq_decades` decades (a few
    common features, many rare ones), scaled so that about `mean_active` features fire per token. A firing has an Exponential(1) magnitude. Noise is Gaussian with expected norm
    `noise_norm`. Chunk `i` is generated from its own seed, so any chunk can be regenerated on its own.
    """

    def __init__(
        self,
        d_in: int,
        features: int,
        seed: int,
        *,
        mean_active: float = 3.0,
        freq_decades: float = 1.5,
        noise_norm: float = 0.05,
    ):
        _check_toy_args(1, d_in, features, seed)
        self.d_in, self.n_features, self.seed, self.noise_norm = d_in, features, seed, noise_norm
        rng = np.random.default_rng([seed, _TOY_STREAM])
        directions = rng.standard_normal((features, d_in))
        self.features = (directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)
        weights = 10.0 ** rng.uniform(0.0, freq_decades, size=features)
        self.firing_prob = np.minimum(weights * (mean_active / weights.sum()), 1.0)
        # Keep a chunk's activations and firing contributions near 16 MB each, whatever the width.
        self.chunk_rows = int(np.clip(2**22 // (d_in * max(1.0, mean_active)), 64, 65536))

    def codes(self, index: int, n_rows: int) -> ToyCodes:
        rng = np.random.default_rng([self.seed, _TOY_STREAM, 1, index])
        counts = rng.binomial(n_rows, self.firing_prob)  # firings of each feature in this chunk
        feature = np.repeat(np.arange(self.n_features, dtype=np.int64), counts)
        row = rng.integers(0, n_rows, size=feature.size, dtype=np.int64)
        magnitude = rng.exponential(1.0, size=feature.size)
        # Two firings of one feature on one token merge into one, magnitudes added.
        key, inverse = np.unique(row * self.n_features + feature, return_inverse=True)
        merged = np.bincount(inverse.ravel(), weights=magnitude, minlength=key.size).astype(np.float32)
        return ToyCodes(row=key // self.n_features, feature=key % self.n_features, magnitude=merged)

    def decode(self, codes: ToyCodes, n_rows: int) -> np.ndarray:
        """Noise-free activations of a chunk: sum of magnitude x feature direction per row. float32 [n_rows, d_in]."""
        sparse = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([codes.row, codes.feature])),
            torch.from_numpy(codes.magnitude),
            (n_rows, self.n_features),
            is_coalesced=True,  # entries are unique and sorted
            check_invariants=False,
        )
        return torch.sparse.mm(sparse, torch.from_numpy(self.features)).numpy()  # [n_rows, d_in]

    def chunk(self, index: int, n_rows: int) -> tuple[ToyCodes, np.ndarray]:
        codes = self.codes(index, n_rows)
        rng = np.random.default_rng([self.seed, _TOY_STREAM, 2, index])
        noise = rng.standard_normal((n_rows, self.d_in), dtype=np.float32) * np.float32(
            self.noise_norm / math.sqrt(self.d_in)
        )
        return codes, self.decode(codes, n_rows) + noise

    def iter_chunks(self, tokens: int) -> Iterator[tuple[int, ToyCodes, np.ndarray]]:
        """(first row, codes, float32 activations) for the chunks of a `tokens`-row set, in order."""
        for index, start in enumerate(range(0, tokens, self.chunk_rows)):
            codes, acts = self.chunk(index, min(self.chunk_rows, tokens - start))
            yield start, codes, acts


@dataclass(frozen=True)
class ToySummary:
    path: str
    tokens: int
    d_in: int
    features: int
    seed: int
    nbytes: int
    mean_active: float  # measured mean number of firing features per token
    rarest_frequency: float  # measured firing frequency of the rarest / commonest feature
    commonest_frequency: float

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"wrote {self.path} ({self.nbytes / 1e6:,.1f} MB): activations [{self.tokens}, {self.d_in}] float32, "
            f"features [{self.features}, {self.d_in}] float32; {self.mean_active:.2f} active features per token "
            f"on average; firing frequencies from {self.rarest_frequency:.2g} to {self.commonest_frequency:.2g}"
        )


def _safetensors_header(tensors: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """Header for float32 tensors laid out back to back in the order given, padded to 8 bytes as the format wants."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_toy(
    path: str | Path,
    tokens: int,
    d_in: int,
    features: int,
    seed: int,
    **generator_options: float,
) -> ToySummary:
    """Write a toy set (`activations` [tokens, d_in], `features` [features, d_in]) chunk by chunk.

    The file is streamed (header, features, then activation chunks), so sets far larger than RAM can be written;
    it appears under its name only when complete. `generator_options` go to `ToyGenerator`.
    """
    _check_toy_args(tokens, d_in, features, seed)
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"output file must end in .safetensors, got {path.name!r}")
    generator = ToyGenerator(d_in, features, seed, **generator_options)
    header = _safetensors_header(
        [(FEATURES_KEY, (features, d_in)), ("activations", (tokens, d_in))],
        {"format": "pt", "generator": "sae_core toy", "seed": str(seed)},
    )
    total = len(header) + 4 * d_in * (features + tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if total > free:
        raise ValueError(f"the toy set needs {total / 1e9:.2f} GB but {path.parent} has {free / 1e9:.2f} GB free")

    fired = np.zeros(features, dtype=np.int64)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(header)
            f.write(np.ascontiguousarray(generator.features, dtype="<f4").tobytes())
            for _, codes, acts in generator.iter_chunks(tokens):
                fired += np.bincount(codes.feature, minlength=features)
                f.write(np.ascontiguousarray(acts, dtype="<f4").data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    frequency = fired / tokens
    return ToySummary(
        path=str(path),
        tokens=tokens,
        d_in=d_in,
        features=features,
        seed=seed,
        nbytes=total,
        mean_active=float(fired.sum() / tokens),
        rarest_frequency=float(frequency.min()),
        commonest_frequency=float(frequency.max()),
    )


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def cli_toy(argv: list[str]) -> int:
    """`python -m sae_core toy OUT.safetensors --tokens N --d-in D --features M --seed S [--json]`."""
    parser = argparse.ArgumentParser(
        prog="python -m sae_core toy",
        description="Write a toy activation set whose ground-truth features are known (tensors `activations`, "
        "`features`): each token is a sparse non-negative mix of unit feature directions plus small noise.",
    )
    parser.add_argument("out", metavar="OUT.safetensors", help="file to write")
    parser.add_argument("--tokens", type=_int_at_least(1), default=65536, help="rows (default 65536)")
    parser.add_argument("--d-in", type=_int_at_least(1), default=64, help="activation width (default 64)")
    parser.add_argument("--features", type=_int_at_least(1), default=256, help="ground-truth features (default 256)")
    parser.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and bad flags (2); return the code instead
        return exc.code if isinstance(exc.code, int) else 2
    try:
        summary = write_toy(args.out, args.tokens, args.d_in, args.features, args.seed)
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{parser.prog}: error: could not write {args.out}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary.to_dict()) if args.json else summary.describe())
    return 0
