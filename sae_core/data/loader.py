"""Reading ahead: the blocks of the coming batches are read by a pool of threads while the loop trains.

For each batch the Loader asks the order (order.py) for this rank's rows, reads the blocks they fall in
whole (one large pread each, on `threads` reader threads: the OS sees big sequential requests, several at
a time), gathers the rows, checks every value, and hands the batch over as a tensor: float32 for a CPU
run (converted in the threads), or the stored dtype in pinned memory for CUDA, converted on the device
(half the bytes cross PCIe for float16/bfloat16). A block serves every batch of its window and is
dropped after the window's last batch.

Memory: the blocks of about `cache_bytes` read ahead (plus the window being trained on) and `depth`
assembled batches. Only the caller's thread touches the order; the threads only read and assemble.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass

import numpy as np
import torch

from ..config import READY_BATCHES
from .activations import ActivationSet
from .checks import check_batch
from .formats import to_float32
from .order import BatchKey, BlockOrder

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_PLANNED_BATCHES = 256  # reads are planned at most this many batches ahead, whatever the cache allows
_ASSEMBLY_THREADS = 2


@dataclass
class _CachedBlock:
    future: Future  # np.ndarray [rows of the block, d_in] in the set's storage dtype
    until: int  # the last position of its epoch that needs it
    nbytes: int


@dataclass
class _PlannedBatch:
    key: BatchKey
    rows: np.ndarray  # this rank's rows, ascending
    blocks: list[tuple[int, Future]]  # the blocks they fall in, ascending


class Loader:
    """This rank's batches in the order's sequence, read ahead; `state_dict()` is what `next()` has handed out."""

    def __init__(
        self,
        data: ActivationSet,
        order: BlockOrder,
        rank: int,
        world_size: int,
        *,
        threads: int = 4,
        cache_bytes: int = 512 * 2**20,
        depth: int = READY_BATCHES,
        host_float32: bool = True,
        pin_memory: bool = False,
    ):
        """`host_float32`: batches as float32 (a CPU run); else in the stored dtype, in pinned memory with
        `pin_memory` (a CUDA run converts them on the device)."""
        self._data, self._order, self._rank, self._world = data, order, rank, world_size
        self._cache_bytes, self._depth = cache_bytes, depth
        self._float32 = host_float32
        self._pin = pin_memory and torch.cuda.is_available()
        self._reads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sae-read")
        self._assembly = ThreadPoolExecutor(max_workers=_ASSEMBLY_THREADS, thread_name_prefix="sae-batch")
        self.wait_seconds = 0.0  # time next() spent blocked on data, since the start
        self._start()

    def _start(self) -> None:
        self._blocks: dict[tuple[int, int], _CachedBlock] = {}
        self._cached = 0
        self._planned: deque[_PlannedBatch] = deque()  # reads submitted, not yet assembling
        self._ready: deque[tuple[BatchKey, Future]] = deque()  # assembling or assembled, in order
        self._next_plan = self._order.key
        self._top_up()

    # -- planning (caller's thread)
    def _top_up(self) -> None:
        while len(self._ready) < self._depth:  # what is about to be trained on is read whatever the budget
            batch = self._planned.popleft() if self._planned else self._plan_next(within_budget=False)
            assert batch is not None
            self._ready.append((batch.key, self._assembly.submit(self._assemble, batch.rows, batch.blocks)))
        while len(self._planned) < _MAX_PLANNED_BATCHES and (batch := self._plan_next(within_budget=True)):
            self._planned.append(batch)

    def _plan_next(self, within_budget: bool) -> _PlannedBatch | None:
        """Submit the reads of the next unplanned batch's blocks (those not already read or being read);
        None, and nothing submitted, when they would take the blocks read ahead beyond `cache_bytes`."""
        key = self._next_plan
        rows = self._order.rank_rows(key, self._rank, self._world)
        block_ids = rows // self._order.block_rows
        needed = block_ids[np.r_[True, block_ids[1:] != block_ids[:-1]]].tolist()
        missing = [b for b in needed if (key.epoch, b) not in self._blocks]
        if within_budget and self._cached + sum(self._block_bytes(b) for b in missing) > self._cache_bytes:
            return None
        self._next_plan = self._order.following(key)
        until = self._order.last_position_of_windows(key)
        for block in missing:
            lo, hi = self._block_range(block)
            future = self._reads.submit(self._data.read_range, lo, hi)
            self._blocks[(key.epoch, block)] = _CachedBlock(future, until, self._block_bytes(block))
            self._cached += self._block_bytes(block)
        blocks = []
        for block in needed:
            cached = self._blocks[(key.epoch, block)]
            cached.until = max(cached.until, until)
            blocks.append((block, cached.future))
        return _PlannedBatch(key, rows, blocks)

    def _block_bytes(self, block: int) -> int:
        lo, hi = self._block_range(block)
        return (hi - lo) * self._data.row_bytes

    def _block_range(self, block: int) -> tuple[int, int]:
        lo = block * self._order.block_rows
        return lo, min(lo + self._order.block_rows, self._data.n_rows)

    def _evict_before(self, key: BatchKey) -> None:
        """Drop blocks no batch from `key` on needs (this epoch's windows passed, or an earlier epoch)."""
        done = [
            b for b, c in self._blocks.items() if b[0] < key.epoch or (b[0] == key.epoch and c.until < key.position)
        ]
        for name in done:
            self._cached -= self._blocks.pop(name).nbytes

    # -- assembling (assembly threads)
    def _assemble(self, rows: np.ndarray, blocks: list[tuple[int, Future]]) -> torch.Tensor:
        """Gather the rows out of their blocks straight into the batch's buffer, then check the values."""
        batch, view, dtype = self._batch_buffer(len(rows))
        block_of = rows // self._order.block_rows
        cuts = np.searchsorted(block_of, [b for b, _ in blocks] + [block_of[-1] + 1])
        for (block, future), lo, hi in zip(blocks, cuts[:-1], cuts[1:], strict=True):
            view[lo:hi] = future.result()[rows[lo:hi] - block * self._order.block_rows]  # float16 → float32 here
        check_batch(self._data, rows, view, dtype)
        if batch is None:  # bfloat16 for a CPU run: widened after the check
            return torch.from_numpy(to_float32(view, dtype))
        return batch

    def _batch_buffer(self, n: int) -> tuple[torch.Tensor | None, np.ndarray, str]:
        """(the batch tensor, a numpy view of its memory to fill, that view's dtype). float16 is widened
        while it is gathered; bfloat16 (no numpy dtype) is gathered raw and widened after."""
        storage, shape = self._data.storage, (n, self._data.d_in)
        if self._float32 and storage != "bfloat16":
            view = np.empty(shape, dtype=np.float32)
            return torch.from_numpy(view), view, "float32"
        if self._float32:
            return None, np.empty(shape, dtype=np.uint16), storage
        batch = torch.empty(shape, dtype=_TORCH_DTYPES[storage], pin_memory=self._pin)
        # numpy has no bfloat16: its bits are filled through a uint16 view of the same memory
        view = batch.view(torch.int16).numpy().view(np.uint16) if storage == "bfloat16" else batch.numpy()
        return batch, view, storage

    # -- consuming (caller's thread)
    def next(self) -> torch.Tensor:
        """The next batch: float32 on the CPU, or the stored dtype in pinned memory when reading for CUDA."""
        if not self._ready:
            self._top_up()
        key, future = self._ready.popleft()
        waited = time.perf_counter()
        batch = future.result()
        self.wait_seconds += time.perf_counter() - waited
        following = self._order.following(key)
        self._order.advance_to(following)
        self._evict_before(following)
        self._top_up()
        return batch

    __next__ = next

    def __iter__(self) -> Loader:
        return self

    def state_dict(self) -> dict:
        return self._order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._drop_ahead()
        self._order.load_state_dict(state)
        self._start()

    def _drop_ahead(self) -> None:
        futures = [f for _, f in self._ready] + [c.future for c in self._blocks.values()]
        for future in futures:
            future.cancel()
        wait_for(futures)  # stale reads are discarded, errors included

    def close(self) -> None:
        self._assembly.shutdown(wait=True, cancel_futures=True)
        self._reads.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DeviceFeed:
    """Batches as float32 on the training device. On CUDA the next batch is copied from pinned memory on a
    side stream (non-blocking) while the current one trains, and converted there; on the CPU it passes through.
    `state_dict()` is what the loop has been handed (the batch in flight is not counted)."""

    def __init__(self, loader: Loader, device: torch.device):
        self.loader, self.device = loader, device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead: tuple[torch.Tensor, dict] | None = None
        self._state = loader.state_dict()

    def _copy_next(self) -> tuple[torch.Tensor, dict]:
        host = self.loader.next()
        state = self.loader.state_dict()
        with torch.cuda.stream(self._stream):
            return host.to(self.device, non_blocking=True).float(), state

    def next(self) -> torch.Tensor:
        if self._stream is None:
            batch = self.loader.next()
            self._state = self.loader.state_dict()
            return batch
        batch, state = self._ahead if self._ahead is not None else self._copy_next()
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self._stream)
        batch.record_stream(current)  # its memory is not reused before the training stream is done with it
        self._ahead, self._state = self._copy_next(), state
        return batch

    def state_dict(self) -> dict:
        return dict(self._state)

    @property
    def wait_seconds(self) -> float:
        return self.loader.wait_seconds

    def close(self) -> None:
        self.loader.close()
