"""Checks of the data: a set's rows against one global batch plus the holdout, and every value finite.

What is scanned for NaN/Inf and when: before training, every value of a set up to FULL_SCAN_MAX_BYTES (2 GiB),
or SAMPLE_SCAN_BYTES spread over a larger one (a multi-TB set is never read up front); during training, every
batch as it is read (`check_batch`), so a bad row anywhere stops the run with its shard and index. Scans read
in chunks of bounded memory. No torch.
"""

from __future__ import annotations

import numpy as np

from ..config import TrainConfig
from ..model_source import activation_files
from .activations import ActivationSet, open_activations
from .formats import DatasetError, to_float32

_SCAN_CHUNK_BYTES = 32 * 2**20  # bounded memory for the NaN/Inf scan
FULL_SCAN_MAX_BYTES = 2 * 2**30  # up to this size every value is scanned before training; beyond it a sample
SAMPLE_SCAN_BYTES = 256 * 2**20  # what is scanned up front of a larger set (the rest as training reads it)
SAMPLE_PIECE_BYTES = 2**20
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Exponent bits of each stored dtype: all ones is Inf or NaN (checked on the raw bits, ~6x faster than isfinite).
_EXPONENT_MASK = {"float16": (np.uint16, 0x7C00), "bfloat16": (np.uint16, 0x7F80), "float32": (np.uint32, 0x7F800000)}


def nonfinite_rows(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Per-row mask of rows holding NaN/Inf (or, for float64, values that overflow float32). bool [rows]."""
    if dtype in _EXPONENT_MASK:
        bits, mask = _EXPONENT_MASK[dtype]
        return ((raw.view(bits) & mask) == mask).any(axis=1)
    bad = ~np.isfinite(raw)
    if dtype == "float64":
        bad |= np.abs(raw) > _FLOAT32_MAX
    return bad.any(axis=1)


def _describe_value(raw_row: np.ndarray, dtype: str) -> tuple[int, str]:
    values = to_float32(raw_row[None, :], dtype)[0] if dtype == "bfloat16" else raw_row.astype(np.float64)
    for col, value in enumerate(values):
        if np.isnan(value):
            return col, "NaN"
        if np.isinf(value):
            return col, "Inf" if value > 0 else "-Inf"
        if abs(value) > _FLOAT32_MAX:
            return col, f"{value:.3g}, too large for float32"
    return 0, "a non-finite value"


def bad_value_message(ds: ActivationSet, row: int, raw_row: np.ndarray, dtype: str) -> str:
    col, what = _describe_value(raw_row, dtype)
    return f"{ds.source}: {ds.where(row)}, column {col} holds {what}; activations must be finite (no NaN or Inf)"


def check_batch(ds: ActivationSet, rows: np.ndarray, raw: np.ndarray, dtype: str | None = None) -> None:
    """Raise DatasetError naming the first non-finite row of a batch read for training (`raw` in `dtype`,
    default ds.storage)."""
    dtype = dtype or ds.storage
    mask = nonfinite_rows(raw, dtype)
    if mask.any():
        i = int(np.argmax(mask))
        raise DatasetError(bad_value_message(ds, int(rows[i]), raw[i], dtype))


def find_nonfinite(
    ds: ActivationSet, ranges: list[tuple[int, int]] | None = None, chunk_bytes: int = _SCAN_CHUNK_BYTES
) -> str | None:
    """Scan rows [lo, hi) of each range (default: every row) in their stored dtype, in chunks of bounded memory;
    a sentence naming the first bad row, or None if all are finite."""
    for lo, hi in ranges if ranges is not None else [(0, ds.n_rows)]:
        for shard in ds.shards:
            first, last = max(lo, shard.start), min(hi, shard.stop)
            chunk = max(1, chunk_bytes // max(1, shard.nbytes // max(1, shard.rows)))
            for start in range(first, last, chunk):
                raw = shard.read_range(start - shard.start, min(start + chunk, last) - shard.start)
                mask = nonfinite_rows(raw, shard.dtype)
                if mask.any():
                    i = int(np.argmax(mask))
                    return bad_value_message(ds, start + i, raw[i], shard.dtype)
    return None


def sample_ranges(ds: ActivationSet, budget_bytes: int | None = None) -> list[tuple[int, int]]:
    """Evenly spread runs of rows (~1 MiB each, about `budget_bytes` (SAMPLE_SCAN_BYTES) in all; the first
    and last rows included), ascending: what is scanned up front of a set too large to scan whole."""
    budget_bytes = SAMPLE_SCAN_BYTES if budget_bytes is None else budget_bytes
    piece = max(1, SAMPLE_PIECE_BYTES // ds.row_bytes)
    count = max(2, budget_bytes // (piece * ds.row_bytes))
    starts = np.unique(np.linspace(0, max(ds.n_rows - piece, 0), count).astype(np.int64))
    return [(int(s), min(int(s) + piece, ds.n_rows)) for s in starts]


def check_dataset(cfg: TrainConfig, world_size: int = 1, *, scan_values: bool = True) -> ActivationSet:
    """Open the config's activations and refuse bad data before any training starts.

    Raises ConfigError when the global batch does not split across `world_size` ranks, and DatasetError for every
    data problem (see `open_activations`), too few rows for one global batch plus the holdout, and NaN/Inf values.
    Values: a set of at most FULL_SCAN_MAX_BYTES is scanned whole; of a larger one, SAMPLE_SCAN_BYTES spread over
    it (training checks every batch it reads, see `check_batch`). `scan_values=False` skips the scan.
    """
    cfg.per_rank_batch(world_size)
    ds = open_activations(activation_files(cfg), cfg.activation_key)
    needed = cfg.batch_size + cfg.holdout_tokens
    if ds.n_rows < needed:
        raise DatasetError(
            f"{ds.source} has {ds.n_rows:,} rows, fewer than one global batch (batch_size {cfg.batch_size:,}) "
            f"plus the holdout (holdout_tokens {cfg.holdout_tokens:,}) = {needed:,}; "
            "use more data or lower batch_size/holdout_tokens"
        )
    if scan_values:
        ranges = None if ds.nbytes <= FULL_SCAN_MAX_BYTES else sample_ranges(ds)
        if problem := find_nonfinite(ds, ranges):
            raise DatasetError(problem)
    return ds
