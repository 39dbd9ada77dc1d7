"""The inspect entry's body: stream rows through the SAE's encoder, keep per-latent statistics, add what the
model knows (token text, logit effects), write `inspect/` beside the SAE.

`sae_core.inspect` (what `python -m sae_core.inspect` and torchrun run) calls `main` here. The rows are the
last `tokens` of the activations (the tail, where training's holdout is), cut into chunks of whole contexts;
rank r encodes every world-th chunk into its own LatentStats (engine/latent_stats.py), writes it to the job
folder, and rank 0 merges them, adds the decoder's neighbours, ground-truth matches (toy sets), logit
effects and token windows, and replaces `inspect/` atomically (written beside it, then renamed).

A transcoder's rows are its module's input (data/heldout.py plans them): its latents fire on those; its decoder
writes to the module's output, so its logit effects go through the unembedding when that output is as wide as
the residual (an MLP block's is), and its nearest latents compare decoder rows as an SAE's do.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.elastic.multiprocessing.errors import record

from ..config import ConfigError, InspectConfig
from ..data.formats import DatasetError, to_float32
from ..data.heldout import InspectPlan, plan_inspection
from ..data.text import token_texts
from ..engine.distributed import DistEnv, read_dist_env
from ..engine.latent_stats import (
    NO_ROW,
    LatentStats,
    StatsShape,
    best_true_features,
    encode_active,
    log_edges,
    logit_effects,
    nearest_latents,
)  # fmt: skip
from ..engine.run import run_ranks
from ..engine.saelens import load as load_sae
from ..engine.sinks import MetricsSink, report_done
from ..files import (
    CONTEXTS_FILE,
    INSPECT_DIR,
    INSPECT_DONE_FILE,
    INSPECT_LATENTS_FILE,
    INSPECT_SUMMARY_FILE,
    INSPECT_TOKENS_FILE,
    POSITIONS_KEY,
)  # fmt: skip
from ..latents import INSPECT_VERSION
from . import extraction
from .loading import ModelError, load_model, load_tokenizer, resolve_model

BAD_INPUT = (ConfigError, DatasetError, ModelError)
DENSE_FREQUENCY = 0.1  # a latent firing on more than a tenth of the tokens is flagged dense


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sae_core.inspect", description="Inspect an SAE's latents (one process, or under torchrun)."
    )
    parser.add_argument("--config", required=True, help="InspectConfig JSON file")
    parser.add_argument("--out", required=True, help="job folder (rank states, inspect_done.json, error.txt)")
    return parser.parse_args(argv)


def chunk_bounds(plan: InspectPlan, chunk_rows: int, contexts: np.ndarray | None) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of about chunk_rows covering the inspected rows; with contexts, each cut moves
    forward to where a new context starts, so that a chunk holds whole contexts."""
    first, end = plan.first_row, plan.data.n_rows
    cuts = [first]
    while cuts[-1] < end:
        cut = min(cuts[-1] + chunk_rows, end)
        if contexts is not None:
            while cut < end and contexts[cut - first] == contexts[cut - first - 1]:
                cut += 1
        cuts.append(cut)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def read_rows(plan: InspectPlan, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    raw = plan.data.read_range(lo, hi)
    return torch.from_numpy(to_float32(raw, plan.data.storage)).to(device)


def collect(cfg: InspectConfig, plan: InspectPlan, env: DistEnv, out_dir: Path, sinks: list[MetricsSink]) -> Path:
    """This rank's statistics over its chunks, saved to the job folder; returns the file."""
    sae = load_sae(plan.sae_dir, env.device)
    contexts = plan.data.context_ids(plan.first_row, plan.data.n_rows) if plan.data.from_model else None
    chunks = chunk_bounds(plan, cfg.chunk_rows, contexts)
    shape = StatsShape(plan.d_sae, top_k=cfg.top_k)
    with torch.no_grad():  # the edges: from the first chunk, the same on every rank
        first = encode_active(sae, read_rows(plan, *chunks[0], env.device))
        edges = log_edges(float(first.values.max()) if len(first.values) else 1.0, shape.bins)
        stats = LatentStats(shape, edges, env.device)
        started, done = time.perf_counter(), 0
        for lo, hi in chunks[env.rank :: env.world_size]:
            ids = None
            if contexts is not None:
                ids = torch.from_numpy(contexts[lo - plan.first_row : hi - plan.first_row]).to(env.device)
            stats.update(encode_active(sae, read_rows(plan, lo, hi, env.device)), lo, ids)
            done += hi - lo
            if env.is_main:
                report_progress(sinks, min(done * env.world_size, plan.rows), plan.rows, started)
    out_dir.mkdir(parents=True, exist_ok=True)  # every rank writes its statistics here
    path = out_dir / f".inspect_rank{env.rank}.safetensors"
    save_file({k: v.cpu().contiguous() for k, v in stats.state().items()}, str(path))
    return path


def report_progress(sinks: list[MetricsSink], rows: int, total: int, started: float) -> None:
    rate = rows / max(time.perf_counter() - started, 1e-9)
    for sink in sinks:
        sink.write({"step": rows, "total_steps": total, "tokens": rows, "tokens_per_s": rate})
    print(f"rows {rows:,}/{total:,} | {rate:,.0f} rows/s", flush=True)


def merged(cfg: InspectConfig, plan: InspectPlan, paths: list[Path]) -> LatentStats:
    shape = StatsShape(plan.d_sae, top_k=cfg.top_k)
    stats = LatentStats.from_state(shape, load_file(str(paths[0])))
    for path in paths[1:]:
        stats.merge(LatentStats.from_state(shape, load_file(str(path))))
    return stats


def latent_arrays(stats: LatentStats, sae, plan: InspectPlan) -> dict[str, torch.Tensor]:
    """The per-latent arrays of latents.safetensors (latent first), rows of never-filled slots set to -1."""
    filled = stats.top_values > 0
    top_rows = torch.where(filled, stats.top_rows, torch.full_like(stats.top_rows, NO_ROW))
    fired = stats.fired.double()
    arrays = {
        "frequency": fired / max(stats.rows_seen, 1),
        "mean_activation": stats.total / fired.clamp_min(1),
        "max_activation": stats.maximum,
        "histogram": stats.histogram,
        "histogram_edges": stats.edges,
        "top_values": stats.top_values.T.contiguous(),
        "top_rows": top_rows.T.contiguous(),
        "top_window": stats.top_window.transpose(0, 1).contiguous(),
        "top_window_rows": stats.top_window_rows.transpose(0, 1).contiguous(),
        "band_rows": stats.band_rows,
        "band_values": stats.band_values,
    }
    W_dec = sae.W_dec.detach().cpu()
    arrays["nearest"], arrays["nearest_cosine"] = nearest_latents(W_dec)
    if plan.data.features is not None:
        arrays["true_feature"], arrays["true_cosine"] = best_true_features(W_dec, torch.from_numpy(plan.data.features))
    return arrays


def token_windows(arrays: dict, plan: InspectPlan, shape: StatsShape) -> None:
    """Each example's tokens around its peak (from contexts.safetensors) and, for the top examples, the
    latent's activation on each of them: `top_tokens`, `top_token_acts`, `band_tokens` [d_sae, n, window]."""
    first = plan.first_row
    contexts = plan.data.context_ids(first, plan.data.n_rows)
    positions = plan.data.row_index(POSITIONS_KEY, first, plan.data.n_rows)
    tokens = torch.from_numpy(extraction.read_contexts(plan.data.source).astype(np.int64))
    offsets = torch.arange(-shape.before, shape.after + 1)

    def window_of(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens [.., W] with -1 outside the context, each example's context, its peak position)."""
        valid = rows != NO_ROW
        local = (rows - first).clamp_min(0)
        ctx, pos = torch.from_numpy(contexts)[local], torch.from_numpy(positions)[local]
        at = pos[..., None] + offsets
        inside = valid[..., None] & (at >= 0) & (at < tokens.shape[1])
        ids = tokens[ctx[..., None].expand_as(at), at.clamp(0, tokens.shape[1] - 1)]
        return torch.where(inside, ids, torch.full_like(ids, -1)).to(torch.int32), ctx, pos

    top_tokens, _, peak = window_of(arrays["top_rows"])
    acts = torch.zeros(top_tokens.shape, dtype=torch.float32)
    window_rows = arrays["top_window_rows"]  # [d_sae, k, W] rows around the peak (same context)
    have = window_rows != NO_ROW
    row_pos = torch.from_numpy(positions)[(window_rows - first).clamp_min(0)]
    slot = row_pos - peak[..., None] + shape.before  # where each row's position falls in the token window
    fits = have & (slot >= 0) & (slot < shape.window)
    index = torch.nonzero(fits, as_tuple=True)
    acts[index[0], index[1], slot[fits]] = arrays["top_window"][fits]
    arrays["top_tokens"], arrays["top_token_acts"] = top_tokens, acts.half()
    arrays["band_tokens"] = window_of(arrays["band_rows"])[0]


def model_extras(arrays: dict, plan: InspectPlan, sae) -> dict[str, str]:
    """Logit effects through the model's unembedding (when it is as wide as the SAE's decoder output: its input,
    or a transcoder's module output, e.g. the residual an MLP block writes to), and the text of every token id
    used; returns {id: text}."""
    assert plan.model is not None
    model_dir = resolve_model(plan.model)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, "float32", torch.device("cpu"))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    W_dec = sae.W_dec.detach().cpu()  # [d_sae, d_out]: d_out = d_in but for a transcoder
    if head is not None and head.weight.shape[1] == W_dec.shape[1]:
        found = logit_effects(W_dec, head.weight.detach())
        for name, value in zip(("logit_top_ids", "logit_top", "logit_bottom_ids", "logit_bottom"), found, strict=True):
            arrays[name] = value
    used: set[int] = set()
    for name in ("top_tokens", "band_tokens", "logit_top_ids", "logit_bottom_ids"):
        if name in arrays:
            used.update(int(i) for i in torch.unique(arrays[name]).tolist() if i >= 0)
    return token_texts(tokenizer, sorted(used))


def write_inspection(plan: InspectPlan, arrays: dict, token_text: dict, summary: dict) -> Path:
    """inspect/ replaced atomically: written beside it, then swapped in by renames."""
    target = plan.sae_dir / INSPECT_DIR
    partial = plan.sae_dir / f".{INSPECT_DIR}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(partial / INSPECT_LATENTS_FILE))
    (partial / INSPECT_TOKENS_FILE).write_text(json.dumps(token_text))
    (partial / INSPECT_SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    old = plan.sae_dir / f".{INSPECT_DIR}.old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(partial, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def finish(cfg: InspectConfig, plan: InspectPlan, rank_files: list[Path], seconds: float) -> dict:
    """Rank 0: merge, add what the SAE and the model know, write inspect/; returns the summary."""
    stats = merged(cfg, plan, rank_files)
    sae = load_sae(plan.sae_dir, "cpu")
    arrays = latent_arrays(stats, sae, plan)
    shape = stats.shape
    has_text = plan.data.from_model and (plan.data.source / CONTEXTS_FILE).is_file()
    if has_text:
        token_windows(arrays, plan, shape)
    token_text = model_extras(arrays, plan, sae) if has_text and plan.model else {}
    summary = {
        "version": INSPECT_VERSION, "sae": str(plan.sae_dir), "activations": str(plan.data.source),
        "rows": stats.rows_seen, "first_row": plan.first_row, "held_out_rows": plan.held_out,
        "d_in": plan.d_in, "d_sae": plan.d_sae, "top_k": shape.top_k, "window_before": shape.before,
        "window_after": shape.after, "bands": shape.bands, "band_examples": shape.band_examples,
        "dense_frequency": DENSE_FREQUENCY, "model": plan.model, "hook": plan.hook, "transcoder": plan.transcoder, "has_text": has_text,
        "has_logits": "logit_top_ids" in arrays, "has_truth": "true_feature" in arrays,
        "dead_latents": int((stats.fired == 0).sum()), "seconds": seconds, "rows_per_s": stats.rows_seen / seconds,
        "written_at": time.time(),
    }  # fmt: skip
    write_inspection(plan, arrays, token_text, summary)
    return summary


def prepare(args: argparse.Namespace) -> tuple[DistEnv, tuple[InspectConfig, InspectPlan]]:
    cfg = InspectConfig.from_json_file(args.config)
    return read_dist_env(cfg), (cfg, plan_inspection(cfg))


def inspect_ranks(out_dir: Path, env: DistEnv, state, sinks: list[MetricsSink]) -> None:
    cfg, plan = state
    started = time.perf_counter()
    collect(cfg, plan, env, out_dir, sinks)
    if dist.is_initialized():
        dist.barrier()  # every rank's statistics are on disk
    if env.is_main:
        rank_files = [out_dir / f".inspect_rank{r}.safetensors" for r in range(env.world_size)]
        summary = finish(cfg, plan, rank_files, time.perf_counter() - started)
        for path in rank_files:
            path.unlink()
        (out_dir / INSPECT_DONE_FILE).write_text(json.dumps(summary, indent=2))
        report_done(sinks, {k: summary[k] for k in ("rows", "d_sae", "dead_latents")})
    if dist.is_initialized():
        dist.barrier()


@record
def main(argv: list[str] | None = None, extra_sinks: Callable[[], list[MetricsSink]] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    body = functools.partial(inspect_ranks, out_dir)
    return run_ranks(out_dir, BAD_INPUT, functools.partial(prepare, args), body, extra_sinks)


if __name__ == "__main__":
    sys.exit(main())
