"""Training throughput vs the unavoidable encoder matmul, measured in the same run.

Toy set, TopK and BatchTopK, d_in 128, d_sae 1024, k 8, global batch 4096 (issue 2 §9 / issue 6). Prints tokens/s, the median
step time, the median time of one [batch × d_in] @ [d_in × d_sae] matmul timed just before each step, and
their ratio; then FVU and mmcs after the run so speed changes can be checked for quality. CUDA configurations run where a GPU exists.

    .venv/bin/python -m bench.train_throughput [--steps 60] [--threads 2] [--cuda-only]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sae_core.config import TrainConfig
from sae_core.data.checks import check_dataset
from sae_core.data.toy import write_toy
from sae_core.engine.distributed import DistEnv
from sae_core.engine.evaluation import evaluate
from sae_core.engine.trainer import Trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MatmulFloor:
    """The encoder's forward matmul [batch × d_in] @ [d_in × d_sae] on fresh random operands."""

    def __init__(self, batch: int, d_in: int, d_sae: int, device: torch.device, dtype=torch.float32):
        self.device = device
        self.x = torch.randn(batch, d_in, device=device, dtype=dtype)
        self.w = torch.randn(d_in, d_sae, device=device, dtype=dtype)

    def time_once(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.x @ self.w
        sync(self.device)
        return time.perf_counter() - start


def measure(
    cfg: TrainConfig, device: torch.device, steps: int, warmup: int = 5, reference: bool = False, data=None
) -> dict:
    """Median step time of the real trainer against the median floor matmul, timed interleaved (one matmul
    just before each step) so both see the same machine state; `reference` runs the plain dense TopK path.
    `data`: the checked set of cfg (checked here when not given). `data_wait` is the share of the timed
    steps spent waiting for the loader."""
    data = data if data is not None else check_dataset(cfg)
    trainer = Trainer(cfg, Path(tempfile.mkdtemp()), DistEnv(device=device), data)
    trainer.sinks = []
    if reference:
        trainer.forward = functools.partial(trainer.sae.training_step, reference=True)
    floor = MatmulFloor(
        cfg.batch_size, data.d_in, cfg.d_sae, device, torch.bfloat16 if cfg.autocast == "bf16" else torch.float32
    )
    try:
        for _ in range(warmup):
            floor.time_once()
            trainer.train_step()
        step_times, floor_times = [], []
        waited = trainer.reader.wait_seconds
        for _ in range(steps):
            floor_times.append(floor.time_once())
            sync(device)
            start = time.perf_counter()
            trainer.train_step()
            sync(device)
            step_times.append(time.perf_counter() - start)
        waited = trainer.reader.wait_seconds - waited
    finally:
        trainer.reader.close()
    step, floor_s = statistics.median(step_times), statistics.median(floor_times)
    figures = evaluate(trainer.sae, data, trainer.order.holdout_rows(), device)
    return {
        "tokens_per_s": cfg.batch_size / step,
        "step_ms": step * 1e3,
        "floor_ms": floor_s * 1e3,
        "ratio": step / floor_s,
        "data_wait": waited / sum(step_times),
        "fvu": figures.get("fvu"),
        "mmcs": figures.get("mmcs"),
    }


def report(label: str, result: dict) -> None:
    print(
        f"{label:<44} {result['tokens_per_s']:>12,.0f} tok/s  step {result['step_ms']:8.2f} ms  "
        f"matmul {result['floor_ms']:7.3f} ms  ratio {result['ratio']:5.2f}x  "
        f"fvu {result['fvu']:.4f}  mmcs {result['mmcs']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cuda-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    toy = tmp / "toy.safetensors"
    write_toy(toy, tokens=4096 * (args.steps + 10) + 8192, d_in=128, features=1024, seed=0)
    base = dict(
        activation_source=str(toy),
        architecture="topk",
        d_sae=1024,
        k=8,
        batch_size=4096,
        total_steps=args.steps + 10,
        holdout_tokens=8192,
        log_every=10**6,
        checkpoint_every=10**6,
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} timed steps")
    if not args.cuda_only:
        cpu = TrainConfig(**base, device="cpu")
        compiled = cpu.model_copy(update={"torch_compile": True})
        batch_topk = cpu.model_copy(update={"architecture": "batchtopk"})
        for label, cfg, reference in (
            ("dense reference", cpu, True),
            ("sparse fast path", cpu, False),
            ("sparse + torch_compile", compiled, False),
            ("dense reference", batch_topk, True),
            ("sparse fast path", batch_topk, False),
        ):
            result = measure(cfg, torch.device("cpu"), args.steps, reference=reference)
            report(f"cpu {cfg.architecture} d_in128 d_sae1024 k8 B4096 {label}", result)
    if not torch.cuda.is_available():
        print("no CUDA device: CUDA configurations not run")
        return
    print(f"cuda: {torch.cuda.get_device_name(0)}")
    for d_sae in (16384, 65536):
        for batch in (4096, 16384):
            for autocast in (None, "bf16"):
                cuda_toy = tmp / "toy2304.safetensors"
                if not cuda_toy.exists():
                    write_toy(cuda_toy, tokens=16384 * 40 + 8192, d_in=2304, features=4096, seed=0)
                cfg = TrainConfig(
                    **{
                        **base,
                        "activation_source": str(cuda_toy),
                        "d_sae": d_sae,
                        "k": 64,
                        "batch_size": batch,
                        "total_steps": 40,
                    },
                    autocast=autocast,
                    device="cuda",
                )
                label = f"cuda topk d_in2304 d_sae{d_sae} k64 B{batch} {autocast or 'fp32'}"
                report(label, measure(cfg, torch.device("cuda"), steps=20))


if __name__ == "__main__":
    main()
