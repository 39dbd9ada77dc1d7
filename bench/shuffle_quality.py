"""Does the block shuffle train as well as a full shuffle? Holdout FVU and mmcs, same data, same steps.

Neighbouring rows of real activations are alike (tokens of one context share topics), and a block shuffle
keeps neighbours closer together than a full shuffle does. To test the worst case, this bench builds a toy
set whose rows are *sorted by their dominant ground-truth feature*: a block holds rows of one feature, so a
batch drawn from few blocks would be badly skewed. It trains the same TopK SAE on it with
- a full shuffle (one window as large as the set), and
- the block shuffle at the defaults' proportions scaled to this set (256 blocks per window; the window is
  1/64 of the set, as 256 MiB is a small fraction of a real multi-GB set),
and, as a control that the bench can tell orders apart, blocks in random order with no mixing across
them; it prints holdout FVU and mmcs of each (target: block within 1 % of full on FVU).

    .venv/bin/python -m bench.shuffle_quality [--rows 1048576] [--steps 1500] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from sae_core.data.toy import ToyGenerator

D_IN, FEATURES = 64, 256


def sorted_toy(path: Path, rows: int, seed: int) -> None:
    """A toy set (d_in 64, 256 features) with its rows ordered by their strongest feature."""
    generator = ToyGenerator(D_IN, FEATURES, seed)
    acts, dominant = np.empty((rows, D_IN), np.float32), np.full(rows, FEATURES, np.int64)
    for start, codes, chunk in generator.iter_chunks(rows):
        acts[start : start + len(chunk)] = chunk
        by_row = np.lexsort((codes.magnitude, codes.row))  # within a row, the strongest firing comes last
        rows_sorted = codes.row[by_row]
        last = by_row[np.r_[rows_sorted[1:] != rows_sorted[:-1], True]]
        dominant[start + codes.row[last]] = codes.feature[last]
    order = np.argsort(dominant, kind="stable")
    np.save(path, acts[order])
    np.save(path.with_name(f"{path.stem}.features.npy"), generator.features)


def train(source: Path, out: Path, steps: int, seed: int, shuffle: dict) -> dict:
    cfg = {
        "activation_source": str(source),
        "architecture": "topk",
        "d_sae": 512,
        "k": 8,
        "batch_size": 4096,
        "total_steps": steps,
        "log_every": 100,
        "checkpoint_every": steps,
        "holdout_tokens": 32768,
        "device": "cpu",
        "seed": seed,
        **shuffle,
    }
    (out / "cfg.json").write_text(json.dumps(cfg))
    argv = [sys.executable, "-m", "sae_core.train", "--config", str(out / "cfg.json"), "--out", str(out / "run")]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "run" / "eval.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2**20)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sae-bench-shuffle-"))
    source = work / "sorted_toy.npy"
    sorted_toy(source, args.rows, seed=0)
    set_bytes = args.rows * D_IN * 4
    window = set_bytes // 64
    modes = {
        "full shuffle (one window = the set)": {"shuffle_block_bytes": 2**20, "shuffle_buffer_bytes": 2 * set_bytes},
        f"block shuffle ({window // 256} B blocks, {window // 2**20} MiB windows)": {
            "shuffle_block_bytes": window // 256,
            "shuffle_buffer_bytes": window,
        },
        # The control: blocks in random order but no mixing across them (a batch is ~4 blocks of few features).
        f"blocks only ({window // 256} B blocks, window = 1 block)": {
            "shuffle_block_bytes": window // 256,
            "shuffle_buffer_bytes": window // 256,
        },
    }
    print(f"sorted toy set: {args.rows:,} rows x {D_IN} float32 ({set_bytes / 2**20:.0f} MiB), {args.steps} steps")
    results: dict[str, list[dict]] = {}
    for name, shuffle in modes.items():
        for seed in (int(s) for s in args.seeds.split(",")):
            out = work / f"{len(results)}_{seed}"
            out.mkdir()
            results.setdefault(name, []).append(train(source, out, args.steps, seed, shuffle))
    for name, figures in results.items():
        fvu = [f["fvu"] for f in figures]
        mmcs = [f["mmcs"] for f in figures]
        print(f"{name}: FVU {' / '.join(f'{v:.4f}' for v in fvu)}; mmcs {' / '.join(f'{v:.3f}' for v in mmcs)}")
    full, block, control = (np.mean([f["fvu"] for f in figures]) for figures in results.values())
    print(f"block / full FVU: {block / full:.4f} ({(block / full - 1) * 100:+.2f} %)")
    print(f"control (blocks only) / full FVU: {control / full:.4f} ({(control / full - 1) * 100:+.2f} %)")


if __name__ == "__main__":
    main()
