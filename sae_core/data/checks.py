"""Checks before training: a set's rows against one global batch plus the holdout, and every value finite.

The value scan reads in chunks of bounded memory; the submission gate skips it for huge sets (rank 0 still
scans when the job starts). No torch.
"""

from __future__ import annotations

import numpy as np

from ..config import TrainConfig
from .activations import ActivationSet, open_activations
from .formats import DatasetError, to_float32

_SCAN_CHUNK_BYTES = 32 * 2**20  # bounded memory for the NaN/Inf scan
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _bad_rows(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Per-row mask of rows holding NaN/Inf (or, for float64, values that overflow float32). bool [rows]."""
    if dtype == "bfloat16":
        return ((raw & 0x7F80) == 0x7F80).any(axis=1)  # exponent bits all ones: Inf or NaN
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
