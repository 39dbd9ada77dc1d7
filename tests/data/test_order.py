"""The block-shuffled data order: 1 ≡ N ranks, holdout, epochs, windows, resume, memory at a billion rows."""

from __future__ import annotations

import json
import time
import tracemalloc

import numpy as np
import pytest

from sae_core.data.formats import DatasetError
from sae_core.data.order import BatchKey, BlockOrder, blocks_for

# 1000 rows, blocks of 10 rows, windows of 3 blocks: 33 windows, far smaller than the set.
SMALL = {"n_rows": 1000, "holdout": 100, "global_batch": 64, "seed": 3, "block_rows": 10, "window_blocks": 3}


def order(**overrides) -> BlockOrder:
    return BlockOrder(**{**SMALL, **overrides})


def epoch_keys(o: BlockOrder, epochs: int = 1, start: BatchKey | None = None) -> list[BatchKey]:
    key, keys = start or BatchKey(0, 0), []
    for _ in range(epochs * o.batches_per_epoch):
        keys.append(key)
        key = o.following(key)
    return keys


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_concatenate_to_the_one_rank_batch(world_size):
    o = order()
    for key in epoch_keys(o, epochs=2) + [BatchKey(2, 0)]:  # crosses two epoch boundaries
        whole = o.rank_rows(key, 0, 1)
        parts = [o.rank_rows(key, r, world_size) for r in range(world_size)]
        assert np.array_equal(np.concatenate(parts), whole)
        assert np.array_equal(np.sort(o.global_rows(key)), whole)
        assert all(len(p) == 64 // world_size for p in parts)
        assert len(np.unique(whole)) == 64  # no row twice in a batch, hence disjoint rank slices


def test_holdout_is_fixed_disjoint_from_training_and_independent_of_batch_and_blocks():
    o = order()
    holdout = o.holdout_rows()
    assert len(np.unique(holdout)) == 100
    for other in (order(global_batch=128), order(block_rows=7, window_blocks=1), order(window_blocks=500)):
        assert np.array_equal(other.holdout_rows(), holdout)
    assert not np.array_equal(order(seed=4).holdout_rows(), holdout)
    trained = np.concatenate([o.global_rows(k) for k in epoch_keys(o, epochs=2)])
    assert not np.isin(trained, holdout).any()


def test_each_epoch_visits_each_training_row_once_in_a_fresh_order_and_drops_the_tail():
    o = order()
    assert o.batches_per_epoch == 900 // 64
    epochs = [np.concatenate([o.global_rows(BatchKey(e, p)) for p in range(o.batches_per_epoch)]) for e in range(3)]
    for rows in epochs:
        assert len(rows) == 14 * 64 and len(np.unique(rows)) == len(rows)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert np.array_equal(order().global_rows(BatchKey(0, 0)), epochs[0][:64])  # a pure function of the inputs


def test_rows_come_window_by_window_from_whole_blocks_and_are_mixed_within_a_window():
    o = order(holdout=0, global_batch=30)  # a window is 3 blocks = 30 rows = one batch
    for key in epoch_keys(o):
        blocks = np.unique(o.global_rows(key) // 10)
        assert len(blocks) == 3  # one window: three whole blocks, every row of them
        assert np.array_equal(np.sort(o.global_rows(key)), (blocks[:, None] * 10 + np.arange(10)).ravel())
        stream = o.global_rows(key)
        assert not np.array_equal(stream, np.sort(stream))  # shuffled within the window
    first = [tuple(np.unique(o.global_rows(k) // 10)) for k in epoch_keys(o)]
    assert first != sorted(first)  # blocks visited in a random order
    visited = {int(b) for group in first for b in group}
    assert len(visited) == 99 and visited < set(range(100))  # 33 windows; the last block is the dropped tail


def test_a_set_no_larger_than_the_buffer_is_shuffled_as_a_whole():
    o = order(window_blocks=100)
    blocks_of_first_batch = np.unique(o.global_rows(BatchKey(0, 0)) // 10)
    assert len(blocks_of_first_batch) > 30  # 64 rows drawn from across the whole set, not a few blocks


def test_blocks_for_sizes_blocks_and_windows_in_bytes():
    assert blocks_for(row_bytes=4608, block_bytes=2**20, buffer_bytes=256 * 2**20) == (227, 256)
    assert blocks_for(row_bytes=2**22, block_bytes=2**20, buffer_bytes=2**20) == (1, 1)  # at least one row
    assert blocks_for(row_bytes=64, block_bytes=2**20, buffer_bytes=2**20) == (16384, 1)


def test_state_dict_resumes_exactly_mid_epoch_and_is_world_size_free():
    original = order()
    key = epoch_keys(original, epochs=2)[20]
    original.advance_to(key)
    state = json.loads(json.dumps(original.state_dict()))
    assert (state["epoch"], state["position"]) == (1, 6)
    resumed = order()
    resumed.load_state_dict(state)
    assert resumed.key == key
    for k in epoch_keys(original, start=key)[:20]:
        assert np.array_equal(resumed.rank_rows(k, 1, 2), original.rank_rows(k, 1, 2))
    # A position at the end of an epoch resumes at the start of the next.
    resumed.load_state_dict({**state, "epoch": 0, "position": original.batches_per_epoch})
    assert resumed.key == BatchKey(1, 0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 4}, "seed was 3, now 4"),
        ({"block_rows": 20}, "block_rows was 10, now 20"),
        ({"window_blocks": 6}, "window_blocks was 3, now 6"),
        ({"global_batch": 32}, "global_batch was 64, now 32"),
    ],
)
def test_load_state_dict_refuses_another_data_order(change, message):
    state = order().state_dict()
    with pytest.raises(DatasetError, match=message):
        order(**change).load_state_dict(state)


def test_a_tail_holdout_is_the_last_rows_and_never_trained_on():
    o = order(contiguous_holdout=True)
    assert np.array_equal(o.holdout_rows(), np.arange(900, 1000)) and o.holdout_kind == "tail"
    trained = np.concatenate([o.global_rows(key) for key in epoch_keys(o, epochs=2)])
    assert trained.max() < 900 and len(np.unique(trained)) == 900  # two epochs see every training row
    # a checkpoint of a random-holdout order (or one from before tail holdouts) does not resume it
    with pytest.raises(DatasetError, match="holdout_kind was random, now tail"):
        o.load_state_dict(order().state_dict())
    earlier = {k: v for k, v in order().state_dict().items() if k != "holdout_kind"}
    order().load_state_dict(earlier)  # an older checkpoint held a random holdout: it resumes as before


def test_a_checkpoint_of_the_earlier_order_is_refused_with_a_reason():
    earlier = {"epoch": 0, "position": 3, "n_rows": 1000, "holdout": 100, "global_batch": 64, "seed": 3}
    with pytest.raises(DatasetError, match="earlier version of SAE Lab whose data order differs"):
        order().load_state_dict(earlier)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="does not split evenly across 3 ranks"):
        order().rank_rows(BatchKey(0, 0), 0, 3)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        order().rank_rows(BatchKey(0, 0), 2, 2)
    with pytest.raises(DatasetError, match="100 rows are fewer than one global batch"):
        order(n_rows=100, holdout=40)
    with pytest.raises(DatasetError, match="invalid position"):
        order().load_state_dict({**order().state_dict(), "position": 99})


def test_a_billion_rows_cost_blocks_not_rows():
    """gemma-2-2b's residual stream in float16: 1 B rows of 4.6 kB in 1 MiB blocks (4.4 M of them)."""
    block_rows, window_blocks = blocks_for(4608, 2**20, 256 * 2**20)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        o = BlockOrder(10**9, 100_000, 4096, 0, block_rows, window_blocks)
        first = o.rank_rows(BatchKey(0, 0), 1, 8)
        o.rank_rows(o.following(BatchKey(0, 0)), 1, 8)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(first) == 512 and not np.isin(first, o.holdout_rows()).any()
    assert peak < 100 * 2**20, f"{peak / 2**20:.0f} MiB for the order"  # a row permutation would be 8 GB
    print(f"order of 1e9 rows: first batches after {seconds:.2f} s, peak {peak / 2**20:.0f} MiB")


def test_an_order_without_shuffle_reads_the_rows_as_stored_every_epoch():
    order = BlockOrder(100, 10, 15, seed=3, block_rows=7, window_blocks=2, contiguous_holdout=True, shuffle=False)
    first = [order.global_rows(BatchKey(0, b)) for b in range(order.batches_per_epoch)]
    assert np.concatenate(first).tolist() == list(range(90))
    assert order.global_rows(BatchKey(1, 2)).tolist() == list(range(30, 45))
    assert order.state_dict()["shuffle"] is False
