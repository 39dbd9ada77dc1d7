"""The data path against the disk: sequential read rate vs the loader's rows/s, cold and warm, 1 and 2 ranks.

Creates once (under --dir) a float16 activation folder at d_in 2304 (gemma-2-2b's width) of --gb GB, as
extraction writes it (shards + manifest.json). Then, in one run:
- the sequential cold read rate of all shards (8 MiB reads), the reference every figure is divided by;
- the loader's rows/s cold and warm with 1 rank, in the stored dtype (what a CUDA run copies to the device)
  and as float32 (a CPU run: converted in the reader threads);
- 2 ranks as 2 processes reading their own rows of the same batches at once, cold;
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


def build_set(directory: Path, gb: float) -> Path:
    """The float16 set, written once (random rows; a different seed per shard)."""
    n_rows = int(gb * 1e9 / ROW_BYTES)
    if (directory / "manifest.json").exists() and open_activations(directory).n_rows == n_rows:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, start in enumerate(range(0, n_rows, SHARD_ROWS)):
        rows = min(SHARD_ROWS, n_rows - start)
        part = np.random.default_rng(i).standard_normal((rows, D_IN), dtype=np.float32).astype(np.float16)
        save_file({"activations": part}, str(directory / shard_file_name(i)))
        entries.append(ShardEntry(shard_file_name(i), rows))
        print(f"  wrote shard {i} ({rows:,} rows)", flush=True)
    write_manifest(directory, Manifest(D_IN, "float16", tuple(entries), {"dataset": "bench random"}))
    return directory


def drop_cache(directory: Path) -> bool:
    """Evict the set's pages from the page cache; False when the kernel kept them (then figures are warm)."""
    os.sync()
    for path in sorted(directory.glob("shard_*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    # A first 64 MiB read far faster than a disk says the pages stayed.
    return sequential_rate(directory, limit=64 * 2**20) < 6e9


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/sae-bench-data"))
    parser.add_argument("--gb", type=float, default=10.5)
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--train-steps", type=int, default=300)
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
    figures: dict[str, float] = {}
    cold = drop_cache(directory)
    print(f"cache drop: {'cold' if cold else 'FAILED, figures below are warm'}")
    figures["sequential cold GB/s"] = sequential_rate(directory) / 1e9
    seq_rows = figures["sequential cold GB/s"] * 1e9 / ROW_BYTES
    print(f"sequential cold: {figures['sequential cold GB/s']:.2f} GB/s = {seq_rows:,.0f} rows/s")
    runs = [
        ("loader 1 rank, stored dtype, cold", True, lambda: loader_rate(directory, 0, 1, args.batches, False)),
        ("loader 1 rank, stored dtype, warm", False, lambda: loader_rate(directory, 0, 1, args.batches, False)),
        ("loader 1 rank, float32, cold", True, lambda: loader_rate(directory, 0, 1, args.batches, True)),
        ("loader 1 rank, float32, warm", False, lambda: loader_rate(directory, 0, 1, args.batches, True)),
        ("loader 2 ranks (2 processes), stored dtype, cold", True, lambda: ranks_rate(directory, 2, args.batches)),
    ]
    for name, want_cold, run in runs:
        if want_cold:
            drop_cache(directory)
        else:
            sequential_rate(directory)  # warm: every page in the cache (the set must fit in RAM)
        rate = run()
        print(f"{name}: {rate:,.0f} rows/s = {rate * ROW_BYTES / 1e9:.2f} GB/s = {rate / seq_rows:.2f}x sequential")
    if not args.skip_train:
        drop_cache(directory)
        trained = train_rate(directory, args.train_steps)
        print(
            f"training a tiny TopK SAE (d_sae 32, k 4, CPU) on the cold set: {trained['tokens_per_s']:,.0f} rows/s "
            f"= {trained['tokens_per_s'] / seq_rows:.2f}x sequential, mean data_wait {trained['data_wait']:.0%}"
        )


if __name__ == "__main__":
    main()
