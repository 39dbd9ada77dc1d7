"""How close is memory.estimate to the real peak of a training run on a CUDA GPU?

For each configuration, a fresh process trains a few steps with the real trainer
(`python -m sae_core.train` entry, in-process) on a toy set of the right width, then reports
    measured = torch.cuda.max_memory_reserved() + context,
    context  = NVML's memory for the process - torch.cuda.memory_reserved()  (CUDA context, kernels,
               libraries: everything outside PyTorch's allocator)
and the table compares it with memory.estimate(cfg, 1, d_in).total_bytes (goal: within +-10 %).

    python -m bench.memory_accuracy            # all configurations, a markdown table at the end
    python -m bench.memory_accuracy --quick    # the first two only
    python -m bench.memory_accuracy --one '{"architecture": "topk", "d_in": 768, ...}'  # one run, JSON out

Without a CUDA device it prints "no CUDA device: not run" and exits 0.
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

from sae_core import train
from sae_core.config import TrainConfig
from sae_core.data.toy import write_toy
from sae_core.gpu import memory, nvml

REPO = Path(__file__).resolve().parent.parent

GiB = 1024**3
STEPS = 3
HOLDOUT = 4096

# d_in 768-4096, d_sae 8k-64k, per-rank batch 1k-8k, topk and standard (and the other two), fp32 and bf16 autocast.
CONFIGS = [
    {"architecture": "topk", "d_in": 768, "d_sae": 8192, "batch_size": 1024, "autocast": None},
    {"architecture": "standard", "d_in": 768, "d_sae": 16384, "batch_size": 4096, "autocast": "bf16"},
    {"architecture": "topk", "d_in": 2048, "d_sae": 32768, "batch_size": 2048, "autocast": None},
    {"architecture": "standard", "d_in": 2304, "d_sae": 32768, "batch_size": 8192, "autocast": None},
    {"architecture": "topk", "d_in": 4096, "d_sae": 65536, "batch_size": 8192, "autocast": "bf16"},
    {"architecture": "standard", "d_in": 4096, "d_sae": 16384, "batch_size": 2048, "autocast": "bf16"},
    {"architecture": "topk", "d_in": 4096, "d_sae": 65536, "batch_size": 1024, "autocast": None},
    {"architecture": "jumprelu", "d_in": 768, "d_sae": 16384, "batch_size": 4096, "autocast": None},
    {"architecture": "batchtopk", "d_in": 768, "d_sae": 16384, "batch_size": 2048, "autocast": None},
]


def train_config(spec: dict, source: str) -> dict:
    return {
        "activation_source": source,
        "architecture": spec["architecture"],
        "d_sae": spec["d_sae"],
        "k": spec.get("k", 32),
        "batch_size": spec["batch_size"],
        "total_steps": STEPS,
        "autocast": spec.get("autocast"),
        "dtype": spec.get("dtype", "float32"),
        "device": "cuda",
        "log_every": 1,
        "checkpoint_every": 1000,
        "holdout_tokens": HOLDOUT,
    }


def process_gpu_memory(pid: int) -> int | None:
    """NVML's figure for one process on any GPU (None when NVML cannot attribute memory)."""
    for g in nvml.probe().gpus:
        for proc in g.processes or []:
            if proc.pid == pid and proc.gpu_memory is not None:
                return proc.gpu_memory
    return None


def run_one(spec: dict) -> dict:
    """Train `spec` for a few steps in this process and measure its memory (needs CUDA)."""
    import torch  # the measuring child only: the parent never touches CUDA

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "acts.safetensors"
        write_toy(source, tokens=spec["batch_size"] * 2 + HOLDOUT, d_in=spec["d_in"], features=64, seed=0)
        cfg_path = tmp / "cfg.json"
        cfg_path.write_text(json.dumps(train_config(spec, str(source))))
        started = time.perf_counter()
        code = train.main(["--config", str(cfg_path), "--out", str(tmp / "out")])
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        reserved_peak = torch.cuda.max_memory_reserved()
        allocated_peak = torch.cuda.max_memory_allocated()
        reserved_now = torch.cuda.memory_reserved()
        nvml_process = process_gpu_memory(os.getpid())
    context = None if nvml_process is None else nvml_process - reserved_now
    return {
        "exit_code": code,
        "seconds": seconds,
        "reserved_peak": reserved_peak,
        "allocated_peak": allocated_peak,
        "reserved_now": reserved_now,
        "nvml_process": nvml_process,
        "context": context,
        "device": torch.cuda.get_device_name(),
    }


def measure_in_child(spec: dict, timeout_s: float = 900) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "bench.memory_accuracy", "--one", json.dumps(spec)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout)[-800:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate_for(spec: dict) -> memory.MemoryEstimate:
    cfg = TrainConfig.model_validate(train_config(spec, "unused"))
    return memory.estimate(cfg, 1, d_in=spec["d_in"])


def label(spec: dict) -> str:
    cast = "bf16 autocast" if spec.get("autocast") else "fp32"
    return f"{spec['architecture']} d_in {spec['d_in']} d_sae {spec['d_sae'] // 1024}k B {spec['batch_size']} {cast}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="JSON spec: run it here and print the measurement as JSON")
    parser.add_argument("--quick", action="store_true", help="only the first two configurations")
    args = parser.parse_args(argv)
    import torch  # after parsing, so --help is quick

    if not torch.cuda.is_available():
        print("no CUDA device: not run")
        return 0
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    rows = []
    for spec in CONFIGS[:2] if args.quick else CONFIGS:
        est = estimate_for(spec)
        result = measure_in_child(spec)
        rows.append((spec, est, result))
        print(f"{label(spec)}: {json.dumps(result)}", flush=True)
    device = next((r["device"] for _, _, r in rows if "device" in r), "?")
    print(f"\nGPU: {device}; torch {torch.__version__}; CUDA_CONTEXT_BYTES {memory.CUDA_CONTEXT_BYTES / GiB:.2f} GiB\n")
    print("| config | estimate GiB | measured GiB | error | est. peak at | allocated peak GiB | context GiB |")
    print("|---|---|---|---|---|---|---|")
    for spec, est, r in rows:
        if "error" in r:
            print(f"| {label(spec)} | {est.total_bytes / GiB:.2f} | failed | | {est.peak_phase} | | |")
            continue
        context = r["context"] if r["context"] is not None else memory.CUDA_CONTEXT_BYTES
        measured = r["reserved_peak"] + context
        error = (est.total_bytes - measured) / measured * 100
        print(
            f"| {label(spec)} | {est.total_bytes / GiB:.2f} | {measured / GiB:.2f} | {error:+.1f} % | "
            f"{est.peak_phase} | {r['allocated_peak'] / GiB:.2f} | "
            f"{'n/a' if r['context'] is None else f'{context / GiB:.2f}'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
