"""Training at a billion rows: peak RSS and wall time of a 3-step run, and how soon the first step comes.

The set is a sparse file (zeros that occupy no disk): 1 B rows x d_in 2304 float16 (4.6 TB, gemma-2-2b's
residual stream at 1 B tokens), so what is measured is the order, the up-front checks and the reading
machinery at that size, not the disk. Runs `python -m sae_core.train` (CPU) as a child process and reads
its peak RSS from the kernel (ru_maxrss of the waited-for child).

    .venv/bin/python -m bench.data_scale [--dir /var/tmp/sae-bench-data] [--rows 1000000000] [--d-in 2304]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def sparse_set(directory: Path, rows: int, d_in: int) -> Path:
    """A .npy of zeros whose data is one hole: creating it writes only the header."""
    path = directory / f"sparse_{rows}x{d_in}_f16.npy"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(rows, d_in))
        del array
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/sae-bench-data"))
    parser.add_argument("--rows", type=int, default=10**9)
    parser.add_argument("--d-in", type=int, default=2304)
    args = parser.parse_args()
    path = sparse_set(args.dir, args.rows, args.d_in)
    out = Path(tempfile.mkdtemp(prefix="sae-bench-scale-"))
    cfg = {
        "activation_source": str(path),
        "architecture": "topk",
        "d_sae": 256,
        "k": 8,
        "batch_size": 4096,
        "total_steps": 3,
        "log_every": 1,
        "checkpoint_every": 3,
        "holdout_tokens": 4096,
        "device": "cpu",
        "b_dec_init": "mean",
    }
    (out / "cfg.json").write_text(json.dumps(cfg))
    argv = [sys.executable, "-m", "sae_core.train", "--config", str(out / "cfg.json"), "--out", str(out / "run")]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if first_step is None and line.startswith("step 1/"):
            first_step = time.perf_counter() - started
    proc.wait()
    wall = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise SystemExit(f"training failed with exit code {proc.returncode}; see {out / 'run'}")
    size = args.rows * args.d_in * 2
    print(
        f"{args.rows:,} rows x {args.d_in} float16 ({size / 1e12:.1f} TB sparse file), 3 steps of 4096 rows on "
        f"{os.cpu_count()} CPUs: peak RSS {peak_kib / 2**20:.2f} GiB, wall {wall:.1f} s "
        f"(first step after {first_step:.1f} s, python and torch start-up included)"
    )


if __name__ == "__main__":
    main()
