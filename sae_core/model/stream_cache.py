"""Keeping a model's stream (`cache_to`): the writing rank copies every window training reads into an activation
folder per stream key, in the extraction's format (data/stream_cache.py says where and what the folder holds).

Window w's rows are written as shard w, in the order training read them (the window's permutation), by a
background thread per key (extraction's ShardWriter: at most two shards wait, so writing overlaps the next
windows' forward passes and steps). The held-out contexts follow as the last shard, whole and in the order the
end-of-run evaluation read them, and `manifest.json` is written last, once training has read every window. A
resumed run keeps the shards already written and recomputes, at the end, the windows it did not see again.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ..data.manifest import Manifest, ShardEntry, write_manifest
from ..data.stream_cache import cache_folder
from ..data.stream_plan import window_of
from ..files import ACTIVATIONS_KEY, CONTEXT_IDS_KEY, CONTEXTS_FILE, POSITIONS_KEY, TOKEN_IDS_KEY, shard_file_name
from .extraction import ShardWriter, shard_done, write_contexts, write_shard


def index_tensors(tokens: np.ndarray, kept: np.ndarray, contexts: np.ndarray, order=None) -> dict[str, torch.Tensor]:
    """`token_ids`, `context_ids`, `positions` of the kept rows of `contexts` (in context order, then `order`)."""
    mask = kept[contexts]
    which, positions = np.nonzero(mask)  # row-major: the order of the rows the stream computes
    index = {
        TOKEN_IDS_KEY: tokens[contexts][mask].astype(np.int32),
        CONTEXT_IDS_KEY: contexts[which].astype(np.int64),
        POSITIONS_KEY: positions.astype(np.int32),
    }
    if order is not None:
        index = {name: values[order] for name, values in index.items()}
    return {name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in index.items()}


class StreamCache:
    """The stream of every key written to `cache_to` (see the module docstring); every rank holds one, only the
    writing rank writes."""

    def __init__(self, cfg, source, provenance: dict, writes: bool):
        self.source, self.provenance, self.writes = source, provenance, writes
        starts = source.plan.window_starts()
        self.n_windows = window_of(starts, cfg.batch_size * cfg.total_steps - 1) + 1  # the windows training reads
        self.dirs = {key: cache_folder(str(cfg.cache_to), key) for key in source.widths}
        self._writers: dict[str, ShardWriter] = {}
        if writes:
            for key, folder in self.dirs.items():
                folder.mkdir(parents=True, exist_ok=True)
                if not (folder / CONTEXTS_FILE).is_file():
                    write_contexts(folder, source.tokens)
                self._writers[key] = ShardWriter(folder)

    def _done(self, index: int) -> bool:
        return all(shard_done(folder, index) for folder in self.dirs.values())

    def put_window(self, index: int, rows: dict[str, torch.Tensor]) -> None:
        """Window `index`'s rows (shuffled, as training reads them) go to the writer threads."""
        if not self.writes or index >= self.n_windows or self._done(index):
            return
        plan = self.source.plan
        index_rows = index_tensors(self.source.tokens, self.source.kept, plan.windows[index], plan.permutation(index))
        for key, writer in self._writers.items():
            writer.put(index, {ACTIVATIONS_KEY: rows[key], **index_rows})

    def write_holdout(self, held: dict[str, torch.Tensor]) -> None:
        """The held-out contexts' rows (in plan order), as the last shard."""
        if not self.writes or self._done(self.n_windows):
            return
        index_rows = index_tensors(self.source.tokens, self.source.kept, self.source.plan.holdout)
        for key, folder in self.dirs.items():
            write_shard(folder, self.n_windows, {ACTIVATIONS_KEY: held[key], **index_rows})

    def finish(self, feed) -> None:
        """Every rank: the windows a resumed run did not compute again are computed now (the ranks share the
        work, as in training); then the writing rank writes each folder's manifest."""
        self.close()
        missing = [i for i in range(self.n_windows) if not self._done(i)] if self.writes else []
        if feed.ranks > 1 and dist.is_initialized():
            shared = [missing]
            dist.broadcast_object_list(shared, src=0)
            missing = shared[0]
        for index in missing:
            rows = feed.window(index)
            if self.writes:
                plan = self.source.plan
                index_rows = index_tensors(
                    self.source.tokens, self.source.kept, plan.windows[index], plan.permutation(index)
                )
                for key, folder in self.dirs.items():
                    write_shard(folder, index, {ACTIVATIONS_KEY: rows[key], **index_rows})
        if self.writes:
            for key, folder in self.dirs.items():
                write_manifest(folder, self.manifest(key))

    def manifest(self, key: str) -> Manifest:
        plan = self.source.plan
        shards = [ShardEntry(shard_file_name(i), plan.window_rows(i)) for i in range(self.n_windows)]
        shards.append(ShardEntry(shard_file_name(self.n_windows), plan.holdout_rows))
        side, _, hook = key.partition(":")
        provenance = {**self.provenance, "hook": hook, "held_out_rows": plan.holdout_rows}
        if side != "out":
            provenance["hook_side"] = side
        return Manifest(self.source.widths[key], "float32", tuple(shards), provenance)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
