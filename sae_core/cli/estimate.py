"""`python -m sae_core estimate --config CFG.json --gpus N [--d-in D] [--json]`: GPU memory per rank; for a sweep,
per GPU in both layouts, and their predicted speed-up. A config streamed from a model takes d_in from its hook's
width (the widest of a sweep's hooks) and adds the model, its forward batch and the mixing windows."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import ConfigError, TrainConfig
from ..data.activations import open_activations
from ..data.formats import DatasetError
from ..gpu.memory import TERM_LABELS, GiB, MemoryEstimate, StreamSource, estimate, sweep_estimate
from ..gpu.scaling import PCIE4_X16_BYTES_PER_S, predict_sweep
from ..jobs.models import ModelProblem, model_facts
from ..jobs.stream_checks import hooks_of, keys_of, stream_d_in, stream_source
from ..model_source import activation_files
from ..sweep import Sweep, read_training_config

LAYOUTS = ("batch", "members")


def format_estimate(est: MemoryEstimate, world_size: int) -> str:
    lines = [
        f"per-GPU estimate: {est.total_bytes / GiB:.2f} GiB  ({world_size} GPU(s), "
        f"{est.per_rank_batch:,} tokens per rank per step, d_in {est.d_in}; peak at: {est.peak_phase})"
    ]
    for name, value in est.breakdown.items():
        lines.append(f"  {TERM_LABELS.get(name, name):<48} {value / GiB:9.3f} GiB")
    return "\n".join(lines)


def sweep_figures(sweep: Sweep, world_size: int, d_in: int, stream: StreamSource | None = None) -> dict:
    """Both layouts' per-GPU estimates (or why one cannot run on `world_size` GPUs) and the predicted speed-up
    of each over one GPU, links assumed PCIe 4.0 x16 (as JSON)."""
    if d_in < 1:
        raise ConfigError(f"d_in must be at least 1, got {d_in}")
    layouts: dict[str, dict] = {}
    for layout in LAYOUTS:
        try:
            layouts[layout] = sweep_estimate(sweep, world_size, d_in, layout, stream).to_dict()
        except ConfigError as exc:
            layouts[layout] = {"error": str(exc)}
    prediction = predict_sweep(sweep, d_in, world_size, PCIE4_X16_BYTES_PER_S)
    return {
        "members": [m.name for m in sweep.members],
        "placement": sweep.placement,
        "gpus": world_size,
        "d_in": d_in,
        "layouts": layouts,
        "stream": stream.terms() if stream is not None else None,
        "speedup": {
            layout: None if seconds is None else prediction.one_gpu_s / seconds
            for layout, seconds in (("batch", prediction.batch_s), ("members", prediction.members_s))
        },
    }


def format_sweep(figures: dict) -> str:
    n, count = figures["gpus"], len(figures["members"])
    lines = [
        f"sweep of {count} member(s) on {n} GPU(s), d_in {figures['d_in']} (placement asked: {figures['placement']})"
    ]
    for layout, est in figures["layouts"].items():
        if "error" in est:
            lines.append(f"  placement {layout:<8} cannot run: {est['error']}")
            continue
        if layout == "batch":
            how = f"every member on each GPU, {est['ranks'][0]['per_rank_batch']:,} tokens per GPU per step"
        else:
            most = max(len(rank["members"]) for rank in est["ranks"])
            how = f"members dealt to GPUs, at most {most} per GPU, each on whole batches"
        lines.append(f"  placement {layout:<8} {est['total_bytes'] / GiB:8.2f} GiB per GPU  ({how})")
    if figures.get("stream"):
        lines.append("  of which, on every GPU, the stream from the model:")
        lines += [f"    {TERM_LABELS[name]:<46} {value / GiB:9.3f} GiB" for name, value in figures["stream"].items()]
    if n > 1:
        shown = [f"{layout} ≈{x:.1f}×" for layout, x in figures["speedup"].items() if x is not None]
        lines.append(f"predicted tokens/s over one GPU (PCIe 4.0 x16 links assumed): {', '.join(shown)}")
    return "\n".join(lines)


def d_in_of(cfg: TrainConfig) -> int:
    """The width of the config's activations, from the files' headers (DatasetError when unreadable)."""
    return open_activations(activation_files(cfg), cfg.activation_key).d_in


def source_of(cfg: TrainConfig | Sweep, d_in: int | None) -> tuple[int, StreamSource | None]:
    """The activations' width (`d_in` when given) and, for a config streamed from a model, what the stream holds
    on each GPU: the model as the hooks command reads it (ModelProblem when it cannot)."""
    shared = cfg.shared if isinstance(cfg, Sweep) else cfg
    if not shared.streamed:
        return (d_in if d_in is not None else d_in_of(shared)), None
    assert shared.model is not None
    facts, hooks = model_facts(shared.model), hooks_of(cfg)
    missing = [hook for hook in hooks if hook not in facts.hooks]
    if missing:
        raise ModelProblem("hook", f"hook: {missing[0]!r} is not a module of this model (`hooks MODEL` lists them)")
    stream = stream_source(shared, facts, hooks, on_gpu=True, keys=keys_of(cfg))
    return (d_in if d_in is not None else stream_d_in(facts, hooks)), stream


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
        cfg = read_training_config(args.config)
        d_in, stream = source_of(cfg, args.d_in)
        if isinstance(cfg, Sweep):
            figures = sweep_figures(cfg, args.gpus, d_in, stream)
            print(json.dumps(figures, indent=2) if args.json else format_sweep(figures))
            return 0
        est = estimate(cfg, args.gpus, d_in, stream)
    except (ConfigError, DatasetError, OSError, ModelProblem) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(est.to_dict(), indent=2))
    else:
        print(format_estimate(est, args.gpus))
    return 0
