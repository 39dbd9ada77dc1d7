"""The data order: which rows each rank trains on, step after step (deterministic, resumable, 1 ≡ N ranks).

The order is a pure function of (n_rows, holdout, global_batch, seed, epoch, position): every rank
computes the same global batch and takes its own contiguous slice, so the ranks' slices laid end to end
are exactly the batch a 1-rank run sees. That is what lets a 2-rank DDP run end with the weights of a
1-rank run. No torch.
"""

from __future__ import annotations

import numpy as np

from .formats import DatasetError

# Independent random streams derived from the one user seed (the toy generator uses stream 3).
_HOLDOUT_STREAM, _EPOCH_STREAM = 1, 2


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
        order = self._order
        if order is None or self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, _EPOCH_STREAM, epoch])
            order = self._train[rng.permutation(len(self._train))]
            self._order, self._order_epoch = order, epoch
        return order

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
