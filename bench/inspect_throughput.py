"""Inspect job throughput vs the encoder matmul, measured in the same run (issue 15 §1).

A synthetic extraction folder (random rows in contexts of 128, the real manifest/shard/contexts layout) and a
random TopK SAE; the real inspect job's streaming pass (`model.inspect.collect`: read, encode, statistics)
over every row, against the floor: one [chunk × d_in] @ [d_in × d_sae] matmul per chunk on the same rows,
timed in the same process just before. Prints rows/s and the ratio (target ≤ 2× on the CPU).

    .venv/bin/python -m bench.inspect_throughput [--rows 65536] [--d-in 256] [--d-sae 16384] [--k 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from sae_core.config import InspectConfig, TrainConfig
from sae_core.data.heldout import plan_inspection
from sae_core.engine.distributed import DistEnv
from sae_core.engine.saelens import save as save_sae
from sae_core.engine.saes import make_sae
from sae_core.files import CONTEXTS_FILE, EVAL_FILE, EXTRACT_CONFIG_FILE, MANIFEST_FILE, TRAIN_CONFIG_FILE
from sae_core.model.inspect import collect

CONTEXT = 128


def synthetic_extraction(folder: Path, rows: int, d_in: int, shard_rows: int = 65536, vocab: int = 5000) -> Path:
    """An extraction folder as the extraction job writes it, with random rows and tokens (no model behind it)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n_contexts = -(-rows // CONTEXT)
    save_file({"tokens": rng.integers(0, vocab, (n_contexts, CONTEXT), dtype=np.int32)}, str(folder / CONTEXTS_FILE))
    shards = []
    for index, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        ids = np.arange(start, start + n)
        tensors = {
            "activations": rng.standard_normal((n, d_in), dtype=np.float32),
            "token_ids": rng.integers(0, vocab, n, dtype=np.int32),
            "context_ids": (ids // CONTEXT).astype(np.int64),
            "positions": (ids % CONTEXT).astype(np.int32),
        }
        name = f"shard_{index:05d}.safetensors"
        save_file(tensors, str(folder / name))
        shards.append({"file": name, "rows": n})
    manifest = {"kind": "activations", "model": None, "hook": "synthetic", "context_size": CONTEXT, "d_in": d_in,
                "dtype": "float32", "n_rows": rows, "n_contexts": n_contexts, "shards": shards}  # fmt: skip
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    (folder / EXTRACT_CONFIG_FILE).write_text(json.dumps({"exclude_special_tokens": True}))
    return folder


def random_sae_folder(folder: Path, activations: Path, d_in: int, d_sae: int, k: int) -> Path:
    """A random TopK SAE saved as a training would, pointing at `activations`."""
    torch.manual_seed(0)
    save_sae(make_sae("topk", d_in, d_sae, k), folder)
    cfg = TrainConfig(activation_source=str(activations), d_sae=d_sae, k=k, total_steps=1, holdout_tokens=4096)
    (folder / TRAIN_CONFIG_FILE).write_text(cfg.to_json())
    (folder / EVAL_FILE).write_text(json.dumps({"holdout_kind": "tail"}))
    return folder


def floor_seconds(rows: int, chunk: int, d_in: int, d_sae: int) -> float:
    x, w = torch.randn(chunk, d_in), torch.randn(d_in, d_sae)
    x @ w  # warm
    start = time.perf_counter()
    for _ in range(-(-rows // chunk)):
        x @ w
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=2048)
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="sae_lab_bench_inspect_"))
    acts = synthetic_extraction(base / "acts", args.rows, args.d_in)
    sae = random_sae_folder(base / "sae", acts, args.d_in, args.d_sae, args.k)
    cfg = InspectConfig(sae=str(sae), tokens=args.rows, chunk_rows=args.chunk, device="cpu")
    plan = plan_inspection(cfg)
    floor = floor_seconds(args.rows, args.chunk, args.d_in, args.d_sae)
    start = time.perf_counter()
    collect(cfg, plan, DistEnv(), base, [])
    seconds = time.perf_counter() - start
    print(f"inspect {args.rows:,} rows, d_in {args.d_in}, d_sae {args.d_sae:,}, k {args.k}, chunks of {args.chunk}: "
          f"{seconds:.2f} s = {args.rows / seconds:,.0f} rows/s; encoder matmul floor {floor:.2f} s; "
          f"ratio {seconds / floor:.2f}x ({torch.get_num_threads()} threads)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
