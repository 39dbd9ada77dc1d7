"""An activation set: one [n_rows, d_in] matrix over memory-mapped shard files, read by rows (no torch).

Sources are a `.safetensors` file, a `.npy` file, or a directory of shards of either kind. Nothing here
reads a whole set into RAM: every shard is memory-mapped and `ActivationSet.read` copies only the rows
asked for, as float32 numpy (the torch side turns them into tensors).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import ACTIVATION_SUFFIXES, FEATURES_KEY
from ..text import brief
from .formats import (
    DatasetError,
    is_features_file,
    is_regular_file,
    list_shards,
    map_file,
    map_npy,
    map_safetensors,
    read_safetensors_header,
    to_float32,
)


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

    def __init__(self, source: Path, shards: list[Shard], features: np.ndarray | None = None):
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

    def read(self, rows: np.ndarray) -> np.ndarray:
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
                out[order[lo:hi]] = to_float32(shard.array[ascending[lo:hi] - shard.start], shard.dtype)
        return out


def open_activations(source: str | Path, key: str = "activations") -> ActivationSet:
    """Memory-map an activation source: a .safetensors file (tensor `key`), a .npy file, or a directory of shards.

    Raises DatasetError for anything that cannot be read as a 2-D float matrix: a missing path, an unsupported
    suffix, an empty directory, a missing tensor key, a shape that is not 2-D, a non-float dtype, shards of
    differing width. Values are not scanned here (see `check_dataset`).
    """
    path = Path(source).expanduser()
    shown = brief(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DatasetError(
            f"activation source not found: {shown} (expected a .safetensors file, a .npy file or a directory of them)"
        ) from None
    except (OSError, ValueError) as exc:  # a name too long, a permission refused, a loop of links, a NUL byte
        raise DatasetError(f"{shown}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_ISDIR(mode):
        paths = list_shards(path)
    elif not stat.S_ISREG(mode):
        raise DatasetError(f"{shown}: not a regular file or a directory of them")
    elif path.suffix.lower() in ACTIVATION_SUFFIXES:
        paths = [path]
    else:
        raise DatasetError(
            f"{shown}: unsupported file type {brief(path.suffix or '(no suffix)', 20)!r}; "
            f"allowed: {', '.join(ACTIVATION_SUFFIXES)}, or a directory of such shards"
        )
    shards: list[Shard] = []
    start = 0
    for p in paths:
        array, dtype = map_file(p, key)
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
        return [source / f"{FEATURES_KEY}{s}" for s in ACTIVATION_SUFFIXES] + [shards[0].path]
    return [source, source.with_name(f"{source.stem}.{FEATURES_KEY}.npy")]


def _load_features(source: Path, shards: list[Shard], key: str, d_in: int) -> np.ndarray | None:
    """The `features` tensor [M, d_in] from the file itself, the first shard, or a sibling file; else None."""
    if key == FEATURES_KEY:
        return None
    for candidate in _features_candidates(source, shards):
        if not is_regular_file(candidate) or not _may_hold_features(candidate):
            continue
        safetensors = candidate.suffix.lower() == ".safetensors"
        array, dtype = map_safetensors(candidate, FEATURES_KEY) if safetensors else map_npy(candidate)
        if array.ndim != 2 or array.shape[1] != d_in:
            raise DatasetError(
                f"{candidate}: ground-truth features have shape {list(array.shape)}; expected [n_features, {d_in}]"
            )
        return to_float32(np.asarray(array), dtype)
    return None


def _may_hold_features(candidate: Path) -> bool:
    """A features file holds them (or is an error); an activation file may carry a `features` tensor."""
    if is_features_file(candidate):
        return True
    return candidate.suffix.lower() == ".safetensors" and FEATURES_KEY in read_safetensors_header(candidate)
