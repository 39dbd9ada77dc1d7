"""How close is memory.estimate to the real peak of a training run on a CUDA GPU?

For each configuration, a fresh process trains a few steps with the real trainer
(`python -m sae_core.train` entry, in-process) on a toy set of the right width (or the activation set a spec
names as `source`), or runs a model evaluation (a spec with `"kind": "evaluate"`), then reports
    measured = torch.cuda.max_memory_reserved() + context,
    context  = NVML's memory for the process - torch.cuda.memory_reserved()  (CUDA context, kernels,
               libraries: everything outside PyTorch's allocator)
and the table compares it with memory.estimate(cfg, 1, d_in).total_bytes (goal: within +-10 %).

    python -m bench.memory_accuracy            # all configurations, a markdown table at the end
    python -m bench.memory_accuracy --quick    # the first two only
    python -m bench.memory_accuracy --one '{"architecture": "topk", "d_in": 768, ...}'  # one run, JSON out

Without a CUDA device it prints "no CUDA device: not run" and exits 0; `--one` with `"device": "cpu"` runs the
spec on the CPU (no CUDA figures: what bench/gpu_check.sh --dry-run checks). Where NVML cannot see this
process (a container's pid namespace), the context is the growth of every GPU's used memory instead.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sae_core import train
from sae_core.architectures import architecture
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
    takes_k = "k" in architecture(spec["architecture"]).options.model_fields  # the TopK family's option
    return {
        "activation_source": source,
        "architecture": spec["architecture"],
        "d_sae": spec["d_sae"],
        **({"k": spec.get("k", 32)} if takes_k else {}),
        "batch_size": spec["batch_size"],
        "total_steps": STEPS,
        "autocast": spec.get("autocast"),
        "dtype": spec.get("dtype", "float32"),
        "micro_batch_size": spec.get("micro_batch_size"),
        "device": spec.get("device", "cuda"),
        "log_every": 1,
        "checkpoint_every": 1000,
        "holdout_tokens": HOLDOUT,
    }


def evaluate_config(spec: dict) -> dict:
    """An EvaluateConfig of a model evaluation spec: an SAE folder, its model, hook and text."""
    fields = ("sae", "model", "hook", "dataset", "context_size", "contexts", "batch_size", "model_dtype")
    return {**{name: spec[name] for name in fields if name in spec}, "device": spec.get("device", "cuda")}


def process_gpu_memory(pid: int) -> int | None:
    """NVML's figure for one process on any GPU (None when NVML cannot attribute memory)."""
    for g in nvml.probe().gpus:
        for proc in g.processes or []:
            if proc.pid == pid and proc.gpu_memory is not None:
                return proc.gpu_memory
    return None


def all_gpus_used() -> int | None:
    """Used memory of every GPU together, as NVML sees it (None without NVML)."""
    gpus = nvml.probe().gpus
    used = [g.memory_used for g in gpus if g.memory_used is not None]
    return sum(used) if used else None


def run_spec(spec: dict, tmp: Path) -> int:
    """Run a training (default) or a model evaluation spec in this process; its exit code."""
    if spec.get("kind", "train") == "evaluate":
        from sae_core.evaluate import main as evaluate_main

        cfg_path = tmp / "evaluate.json"
        cfg_path.write_text(json.dumps(evaluate_config(spec)))
        return evaluate_main(["--config", str(cfg_path), "--out", str(tmp / "out")])
    source = spec.get("source")
    if source is None:
        source = str(tmp / "acts.safetensors")
        write_toy(Path(source), tokens=spec["batch_size"] * 2 + HOLDOUT, d_in=spec["d_in"], features=64, seed=0)
    cfg_path = tmp / "cfg.json"
    cfg_path.write_text(json.dumps(train_config(spec, source)))
    return train.main(["--config", str(cfg_path), "--out", str(tmp / "out")])


def run_one(spec: dict) -> dict:
    """Run `spec` in this process and measure its memory (the CUDA figures on a GPU; None on the CPU)."""
    import resource

    import torch  # the measuring child only: the parent never touches CUDA

    cuda = spec.get("device", "cuda") == "cuda"
    used_before = all_gpus_used() if cuda else None  # before this process creates its CUDA context
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        code = run_spec(spec, Path(tmp))
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        result = {
            "exit_code": code,
            "seconds": seconds,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        if not cuda:
            return {**result, "reserved_peak": None, "allocated_peak": None, "nvml_process": None, "context": None}
        reserved_now = torch.cuda.memory_reserved()
        nvml_process = process_gpu_memory(os.getpid())
        used_after = all_gpus_used()
    context, context_from = None, None
    if nvml_process is not None:
        context, context_from = nvml_process - reserved_now, "process"
    elif used_before is not None and used_after is not None:
        context, context_from = used_after - used_before - reserved_now, "all GPUs' used memory"
    return {
        **result,
        "reserved_peak": torch.cuda.max_memory_reserved(),
        "allocated_peak": torch.cuda.max_memory_allocated(),
        "reserved_now": reserved_now,
        "nvml_process": nvml_process,
        "context": context,
        "context_from": context_from,
        "device": torch.cuda.get_device_name(),
    }


def measured_peak(result: dict) -> int:
    """What nvidia-smi shows at the peak: the allocator's peak reservation plus everything outside it."""
    return result["reserved_peak"] + (result["context"] or 0)


# The constants gpu/memory_constants.py reads from a file.
CONSTANT_KEYS = ("cuda_context_bytes", "allocator_headroom", "nccl_bytes")


def constants_from(results: list[tuple[str, dict]], nccl: dict | None, device: str) -> dict:
    """The measured constants of (kind, measurement) pairs, as gpu/memory_constants.py reads them: the largest
    context and the largest share reserved beyond the allocated peak of a training (an estimate should not
    fall short), NCCL's buffers where 2 ranks were measured; and, for people, where and when."""
    import torch

    info: dict = {"measured_on": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    on_gpu = [(kind, r) for kind, r in results if r.get("reserved_peak") is not None]
    contexts = [r["context"] for _, r in on_gpu if r["context"] is not None]
    if contexts:
        info["cuda_context_bytes"] = max(contexts)
    trains = [r for kind, r in on_gpu if kind == "train"]
    if trains:
        info["allocator_headroom"] = round(max(r["reserved_peak"] / r["allocated_peak"] - 1 for r in trains), 4)
    if nccl is not None:
        if nccl["bytes"] is not None and nccl["ranks"] >= 2:  # one rank's communicator is no guide to several's
            info["nccl_bytes"] = nccl["bytes"]
        info["nccl_measured"] = nccl["what"]
    return info


def nccl_rank() -> dict:
    """One rank of the NCCL probe (RANK, WORLD_SIZE, MASTER_* set): this process's GPU memory grown by its
    first all-reduce, less what torch's allocator reserved meanwhile (gloo without CUDA: nothing measured)."""
    import torch
    import torch.distributed as dist

    rank, cuda = int(os.environ["RANK"]), torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
        torch.ones(1, device="cuda")  # the CUDA context first: it is not NCCL's
        torch.cuda.synchronize()
    before, device_before = process_gpu_memory(os.getpid()), all_gpus_used()
    reserved = torch.cuda.memory_reserved() if cuda else 0
    dist.init_process_group("nccl" if cuda else "gloo")
    tensor = torch.ones(2**20, device="cuda" if cuda else "cpu")
    dist.all_reduce(tensor)  # NCCL sets its communicator up lazily, at the first collective
    grown = None
    if cuda:
        torch.cuda.synchronize()
        allocator = torch.cuda.memory_reserved() - reserved
        after = process_gpu_memory(os.getpid())
        if before is not None and after is not None:
            grown = after - before - allocator
        elif dist.get_world_size() == 1 and device_before is not None:  # NVML cannot see us: the whole device
            grown = (all_gpus_used() or 0) - device_before - allocator
    world = dist.get_world_size()
    dist.destroy_process_group()
    return {"rank": rank, "bytes": grown, "all_reduce_ok": float(tensor[0]) == world}


def nccl_bytes(cuda: bool, record: Path | None = None, timeout_s: float = 90) -> dict:
    """NCCL's buffers per rank on min(2, GPUs) ranks ({"bytes", "ranks", "what"}); on the CPU the same probe
    runs 2 gloo ranks and measures nothing. `record`: where the ranks' answers are written."""
    import torch

    ranks = min(2, torch.cuda.device_count()) if cuda else 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(ranks)}
    argv = [sys.executable, "-m", "bench.memory_accuracy", "--nccl-rank"]
    procs = [subprocess.Popen(argv, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              text=True) for r in range(ranks)]  # fmt: skip
    answers = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout_s)
        answers.append(json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 and out.strip() else None)
    if record is not None:
        record.write_text(json.dumps(answers))
    if any(a is None or not a["all_reduce_ok"] for a in answers):
        return {"bytes": None, "ranks": ranks, "what": "the probe failed (its output is in the log)"}
    sizes = [a["bytes"] for a in answers if a["bytes"] is not None]
    if not sizes:
        why = "gloo on the CPU: nothing measured" if not cuda else "NVML cannot see the probe's processes"
        return {"bytes": None, "ranks": ranks, "what": why}
    return {"bytes": max(sizes), "ranks": ranks, "what": f"{max(sizes) / GiB:.2f} GiB per rank with {ranks} rank(s)"}


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


# Terms outside PyTorch's allocator, which torch.cuda.max_memory_allocated does not see.
OUTSIDE_ALLOCATOR = ("cuda_context", "nccl_buffers", "allocator_headroom")


def estimate_terms(spec: dict) -> dict[str, int]:
    """The estimate's terms for one rank of a training or a model evaluation spec, as the gate computes them."""
    if spec.get("kind", "train") != "evaluate":
        return estimate_for(spec).breakdown
    from sae_core.config import EvaluateConfig
    from sae_core.data.heldout import plan_evaluation
    from sae_core.jobs.evaluate_checks import memory_per_rank
    from sae_core.jobs.models import model_facts

    cfg = EvaluateConfig.model_validate(evaluate_config(spec))
    on_gpu = cfg.device != "cpu"
    return memory_per_rank(cfg, model_facts(str(cfg.model)), plan_evaluation(cfg), on_gpu)


def label(spec: dict) -> str:
    cast = "bf16 autocast" if spec.get("autocast") else "fp32"
    return f"{spec['architecture']} d_in {spec['d_in']} d_sae {spec['d_sae'] // 1024}k B {spec['batch_size']} {cast}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help="JSON spec: run it here and print the measurement as JSON")
    parser.add_argument("--quick", action="store_true", help="only the first two configurations")
    parser.add_argument("--nccl-rank", action="store_true", help=argparse.SUPPRESS)  # one rank of nccl_bytes
    args = parser.parse_args(argv)
    import torch  # after parsing, so --help is quick

    if args.nccl_rank:
        print(json.dumps(nccl_rank()))
        return 0

    if args.one:
        spec = json.loads(args.one)
        if spec.get("device", "cuda") == "cuda" and not torch.cuda.is_available():
            print("no CUDA device: not run", file=sys.stderr)
            return 1
        print(json.dumps(run_one(spec)))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: not run")
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
        measured = measured_peak({**r, "context": context})
        error = (est.total_bytes - measured) / measured * 100
        print(
            f"| {label(spec)} | {est.total_bytes / GiB:.2f} | {measured / GiB:.2f} | {error:+.1f} % | "
            f"{est.peak_phase} | {r['allocated_peak'] / GiB:.2f} | "
            f"{'n/a' if r['context'] is None else f'{context / GiB:.2f}'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
