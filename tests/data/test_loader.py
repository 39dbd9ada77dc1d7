"""The loader: the order's batches read ahead by blocks, exact, resumable, per-rank reads, values checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_core.data.activations import open_activations
from sae_core.data.formats import DatasetError, to_float32
from sae_core.data.loader import DeviceFeed, Loader
from sae_core.data.order import BatchKey, BlockOrder

N_ROWS, D_IN = 1200, 8


def write_shards(directory, dtype=np.float32, shards=3, seed=0) -> np.ndarray:
    """A set of `shards` .npy files; returns the whole matrix as float32."""
    rows = np.random.default_rng(seed).standard_normal((N_ROWS, D_IN)).astype(dtype)
    for i, part in enumerate(np.array_split(rows, shards)):
        np.save(directory / f"s{i}.npy", part)
    return rows.astype(np.float32)


def small_order(**overrides) -> BlockOrder:
    args = {"n_rows": N_ROWS, "holdout": 100, "global_batch": 64, "seed": 5, "block_rows": 25, "window_blocks": 4}
    return BlockOrder(**{**args, **overrides})


def expected_batches(order: BlockOrder, rank: int, world: int, n: int, whole: np.ndarray) -> list[np.ndarray]:
    key, out = order.key, []
    for _ in range(n):
        out.append(whole[order.rank_rows(key, rank, world)])
        key = order.following(key)
    return out


@pytest.mark.parametrize(("rank", "world"), [(0, 1), (1, 2), (3, 4)])
def test_loader_gives_this_ranks_rows_of_each_batch_across_epochs(tmp_path, rank, world):
    whole = write_shards(tmp_path)
    ds = open_activations(tmp_path)
    order = small_order()
    expected = expected_batches(small_order(), rank, world, 3 * order.batches_per_epoch, whole)  # three epochs
    with Loader(ds, order, rank, world, threads=3, cache_bytes=4096) as loader:
        got = [loader.next() for _ in expected]
    assert all(
        g.dtype == torch.float32 and torch.equal(g, torch.from_numpy(e)) for g, e in zip(got, expected, strict=True)
    )


def test_state_dict_is_what_was_handed_out_and_resumes_exactly(tmp_path):
    whole = write_shards(tmp_path)
    ds = open_activations(tmp_path)
    expected = expected_batches(small_order(), 1, 2, 40, whole)
    with Loader(ds, small_order(), 1, 2) as loader:
        for _ in range(20):
            loader.next()
        state = loader.state_dict()
        assert (state["epoch"], state["position"]) == (1, 3)  # 17 batches per epoch; read-ahead not counted
    with Loader(ds, small_order(), 1, 2) as resumed:
        resumed.next()
        resumed.load_state_dict(state)
        assert all(torch.equal(resumed.next(), torch.from_numpy(e)) for e in expected[20:])


def test_each_rank_reads_whole_blocks_of_its_own_rows_about_once_per_epoch(tmp_path):
    write_shards(tmp_path)
    ds = open_activations(tmp_path)
    read: dict[int, list[tuple[int, int]]] = {0: [], 1: []}
    for rank in (0, 1):
        order = small_order(holdout=0)
        needed = {
            int(b) for p in range(order.batches_per_epoch) for b in order.rank_rows(BatchKey(0, p), rank, 2) // 25
        }
        original = ds.read_range

        def spy(lo, hi, rank=rank, original=original):
            read[rank].append((lo, hi))
            return original(lo, hi)

        ds.read_range = spy  # type: ignore[method-assign]
        with Loader(ds, order, rank, 2, cache_bytes=0) as loader:
            for _ in range(order.batches_per_epoch - 4):  # what is read ahead stays within the epoch
                loader.next()
        ds.read_range = original  # type: ignore[method-assign]
        blocks = [lo // 25 for lo, hi in read[rank]]
        assert all(hi - lo == 25 and lo % 25 == 0 for lo, hi in read[rank])  # whole blocks, one read each
        assert len(blocks) == len(set(blocks))  # no block read twice in the epoch
        assert set(blocks) <= needed  # only blocks holding this rank's rows
    shared = {lo for lo, _ in read[0]} & {lo for lo, _ in read[1]}
    assert len(read[0]) + len(read[1]) < 1.5 * N_ROWS / 25  # together about one pass over the data
    assert len(shared) < len(read[0]) / 2  # each rank reads mostly its own part of every window


def test_blocks_read_ahead_stay_within_the_budget(tmp_path):
    write_shards(tmp_path)
    ds = open_activations(tmp_path)
    # 30 blocks: the 4 batches being assembled span at most 5 windows of 4 blocks; the rest is read-ahead.
    budget = 30 * 25 * D_IN * 4
    read_ahead = []
    with Loader(ds, small_order(), 0, 1, cache_bytes=budget) as loader:
        for _ in range(40):
            loader.next()
            assert loader._cached <= budget
            read_ahead.append(len(loader._planned))
    assert max(read_ahead) > 0  # it does read ahead beyond the batches being assembled


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_half_precision_is_converted_exactly_on_the_host(tmp_path, dtype):
    whole = write_shards(tmp_path, dtype=dtype)
    ds = open_activations(tmp_path)
    assert ds.storage == np.dtype(dtype).name
    with Loader(ds, small_order(), 0, 1) as loader:
        assert torch.equal(loader.next(), torch.from_numpy(expected_batches(small_order(), 0, 1, 1, whole)[0]))


def test_bfloat16_and_mixed_shards_read_as_float32(tmp_path):
    from safetensors.torch import save_file

    rows = torch.randn(N_ROWS, D_IN)
    save_file({"activations": rows[:600].to(torch.bfloat16)}, str(tmp_path / "a.safetensors"))
    save_file({"activations": rows[600:].to(torch.float16)}, str(tmp_path / "b.safetensors"))
    ds = open_activations(tmp_path)
    assert ds.storage == "float32"  # mixed stored dtypes are made alike
    whole = torch.cat([rows[:600].to(torch.bfloat16).float(), rows[600:].to(torch.float16).float()]).numpy()
    with Loader(ds, small_order(), 0, 2) as loader:
        for expected in expected_batches(small_order(), 0, 2, 5, whole):
            assert torch.equal(loader.next(), torch.from_numpy(expected))
    save_file({"activations": rows.to(torch.bfloat16)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "b.safetensors").unlink()
    ds = open_activations(tmp_path)
    raw = ds.read_range(10, 20)
    assert ds.storage == "bfloat16" and raw.dtype == np.uint16
    assert np.array_equal(to_float32(raw, "bfloat16"), rows[10:20].to(torch.bfloat16).float().numpy())


def test_a_non_finite_value_stops_the_batch_that_reads_it_naming_shard_and_row(tmp_path):
    whole = write_shards(tmp_path)
    bad = np.load(tmp_path / "s1.npy")
    bad[7, 2] = np.nan  # global row 407
    np.save(tmp_path / "s1.npy", bad)
    ds = open_activations(tmp_path)
    order = small_order()
    first_with_it = next(p for p in range(order.batches_per_epoch) if 407 in order.global_rows(BatchKey(0, p)))
    with Loader(ds, order, 0, 1) as loader:
        for _ in range(first_with_it):
            loader.next()  # batches before it are fine, though the bad row was read ahead
        with pytest.raises(DatasetError, match=r"row 407 \(row 7 of shard s1.npy\), column 2 holds NaN"):
            loader.next()
    assert np.isfinite(whole).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, "bfloat16"])
def test_batches_in_the_stored_dtype_are_what_a_cuda_run_copies(tmp_path, dtype):
    from safetensors.torch import save_file

    rows = torch.randn(N_ROWS, D_IN)
    stored = rows.to(torch.bfloat16) if dtype == "bfloat16" else rows.to(torch.from_numpy(np.zeros(1, dtype)).dtype)
    save_file({"activations": stored}, str(tmp_path / "a.safetensors"))
    ds = open_activations(tmp_path)
    with Loader(ds, small_order(), 1, 2, host_float32=False) as loader:
        for expected in expected_batches(small_order(), 1, 2, 4, stored.float().numpy()):
            batch = loader.next()
            assert batch.dtype == stored.dtype and torch.equal(batch.float(), torch.from_numpy(expected))


def test_cpu_feed_passes_float32_batches_through_with_their_state(tmp_path):
    whole = write_shards(tmp_path)
    ds = open_activations(tmp_path)
    feed = DeviceFeed(Loader(ds, small_order(), 0, 1), torch.device("cpu"))
    try:
        expected = expected_batches(small_order(), 0, 1, 3, whole)
        assert all(torch.equal(feed.next(), torch.from_numpy(e)) for e in expected)
        assert feed.state_dict()["position"] == 3 and feed.wait_seconds >= 0
    finally:
        feed.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_cuda_feed_copies_stored_dtype_and_converts_on_the_device(tmp_path, dtype):
    whole = write_shards(tmp_path, dtype=dtype)
    ds = open_activations(tmp_path)
    device = torch.device("cuda", 0)
    feed = DeviceFeed(Loader(ds, small_order(), 0, 1, host_float32=False, pin_memory=True), device)
    try:
        for expected in expected_batches(small_order(), 0, 1, 6, whole):
            batch = feed.next()
            assert batch.device == device and batch.dtype == torch.float32
            assert torch.equal(batch.cpu(), torch.from_numpy(expected))
        assert feed.state_dict()["position"] == 6  # the batch copied ahead is not counted
    finally:
        feed.close()
