"""Reading ahead: the next batch is read in a background thread while the loop trains on the current one."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for

import numpy as np
import torch

from .activations import ActivationSet
from .order import RankBatches


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
        batch = torch.from_numpy(self._dataset.read(rows))
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
