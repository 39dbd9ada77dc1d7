"""The data path against the disk: sequential read rate vs the loader's rows/s, cold and warm, 1 and 2 ranks.

Creates once (under --dir) a float16 activation folder at d_in 2304 (gemma-2-2b's width) of --gb GB, as
extraction writes it (shards + manifest.json). Then, in one run:
- the sequential cold read rate of all shards (8 MiB reads), the reference every figure is divided by;
- the loader's rows/s cold and warm with 1 rank, in the stored dtype (what a CUDA run copies to the device)
  and as float32 (a CPU run: converted in the reader threads);
- 2 ranks as 2 processes reading their own rows of the same batches at once, cold;
- where a GPU exists, rows/s into CUDA memory from the warm set and data_wait of a TopK step at d_sae 16384,
  k 64 on it;
- a tiny SAE trained on the cold set (`python -m sae_core.train`, CPU), its tokens/s and data_wait.
"Cold" drops the set's pages with posix_fadvise(DONTNEED) after a sync (and says so if it could not).

    .venv/bin/python -m bench.data_throughput [--dir /var/tmp/sae-bench] [--gb 10.5] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from sae_core.config import TrainConfig
from sae_core.data.activations import open_activations
from sae_core.data.manifest import Manifest, ShardEntry, write_manifest
from sae_core.data.order import BlockOrder, blocks_for
from sae_core.files import shard_file_name

D_IN = 2304
SHARD_ROWS = 100_000  # 461 MB of float16 per shard
ROW_BYTES = D_IN * 2
BATCH = 4096
DEFAULTS = TrainConfig.model_fields


def build_set(directory: Path, gb: float, d_in: int = D_IN) -> Path:
    """The float16 set, written once (random rows; a different seed per shard)."""
    n_rows = int(gb * 1e9 / (d_in * 2))
    if (directory / "manifest.json").exists() and open_activations(directory).n_rows == n_rows:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, start in enumerate(range(0, n_rows, SHARD_ROWS)):
        rows = min(SHARD_ROWS, n_rows - start)
        part = np.random.default_rng(i).standard_normal((rows, d_in), dtype=np.float32).astype(np.float16)
        save_file({"activations": part}, str(directory / shard_file_name(i)))
        entries.append(ShardEntry(shard_file_name(i), rows))
        print(f"  wrote shard {i} ({rows:,} rows)", flush=True)
    write_manifest(directory, Manifest(d_in, "float16", tuple(entries), {"dataset": "bench random"}))
    return directory


def drop_cache(directory: Path) -> None:
    """Evict the set's pages from the page cache (clean pages: after a sync)."""
    os.sync()
    for path in sorted(directory.glob("shard_*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cache_drop_works(directory: Path) -> bool:
    """Whether a read after drop_cache comes from the disk: much slower than one from the page cache."""
    sequential_rate(directory, limit=256 * 2**20)
    warm = sequential_rate(directory, limit=256 * 2**20)
    drop_cache(directory)
    cold = sequential_rate(directory, limit=256 * 2**20)
    drop_cache(directory)
    return cold < warm / 2


def sequential_rate(directory: Path, limit: int | None = None) -> float:
    """Bytes/s reading every shard front to back in 8 MiB reads (what dd does)."""
    buffer = bytearray(8 * 2**20)
    view, total = memoryview(buffer), 0
    started = time.perf_counter()
    for path in sorted(directory.glob("shard_*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            while (n := os.readv(fd, [view])) > 0:
                total += n
                if limit is not None and total >= limit:
                    return total / (time.perf_counter() - started)
        finally:
            os.close(fd)
    return total / (time.perf_counter() - started)


def loader_span(directory: Path, rank: int, world: int, batches: int, host_float32: bool) -> tuple[int, float, float]:
    """(rows, start, end): what this rank's loader hands out over `batches` global batches, from its creation
    (default block and buffer sizes; wall-clock times, comparable across processes)."""
    import torch

    from sae_core.data.loader import Loader

    torch.set_num_threads(1)
    ds = open_activations(directory)
    block_rows, window_blocks = blocks_for(
        ds.row_bytes, DEFAULTS["shuffle_block_bytes"].default, DEFAULTS["shuffle_buffer_bytes"].default
    )
    order = BlockOrder(ds.n_rows, 4096, BATCH, 0, block_rows, window_blocks)
    buffer = DEFAULTS["shuffle_buffer_bytes"].default
    started = time.time()
    with Loader(ds, order, rank, world, cache_bytes=2 * buffer // world, host_float32=host_float32) as loader:
        rows = sum(len(loader.next()) for _ in range(batches))
        return rows, started, time.time()


def loader_rate(directory: Path, rank: int, world: int, batches: int, host_float32: bool) -> float:
    rows, started, ended = loader_span(directory, rank, world, batches, host_float32)
    return rows / (ended - started)


def ranks_rate(directory: Path, world: int, batches: int) -> float:
    """Rows/s of `world` processes reading their ranks' rows of the same batches at once (stored dtype)."""
    argv = [sys.executable, "-m", "bench.data_throughput", "--dir", str(directory.parent), "--batches", str(batches)]
    argv += ["--gb", directory.name.split("_")[-1].removesuffix("gb")]
    procs = [
        subprocess.Popen([*argv, "--worker", f"{r}/{world}"], stdout=subprocess.PIPE, text=True) for r in range(world)
    ]
    spans = [json.loads(proc.communicate()[0].splitlines()[-1]) for proc in procs]
    rows = sum(s["rows"] for s in spans)
    return rows / (max(s["end"] for s in spans) - min(s["start"] for s in spans))


def train_rate(directory: Path, steps: int) -> dict:
    """A tiny TopK SAE trained on the set on the CPU: its tokens/s and mean data_wait."""
    out = Path(tempfile.mkdtemp(prefix="sae-bench-train-"))
    cfg = {
        "activation_source": str(directory),
        "architecture": "topk",
        "d_sae": 32,
        "k": 4,
        "batch_size": BATCH,
        "total_steps": steps,
        "log_every": 20,
        "checkpoint_every": steps,
        "holdout_tokens": 4096,
        "device": "cpu",
        "b_dec_init": "mean",
    }
    (out / "cfg.json").write_text(json.dumps(cfg))
    subprocess.run(
        [sys.executable, "-m", "sae_core.train", "--config", str(out / "cfg.json"), "--out", str(out / "run")],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    figures = json.loads((out / "run" / "eval.json").read_text())
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait"] for r in records if "data_wait" in r]
    return {"tokens_per_s": figures["tokens_per_s"], "data_wait": float(np.mean(waits))}


def device_feed_rate(directory: Path, batches: int, device, batch: int = BATCH) -> float:
    """Rows/s into `device` memory from the set as the trainer feeds it (DeviceFeed: on CUDA the stored dtype
    in pinned memory, copied on a side stream), after one batch of start-up; the set read once first (warm)."""
    import torch

    from sae_core.data.loader import DeviceFeed, Loader

    ds = open_activations(directory)
    order = BlockOrder(ds.n_rows, 4096, batch, 0, *blocks_for(ds.row_bytes, 2**20, 256 * 2**20))
    sequential_rate(directory)  # warm
    cuda = device.type == "cuda"
    feed = DeviceFeed(Loader(ds, order, 0, 1, host_float32=not cuda, pin_memory=cuda), device)
    try:
        feed.next()
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(batches):
            feed.next()
        if cuda:
            torch.cuda.synchronize(device)
        return batches * batch / (time.perf_counter() - started)
    finally:
        feed.close()


def training_data_wait(directory: Path, steps: int, device: str, d_sae: int = 16384, k: int = 64) -> dict:
    """tokens/s and mean data_wait (the first record, which holds the start-up, left out) of a TopK run on the
    set through `python -m sae_core.train`."""
    out = Path(tempfile.mkdtemp(prefix="sae-bench-wait-"))
    cfg = {"activation_source": str(directory), "architecture": "topk", "d_sae": d_sae, "k": k,
           "batch_size": BATCH, "total_steps": steps, "log_every": max(1, steps // 10), "checkpoint_every": steps,
           "holdout_tokens": 4096, "device": device}  # fmt: skip
    (out / "cfg.json").write_text(json.dumps(cfg))
    argv = [sys.executable, "-m", "sae_core.train", "--config", str(out / "cfg.json"), "--out", str(out / "run")]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    waits = [r["data_wait"] for r in records if "data_wait" in r][1:]
    tokens_per_s = json.loads((out / "run" / "eval.json").read_text())["tokens_per_s"]
    return {"tokens_per_s": tokens_per_s, "data_wait": float(np.mean(waits)) if waits else float("nan")}


def cuda_figures(directory: Path, args) -> None:
    """Where a GPU exists: rows/s into CUDA memory from the warm set, and data_wait of a gemma-scale TopK step
    (d_sae 16384, k 64) that consumes them."""
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: the rows/s into GPU memory and the GPU step's data_wait were not measured")
        return
    rate = device_feed_rate(directory, args.batches, torch.device("cuda", 0))
    print(f"into CUDA memory (warm set): {rate:,.0f} rows/s = {rate * ROW_BYTES / 1e9:.2f} GB/s of float16")
    run = training_data_wait(directory, args.batches, "cuda")
    print(
        f"TopK d_sae 16384 k 64 on CUDA (warm set): {run['tokens_per_s']:,.0f} tokens/s, data_wait {run['data_wait']:.1%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/sae-bench-data"))
    parser.add_argument("--gb", type=float, default=10.5)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "rank/world": one reading process of ranks_rate
    args = parser.parse_args()
    directory = args.dir / f"f16_d{D_IN}_{args.gb:g}gb"
    if args.worker:
        rank, world = (int(v) for v in args.worker.split("/"))
        rows, started, ended = loader_span(directory, rank, world, args.batches, host_float32=False)
        print(json.dumps({"rows": rows, "start": started, "end": ended}))
        return
    build_set(directory, args.gb)
    ds = open_activations(directory)
    print(f"set: {ds.describe()}, {ds.nbytes / 1e9:.1f} GB; {os.cpu_count()} CPUs")
    print(f"cache drop: {'works' if cache_drop_works(directory) else 'FAILED, the cold figures below are warm'}")
    # This VM's disk rate drifts from second to second (0.5-1.7 GB/s), so each cold figure is divided by a
    # sequential cold read of as many bytes measured just before it, and each pair is repeated.
    volume = args.batches * BATCH * ROW_BYTES
    runs = [
        ("loader 1 rank, stored dtype", lambda: loader_rate(directory, 0, 1, args.batches, False)),
        ("loader 1 rank, float32", lambda: loader_rate(directory, 0, 1, args.batches, True)),
        ("loader 2 ranks (2 processes), stored dtype", lambda: ranks_rate(directory, 2, args.batches)),
    ]
    for name, run in runs:
        ratios = []
        for _ in range(args.repeats):
            seq_rows = sequential_rows(directory, volume)
            drop_cache(directory)
            rate = run()
            ratios.append(rate / seq_rows)
            print(
                f"{name}, cold: {rate:,.0f} rows/s = {rate * ROW_BYTES / 1e9:.2f} GB/s = {ratios[-1]:.2f}x "
                f"the sequential cold read just before ({seq_rows * ROW_BYTES / 1e9:.2f} GB/s)",
                flush=True,
            )
        print(f"  median {np.median(ratios):.2f}x sequential")
        sequential_rate(directory)  # warm: every page in the cache (the set fits in RAM)
        rate = run()
        print(f"{name}, warm: {rate:,.0f} rows/s = {rate * ROW_BYTES / 1e9:.2f} GB/s", flush=True)
    cuda_figures(directory, args)
    if not args.skip_train:
        seq_rows = sequential_rows(directory, volume)
        drop_cache(directory)
        trained = train_rate(directory, args.train_steps)
        rate = trained["tokens_per_s"]
        print(
            f"tiny TopK SAE (d_sae 32, k 4) trained on the CPU, cold: {rate:,.0f} rows/s = {rate / seq_rows:.2f}x "
            f"the sequential cold read just before ({seq_rows * ROW_BYTES / 1e9:.2f} GB/s); mean data_wait "
            f"{trained['data_wait']:.0%}"
        )


def sequential_rows(directory: Path, volume: int) -> float:
    """Rows/s of a sequential cold read of the set's first `volume` bytes."""
    drop_cache(directory)
    return sequential_rate(directory, limit=volume) / ROW_BYTES


if __name__ == "__main__":
    main()
