"""The extraction: contexts → the model up to the hook → one row per kept token → shards, then the manifest.

The plan is a pure function of the contexts and the config: the contexts are shuffled with `seed` and cut
into shards of whole contexts (about `shard_rows` rows each); shard s is computed by rank s mod world, in
batches of `batch_size` contexts, so 1 rank and N ranks write the same shards. A shard appears under its
name only when complete (temporary file, rename), so a killed run resumes by redoing the missing ones. A
background thread writes each shard while the model computes the next. Rank 0 writes `manifest.json` last.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import save_file

from ..config import ExtractConfig
from ..data.manifest import Manifest, ShardEntry
from ..files import (
    ACTIVATIONS_KEY,
    CONTEXT_IDS_KEY,
    CONTEXTS_FILE,
    POSITIONS_KEY,
    TOKEN_IDS_KEY,
    shard_file_name,
)
from .hooks import HookReader

_PLAN_STREAM = 5  # the seed's stream for the context shuffle (order.py uses 1, 2, 4; the toy set 3)
_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ExtractPlan:
    context_rows: np.ndarray  # int64 [n_contexts]: rows each context gives (the last one cut to n_tokens)
    shards: list[np.ndarray]  # context ids of each shard, in the order their rows are written

    @property
    def n_contexts(self) -> int:
        return len(self.context_rows)

    def shard_rows(self, index: int) -> int:
        return int(self.context_rows[self.shards[index]].sum())


def contexts_needed(kept: np.ndarray, n_tokens: int) -> int:
    """How many leading contexts give n_tokens rows; 0 when they are not enough."""
    total = np.cumsum(kept.sum(axis=1))
    return int(np.searchsorted(total, n_tokens) + 1) if total.size and total[-1] >= n_tokens else 0


def make_plan(kept: np.ndarray, cfg: ExtractConfig) -> ExtractPlan:
    """The shards for contexts whose kept positions are `kept` (bool [n_contexts, context_size])."""
    n = contexts_needed(kept, cfg.n_tokens)
    rows = kept[:n].sum(axis=1).astype(np.int64)
    rows[-1] -= int(rows.sum()) - cfg.n_tokens  # the last context gives only what completes n_tokens
    order = np.random.default_rng([cfg.seed, _PLAN_STREAM]).permutation(n)
    per_shard = max(1, cfg.shard_rows // cfg.context_size)
    return ExtractPlan(rows, [order[i : i + per_shard] for i in range(0, n, per_shard)])


def row_mask(kept: np.ndarray, context_rows: np.ndarray) -> np.ndarray:
    """Kept positions limited to each context's row count (only the last context of the plan is cut)."""
    return kept & (np.cumsum(kept, axis=1) <= context_rows[:, None])


class ShardWriter:
    """Writes shards on a background thread (so writing overlaps the next forward pass); at most two wait."""

    def __init__(self, out_dir: Path):
        self._out_dir = out_dir
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sae-shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            index, tensors = item
            try:
                if self._error is None:
                    write_shard(self._out_dir, index, tensors)
            except BaseException as exc:  # noqa: BLE001  (re-raised on the caller's thread)
                self._error = exc

    def put(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self._raise()
        self._queue.put((index, tensors))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def write_shard(out_dir: Path, index: int, tensors: dict[str, torch.Tensor]) -> None:
    path = out_dir / shard_file_name(index)
    partial = path.with_name(f".{path.name}.partial")
    save_file({name: t.cpu().contiguous() for name, t in tensors.items()}, str(partial))  # on this thread
    os.replace(partial, path)


def shard_done(out_dir: Path, index: int) -> bool:
    return (out_dir / shard_file_name(index)).is_file()


class Extractor:
    """Computes shards: the model up to the hook on batches of contexts, the kept rows of each."""

    def __init__(self, reader: HookReader, tokens: np.ndarray, mask: np.ndarray, cfg: ExtractConfig, device):
        self.reader, self.tokens, self.mask, self.cfg, self.device = reader, tokens, mask, cfg, device

    def shard(self, contexts: np.ndarray) -> dict[str, torch.Tensor]:
        pieces: dict[str, list[torch.Tensor]] = {"act": [], "tok": [], "ctx": [], "pos": []}
        for start in range(0, len(contexts), self.cfg.batch_size):
            batch = contexts[start : start + self.cfg.batch_size]
            ids = torch.from_numpy(self.tokens[batch].astype(np.int64)).to(self.device)
            mask = torch.from_numpy(self.mask[batch])
            hidden = self.reader(ids)  # [B, T, d_in]
            pieces["act"].append(hidden[mask.to(hidden.device)].to(_STORAGE[self.cfg.storage_dtype]).cpu())
            where = mask.nonzero()  # (b, t) of each kept row, row-major: the order of the rows above
            pieces["tok"].append(torch.from_numpy(self.tokens[batch])[mask])
            pieces["ctx"].append(torch.from_numpy(batch)[where[:, 0]])
            pieces["pos"].append(where[:, 1].to(torch.int32))
        return {
            ACTIVATIONS_KEY: torch.cat(pieces["act"]).contiguous(),
            TOKEN_IDS_KEY: torch.cat(pieces["tok"]).to(torch.int32),
            CONTEXT_IDS_KEY: torch.cat(pieces["ctx"]).to(torch.int64),
            POSITIONS_KEY: torch.cat(pieces["pos"]),
        }


def run_shards(
    extractor: Extractor,
    plan: ExtractPlan,
    out_dir: Path,
    rank: int,
    world_size: int,
    progress: Callable[[int, float], None] | None = None,
) -> int:
    """Compute and write this rank's missing shards; returns the rows this rank wrote. `progress(rows, s)`
    is told the rows done so far (kept shards included) and the seconds spent."""
    writer = ShardWriter(out_dir)
    done = 0
    started = time.perf_counter()
    try:
        for index in range(rank, len(plan.shards), world_size):
            if not shard_done(out_dir, index):
                writer.put(index, extractor.shard(plan.shards[index]))
            done += plan.shard_rows(index)
            if progress is not None:
                progress(done, time.perf_counter() - started)
    finally:
        writer.close()
    return done


def manifest_for(plan: ExtractPlan, cfg: ExtractConfig, d_in: int, provenance: dict) -> Manifest:
    shards = tuple(ShardEntry(shard_file_name(i), plan.shard_rows(i)) for i in range(len(plan.shards)))
    return Manifest(d_in, cfg.storage_dtype, shards, {**provenance, "n_contexts": plan.n_contexts})


def read_contexts(out_dir: Path) -> np.ndarray:
    return load_numpy(str(out_dir / CONTEXTS_FILE))["tokens"]


def write_contexts(out_dir: Path, tokens: np.ndarray) -> None:
    from safetensors.numpy import save_file as save_numpy

    path = out_dir / CONTEXTS_FILE
    partial = path.with_name(f".{path.name}.partial")
    save_numpy({"tokens": np.ascontiguousarray(tokens, dtype=np.int32)}, str(partial))
    os.replace(partial, path)


def config_fingerprint(cfg: ExtractConfig) -> str:
    return json.dumps(json.loads(cfg.to_json()), sort_keys=True)
