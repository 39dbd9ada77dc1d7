"""Validate the scaling model (sae_core.gpu.scaling) with real torchrun runs: measured vs predicted step time.

Runs the trainer on 1 rank and on N ranks (gloo on CPU here; NCCL where GPUs exist), each rank with the
same threads, measures the mean step time, and — inside the N-rank run — the time of a bare all-reduce of
the gradient bytes, and the per-step work every rank repeats in full (the optimizer). The model predicts
step(N) = (step(1) − fixed)/N + fixed + allreduce(N); the printed table compares.

    .venv/bin/python -m bench.scaling [--ranks 2] [--steps 30] [--d-sae 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sae_core.config import TrainConfig
from sae_core.data.checks import check_dataset
from sae_core.data.toy import write_toy
from sae_core.engine.distributed import init_process_group, read_dist_env
from sae_core.engine.trainer import Trainer
from sae_core.gpu.scaling import predict

REPO = Path(__file__).resolve().parent.parent


def worker(args) -> None:
    cfg = TrainConfig(
        activation_source=args.data,
        architecture="topk",
        d_sae=args.d_sae,
        k=16,
        batch_size=args.batch,
        total_steps=args.steps + 5,
        holdout_tokens=0,
        device="cpu",
        log_every=10**6,
        checkpoint_every=10**6,
    )
    env = read_dist_env(cfg)
    init_process_group(env)
    trainer = Trainer(cfg, Path(tempfile.mkdtemp()), env, check_dataset(cfg, env.world_size, scan_values=False))
    trainer.sinks = []
    for _ in range(5):
        trainer.train_step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    fixed = []  # the per-step work every rank does in full: decoder projection, Adam, renormalisation
    for _ in range(10):
        start = time.perf_counter()
        trainer.sae.project_decoder_grad()
        trainer.optimizer.step()
        trainer.sae.normalize_decoder()
        fixed.append(time.perf_counter() - start)
    grad_bytes = sum(p.numel() * p.element_size() for p in trainer.sae.parameters())
    allreduce = 0.0
    if dist.is_initialized():
        buffer = torch.zeros(grad_bytes // 4)
        samples = []
        for _ in range(10):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            samples.append(time.perf_counter() - start)
        allreduce = statistics.median(samples)
    if env.rank == 0:
        print(
            "RESULT "
            + json.dumps(
                {
                    "step_s": statistics.mean(times),
                    "allreduce_s": allreduce,
                    "fixed_s": statistics.median(fixed),
                    "grad_bytes": grad_bytes,
                    "world": env.world_size,
                }
            ),
            flush=True,
        )
    if dist.is_initialized():
        dist.destroy_process_group()


def run(nproc: int, args, data: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "bench.scaling",
        "--worker",
        "--data",
        str(data),
        "--steps",
        str(args.steps),
        "--d-sae",
        str(args.d_sae),
        "--batch",
        str(args.batch),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--data")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    data = Path(tempfile.mkdtemp()) / "toy.safetensors"
    write_toy(data, tokens=args.batch * (args.steps + 12), d_in=128, features=1024, seed=0)
    one, many = run(1, args, data), run(args.ranks, args, data)
    bandwidth = 2 * (args.ranks - 1) / args.ranks * many["grad_bytes"] / max(many["allreduce_s"], 1e-9)
    prediction = predict(one["step_s"], many["grad_bytes"], args.ranks, bandwidth, latency_s=0, fixed_s=one["fixed_s"])
    naive = predict(one["step_s"], many["grad_bytes"], args.ranks, bandwidth, latency_s=0)
    print(f"d_in 128, d_sae {args.d_sae}, k 16, global batch {args.batch}, {args.threads} thread(s) per rank, gloo")
    print(
        f"gradient bytes {many['grad_bytes']:,}; measured all-reduce {many['allreduce_s'] * 1e3:.2f} ms "
        f"({bandwidth / 1e9:.2f} GB/s effective)"
    )
    print(f"per-step work every rank repeats (Adam, renormalisation): {one['fixed_s'] * 1e3:.1f} ms")
    print(
        "| ranks | measured step ms | predicted step ms | measured speed-up | predicted speed-up | without fixed term |"
    )
    print(f"| 1 | {one['step_s'] * 1e3:.1f} | — | 1.00 | 1.00 | 1.00 |")
    print(
        f"| {args.ranks} | {many['step_s'] * 1e3:.1f} | {prediction.step_s * 1e3:.1f} | "
        f"{one['step_s'] / many['step_s']:.2f} | {prediction.speedup:.2f} | {naive.speedup:.2f} |"
    )


if __name__ == "__main__":
    main()
