"""The CPU training step at a real model's width: d_in 2304 (gemma-2-2b), with and without freed memory kept.

At 4096 rows per rank every [batch x d_in] float32 temporary is 37.7 MB, over glibc's 32 MiB mmap limit, so
by default each is mapped, faulted in, zeroed and unmapped on every step; the training entry keeps freed
memory instead (`engine.run.keep_freed_memory`). This bench times `Trainer.train_step` on an in-memory
float32 set both ways, each in a fresh process (the setting is per process).

    .venv/bin/python -m bench.wide_step [--steps 20] [--d-sae 32] [--k 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

D_IN, ROWS = 2304, 40_000


def worker(source: Path, keep: bool, steps: int, d_sae: int, k: int) -> float:
    import torch

    from sae_core.config import TrainConfig
    from sae_core.data.checks import check_dataset
    from sae_core.engine.distributed import DistEnv
    from sae_core.engine.run import keep_freed_memory
    from sae_core.engine.trainer import Trainer

    if keep:
        keep_freed_memory()
    cfg = TrainConfig(
        activation_source=str(source), architecture="topk", d_sae=d_sae, k=k, batch_size=4096,
        total_steps=steps + 5, device="cpu", b_dec_init="mean", log_every=10**6, checkpoint_every=10**6,
    )  # fmt: skip
    trainer = Trainer(cfg, Path(tempfile.mkdtemp()), DistEnv(device=torch.device("cpu")), check_dataset(cfg))
    trainer.sinks = []
    for _ in range(5):
        trainer.train_step()
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    seconds = (time.perf_counter() - started) / steps
    trainer.reader.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--d-sae", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "SOURCE:keep|default"
    args = parser.parse_args()
    if args.worker:
        source, mode = args.worker.rsplit(":", 1)
        print(json.dumps(worker(Path(source), mode == "keep", args.steps, args.d_sae, args.k)))
        return
    import numpy as np

    source = Path(tempfile.mkdtemp(prefix="sae-bench-wide-")) / "wide.npy"
    np.save(source, np.random.default_rng(0).standard_normal((ROWS, D_IN), dtype=np.float32))
    argv = [sys.executable, "-m", "bench.wide_step", "--steps", str(args.steps), "--d-sae", str(args.d_sae)]
    argv += ["--k", str(args.k)]
    print(f"TopK d_in {D_IN}, d_sae {args.d_sae}, k {args.k}, 4096 rows per step, CPU, in-memory float32 set")
    for mode in ("default", "keep", "default", "keep"):
        output = subprocess.run([*argv, "--worker", f"{source}:{mode}"], capture_output=True, text=True, check=True)
        seconds = json.loads(output.stdout.splitlines()[-1])
        label = "glibc default (freed >32 MiB unmapped)" if mode == "default" else "freed memory kept (the entry's)"
        print(f"{label}: {seconds * 1e3:.1f} ms/step = {4096 / seconds:,.0f} rows/s")


if __name__ == "__main__":
    main()
