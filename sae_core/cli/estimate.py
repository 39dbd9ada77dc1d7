"""`python -m sae_core estimate --config CFG.json --gpus N [--d-in D] [--json]`: GPU memory per rank."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import ConfigError, TrainConfig
from ..data.activations import open_activations
from ..data.formats import DatasetError
from ..gpu.memory import TERM_LABELS, GiB, MemoryEstimate, estimate


def format_estimate(est: MemoryEstimate, world_size: int) -> str:
    lines = [
        f"per-GPU estimate: {est.total_bytes / GiB:.2f} GiB  ({world_size} GPU(s), "
        f"{est.per_rank_batch:,} tokens per rank per step, d_in {est.d_in}; peak at: {est.peak_phase})"
    ]
    for name, value in est.breakdown.items():
        lines.append(f"  {TERM_LABELS.get(name, name):<48} {value / GiB:9.3f} GiB")
    return "\n".join(lines)


def d_in_of(cfg: TrainConfig) -> int:
    """The width of the config's activations, from the files' headers (DatasetError when unreadable)."""
    return open_activations(cfg.activation_source, cfg.activation_key).d_in


def cli_estimate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sae_core estimate", description="Estimate GPU memory per rank for a training config."
    )
    parser.add_argument("--config", required=True, help="TrainConfig JSON file")
    parser.add_argument("--gpus", type=int, default=1, help="number of GPUs (ranks), default 1")
    parser.add_argument("--d-in", type=int, default=None, help="activation width, when the data is not on this machine")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        print(f"--gpus must be at least 1, got {args.gpus}", file=sys.stderr)
        return 2
    try:
        cfg = TrainConfig.from_json_file(args.config)
        d_in = args.d_in if args.d_in is not None else d_in_of(cfg)
        est = estimate(cfg, args.gpus, d_in)
    except (ConfigError, DatasetError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
    else:
        print(format_estimate(est, args.gpus))
    return 0
