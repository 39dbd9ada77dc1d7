"""The data order: which rows each rank trains on, step after step (deterministic, resumable, 1 ≡ N ranks).

Rows are grouped into contiguous *blocks* of `block_rows` rows (one large read each; ~1 MiB by default).
Each epoch visits the blocks in a seeded permutation (in order when `shuffle` is off: a set written already
shuffled, such as a model's stream kept with cache_to, is read as stored); every `window_blocks` consecutive blocks of that
permutation form a *window* (the shuffle buffer), whose training rows are shuffled together. The windows
laid end to end are the epoch's stream of rows, and global batch i is rows [i·B, (i+1)·B) of the stream
(an incomplete tail is dropped). The order costs O(blocks) memory plus one window, never O(rows): 1 B rows
of 4.6 kB (gemma-2-2b, float16) are 4.4 M blocks of 1 MiB, about 20 MB.

The order is a pure function of (n_rows, holdout, B, seed, block_rows, window_blocks, epoch, position),
never of the number of ranks. Rank r takes the r-th of `world_size` equal slices of the global batch
sorted by row, so the slices together are the batch a 1-rank run sees (DDP averages the gradients of a
set, the order within it does not matter), and each rank reads its own part of every window.
No torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import DatasetError

ORDER_VERSION = 2  # bumped whenever the order for the same inputs changes (a checkpoint names its version)
# Independent random streams derived from the one user seed (the toy generator uses stream 3).
_HOLDOUT_STREAM, _EPOCH_STREAM, _WINDOW_STREAM = 1, 2, 4


def holdout_rows_for(n_rows: int, holdout: int, seed: int) -> np.ndarray:
    """The fixed, sorted holdout subset: depends only on (n_rows, holdout, seed), never on ranks or batch size.
    (numpy draws a small sample without replacement without materialising all rows.)"""
    rng = np.random.default_rng([seed, _HOLDOUT_STREAM])
    return np.sort(rng.choice(n_rows, size=holdout, replace=False)).astype(np.int64)


def tail_holdout(n_rows: int, holdout: int) -> np.ndarray:
    """The last `holdout` rows: the holdout of a set extracted from a model. Extraction writes each context's
    rows together and the contexts in a seeded random order, so the tail is whole contexts (but the first)
    drawn at random, and those contexts can be run through the model again to evaluate the SAE there."""
    return np.arange(n_rows - holdout, n_rows, dtype=np.int64)


def blocks_for(row_bytes: int, block_bytes: int, buffer_bytes: int) -> tuple[int, int]:
    """(block_rows, window_blocks): blocks of at least one row and about `block_bytes`, windows of about
    `buffer_bytes` (at least one block)."""
    block_rows = max(1, block_bytes // max(1, row_bytes))
    return block_rows, max(1, buffer_bytes // (block_rows * max(1, row_bytes)))


@dataclass(frozen=True)
class BatchKey:
    """Global batch `position` of epoch `epoch`."""

    epoch: int
    position: int


class _EpochPlan:
    """One epoch's block permutation and where each window's rows fall in the stream."""

    def __init__(self, order: BlockOrder, epoch: int):
        self.epoch = epoch
        self.blocks = np.arange(order.n_blocks, dtype=np.int32 if order.n_blocks < 2**31 else np.int64)
        if order.shuffle:
            np.random.default_rng([order.seed, _EPOCH_STREAM, epoch]).shuffle(self.blocks)
        counts = order.train_rows_per_block[self.blocks]
        starts = np.arange(0, order.n_blocks, order.window_blocks)
        per_window = np.int32 if order.window_blocks * order.block_rows < 2**31 else np.int64  # no 8-byte copy
        self.window_ends = np.cumsum(np.add.reduceat(counts, starts, dtype=per_window), dtype=np.int64)
        self._windows: dict[int, np.ndarray] = {}


class BlockOrder:
    """Which rows form each global batch and which of them each rank trains on (see the module docstring).

    `epoch, position` name the next batch to train; `state_dict` is that position plus everything the
    order depends on, so a resume continues the very same order.
    """

    def __init__(
        self,
        n_rows: int,
        holdout: int,
        global_batch: int,
        seed: int,
        block_rows: int,
        window_blocks: int = 1,
        *,
        contiguous_holdout: bool = False,
        shuffle: bool = True,
    ):
        if global_batch < 1 or block_rows < 1 or window_blocks < 1:
            raise ValueError(f"batch ({global_batch}), block ({block_rows}), window ({window_blocks}) must be ≥ 1")
        if holdout < 0 or seed < 0:
            raise ValueError(f"holdout ({holdout}) and seed ({seed}) must be non-negative")
        if n_rows - holdout < global_batch:
            raise DatasetError(
                f"{n_rows:,} rows are fewer than one global batch (batch_size {global_batch:,}) "
                f"plus the holdout (holdout_tokens {holdout:,})"
            )
        self.n_rows, self.holdout, self.global_batch, self.seed = n_rows, holdout, global_batch, seed
        self.block_rows, self.window_blocks = block_rows, window_blocks
        self.n_blocks = -(-n_rows // block_rows)
        self.contiguous_holdout = contiguous_holdout
        self.shuffle = shuffle  # False: the stored order, every epoch (a set written already shuffled)
        self._holdout = tail_holdout(n_rows, holdout) if contiguous_holdout else holdout_rows_for(n_rows, holdout, seed)
        per_block = np.full(self.n_blocks, block_rows, dtype=np.int32)
        per_block[-1] = n_rows - (self.n_blocks - 1) * block_rows
        np.subtract.at(per_block, self._holdout // block_rows, 1)
        self.train_rows_per_block = per_block
        self.batches_per_epoch = (n_rows - holdout) // global_batch
        self.epoch, self.position = 0, 0
        self._plan: _EpochPlan | None = None

    # -- where the order stands
    @property
    def key(self) -> BatchKey:
        return BatchKey(self.epoch, self.position)

    def following(self, key: BatchKey) -> BatchKey:
        if key.position + 1 < self.batches_per_epoch:
            return BatchKey(key.epoch, key.position + 1)
        return BatchKey(key.epoch + 1, 0)

    @property
    def holdout_kind(self) -> str:
        return "tail" if self.contiguous_holdout else "random"

    def holdout_rows(self) -> np.ndarray:
        return self._holdout.copy()

    # -- the rows of a batch
    def global_rows(self, key: BatchKey) -> np.ndarray:
        """Every rank's rows of batch `key`, in stream order (int64 [global_batch])."""
        plan = self._epoch_plan(key.epoch)
        start = key.position * self.global_batch
        stop = start + self.global_batch
        first, last = self._windows_of(plan, start, stop)
        pieces = []
        for w in range(first, last + 1):
            window_start = int(plan.window_ends[w - 1]) if w else 0
            rows = self._window_rows(plan, w)
            pieces.append(rows[max(start - window_start, 0) : stop - window_start])
        return np.concatenate(pieces)

    def rank_rows(self, key: BatchKey, rank: int, world_size: int) -> np.ndarray:
        """Rank `rank`'s rows of batch `key`, ascending (int64 [global_batch / world_size])."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        if self.global_batch % world_size:
            raise ValueError(f"global batch {self.global_batch} does not split evenly across {world_size} ranks")
        per_rank = self.global_batch // world_size
        return np.sort(self.global_rows(key))[rank * per_rank : (rank + 1) * per_rank]

    def last_position_of_windows(self, key: BatchKey) -> int:
        """The last position of the epoch that reads any window batch `key` reads: after it, the blocks
        batch `key` needs are not needed again this epoch (what a reader may evict)."""
        plan = self._epoch_plan(key.epoch)
        start = key.position * self.global_batch
        _, last = self._windows_of(plan, start, start + self.global_batch)
        return min(int(plan.window_ends[last] - 1) // self.global_batch, self.batches_per_epoch - 1)

    def _windows_of(self, plan: _EpochPlan, start: int, stop: int) -> tuple[int, int]:
        first = int(np.searchsorted(plan.window_ends, start, side="right"))
        last = int(np.searchsorted(plan.window_ends, stop - 1, side="right"))
        return first, last

    def _epoch_plan(self, epoch: int) -> _EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = _EpochPlan(self, epoch)
        return self._plan

    def _window_rows(self, plan: _EpochPlan, w: int) -> np.ndarray:
        """Window w's training rows, shuffled (the two most recent windows are kept)."""
        rows = plan._windows.get(w)
        if rows is None:
            rows = self._shuffled_window(plan, w)
            if len(plan._windows) >= 2:
                plan._windows.pop(min(plan._windows))
            plan._windows[w] = rows
        return rows

    def _shuffled_window(self, plan: _EpochPlan, w: int) -> np.ndarray:
        blocks = plan.blocks[w * self.window_blocks : (w + 1) * self.window_blocks].astype(np.int64)
        starts = blocks * self.block_rows
        sizes = np.minimum(starts + self.block_rows, self.n_rows) - starts
        # Every row of the blocks, in block order: a running index plus each block's offset.
        offsets = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes)
        rows = np.arange(int(sizes.sum()), dtype=np.int64) + offsets
        if self.holdout:
            at = np.searchsorted(self._holdout, rows).clip(max=self.holdout - 1)
            rows = rows[self._holdout[at] != rows]
        if not self.shuffle:
            return rows
        return rows[np.random.default_rng([self.seed, _WINDOW_STREAM, plan.epoch, w]).permutation(len(rows))]

    # -- resume
    def _fingerprint(self) -> dict:
        return {
            "order_version": ORDER_VERSION,
            "n_rows": self.n_rows,
            "holdout": self.holdout,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "block_rows": self.block_rows,
            "window_blocks": self.window_blocks,
            "holdout_kind": self.holdout_kind,
            "shuffle": self.shuffle,
        }

    def state_dict(self) -> dict:
        """JSON-able position; the world size is not part of it (the global order does not depend on it)."""
        return {"epoch": self.epoch, "position": self.position, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("order_version") != ORDER_VERSION:
            raise DatasetError(
                "cannot resume the data order: the checkpoint was written by an earlier version of SAE Lab whose "
                "data order differs; start a new run from its config"
            )
        # checkpoints from before tail holdouts held random ones; from before `shuffle`, shuffled ones
        state = {"holdout_kind": "random", "shuffle": True, **state}
        for name, value in self._fingerprint().items():
            if state.get(name) != value:
                raise DatasetError(f"cannot resume the data order: {name} was {state.get(name)}, now {value}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise DatasetError(f"cannot resume the data order: invalid position (epoch {epoch}, batch {position})")
        key = BatchKey(epoch, position)
        if position == self.batches_per_epoch:  # the end of an epoch is the start of the next
            key = self.following(BatchKey(epoch, position - 1))
        self.epoch, self.position = key.epoch, key.position

    def advance_to(self, key: BatchKey) -> None:
        self.epoch, self.position = key.epoch, key.position
