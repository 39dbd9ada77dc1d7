"""The extraction entry's body: check the model, hook and text; pack the contexts; compute the shards; index them.

`sae_core.extract` (what `python -m sae_core.extract` and torchrun run) calls `main` here. Everything the
user can get wrong is checked before anything is written: the model and its hook, the text and whether it
holds `n_tokens` rows, the disk space. A problem ends the run with exit code 2 and its reason in error.txt
(the only file written). A folder that already holds this extraction, complete or partly, is continued:
its contexts are reused and only missing shards are computed.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from ..config import ConfigError, ExtractConfig
from ..data.formats import DatasetError
from ..data.manifest import read_manifest, write_manifest
from ..data.text import Specials, TextError, iter_pieces, kept_positions, pack_contexts
from ..engine.distributed import DistEnv, init_process_group, read_dist_env
from ..engine.run import report_bad_input
from ..engine.sinks import JsonlSink, MetricsSink, report_done
from ..files import CONTEXTS_FILE, EXTRACT_CONFIG_FILE, METRICS_FILE
from ..text import format_bytes
from . import extraction
from .hooks import HookReader, find_module, list_hooks
from .loading import ModelError, load_model, load_tokenizer, meta_model, resolve_model

BAD_INPUT = (ConfigError, DatasetError, ModelError, TextError)
_INDEX_BYTES = 4 + 8 + 4  # token_ids int32, context_ids int64, positions int32 per row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sae_core.extract", description="Extract activations (one process, or each rank under torchrun)."
    )
    parser.add_argument("--config", required=True, help="ExtractConfig JSON file")
    parser.add_argument("--out", required=True, help="output folder (continued if it holds this extraction)")
    return parser.parse_args(argv)


class Source:
    """The model folder, its tokenizer and the hook's width, checked without loading any weights."""

    def __init__(self, cfg: ExtractConfig):
        self.model_dir = resolve_model(cfg.model)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.specials = Specials.of(self.tokenizer)
        find_module(meta_model(self.model_dir), cfg.hook)
        widths = {h.path: h.width for h in list_hooks(self.model_dir)}
        if cfg.hook not in widths:
            raise ModelError(f"hook: {cfg.hook!r} does not output a [batch, tokens, width] tensor")
        self.d_in = widths[cfg.hook]
        self.prepend_bos = self.specials.adds_start if cfg.prepend_bos is None else cfg.prepend_bos

    def provenance(self, cfg: ExtractConfig) -> dict:
        return {
            "model": cfg.model,
            "hook": cfg.hook,
            "context_size": cfg.context_size,
            "tokenizer": str(self.model_dir),
            "bos_token_id": self.specials.start_id,
            "special_token_ids": list(self.specials.special_ids),
            "dataset": cfg.dataset,
            "text_field": cfg.text_field,
        }


def pack(cfg: ExtractConfig, source: Source):
    """The contexts that give n_tokens rows, or TextError saying how many rows the text holds."""
    rows = 0

    def enough(contexts) -> bool:
        nonlocal rows
        rows += int(kept_positions(contexts, source.specials, cfg.exclude_special_tokens).sum())
        return rows >= cfg.n_tokens

    pieces = iter_pieces(cfg.dataset, cfg.text_field, cfg.split)
    tokens, _ = pack_contexts(source.tokenizer, pieces, cfg.context_size, source.prepend_bos, enough, source.specials)
    if rows < cfg.n_tokens:
        what = (
            "is empty" if rows == 0 else f"gives only {rows:,} rows in {len(tokens):,} contexts of {cfg.context_size}"
        )
        raise TextError(f"n_tokens: {cfg.n_tokens:,} asked for, but the dataset {what}")
    # The packer cuts whole tokenizer batches: keep only the contexts the rows come from.
    kept = kept_positions(tokens, source.specials, cfg.exclude_special_tokens)
    return tokens[: extraction.contexts_needed(kept, cfg.n_tokens)]


def check_disk(cfg: ExtractConfig, d_in: int, n_contexts: int, out_dir: Path) -> None:
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[cfg.storage_dtype]
    need = cfg.n_tokens * (d_in * itemsize + _INDEX_BYTES) + n_contexts * cfg.context_size * 4
    existing = out_dir if out_dir.exists() else out_dir.parent
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if need > free:
        raise DatasetError(
            f"n_tokens: the activations need about {format_bytes(need)} but {existing} has {format_bytes(free)} free"
        )


def holds_this_extraction(out_dir: Path, cfg: ExtractConfig) -> bool:
    """Whether `out_dir` holds (part of) this very extraction; ConfigError if it holds another's files."""
    kept_config = out_dir / EXTRACT_CONFIG_FILE
    if kept_config.is_file():
        if kept_config.read_text() != extraction.config_fingerprint(cfg):
            raise ConfigError(f"--out: {out_dir} holds an extraction with another config; choose a new folder")
        return True
    if read_manifest(out_dir) is not None or any(out_dir.glob("shard_*")):
        raise ConfigError(f"--out: {out_dir} already holds activations; choose a new folder")
    return False


def prepare(cfg: ExtractConfig, source: Source, out_dir: Path) -> None:
    """Rank 0, before anything is written: the contexts and the disk; then the config and contexts files.
    A resumed run keeps the contexts it wrote."""
    if holds_this_extraction(out_dir, cfg) and (out_dir / CONTEXTS_FILE).is_file():
        return
    tokens = pack(cfg, source)
    check_disk(cfg, source.d_in, len(tokens), out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EXTRACT_CONFIG_FILE).write_text(extraction.config_fingerprint(cfg))
    extraction.write_contexts(out_dir, tokens)


def progress_sink(out_dir: Path, cfg: ExtractConfig, env: DistEnv, sinks: list[MetricsSink]):
    """Rank 0's progress records: rows done (its own times the ranks: they share the shards evenly), rate,
    disk used. Written per shard."""

    def report(rows_done: int, seconds: float) -> None:
        rows = min(rows_done * env.world_size, cfg.n_tokens)
        disk = sum(p.stat().st_size for p in out_dir.glob("shard_*.safetensors"))
        record_ = {
            "step": rows,
            "tokens": rows,
            "total_steps": cfg.n_tokens,
            "tokens_per_s": rows_done * env.world_size / max(seconds, 1e-9),
            "disk_bytes": disk,
        }
        for sink in sinks:
            sink.write(record_)
        print(
            f"rows {rows:,}/{cfg.n_tokens:,} | {record_['tokens_per_s']:,.0f} tok/s | disk {format_bytes(disk)}",
            flush=True,
        )

    return report


def extract(cfg: ExtractConfig, source: Source, env: DistEnv, out_dir: Path, sinks: list[MetricsSink]) -> dict:
    tokens = extraction.read_contexts(out_dir)
    kept = kept_positions(tokens, source.specials, cfg.exclude_special_tokens)
    plan = extraction.make_plan(kept, cfg)
    tokens = tokens[: plan.n_contexts]
    mask = extraction.row_mask(kept[: plan.n_contexts], plan.context_rows)
    model = load_model(source.model_dir, cfg.model_dtype, env.device)
    reader = HookReader(model, cfg.hook)
    extractor = extraction.Extractor(reader, tokens, mask, cfg, env.device)
    report = progress_sink(out_dir, cfg, env, sinks) if env.is_main else None
    extraction.run_shards(extractor, plan, out_dir, env.rank, env.world_size, report)
    reader.close()
    if dist.is_initialized():
        dist.barrier()
    summary = {"rows": cfg.n_tokens, "n_contexts": plan.n_contexts, "shards": len(plan.shards), "d_in": source.d_in}
    if env.is_main:
        write_manifest(out_dir, extraction.manifest_for(plan, cfg, source.d_in, source.provenance(cfg)))
        report_done(sinks, summary)
    return summary


@record
def main(argv: list[str] | None = None, extra_sinks: Callable[[], list[MetricsSink]] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    try:
        cfg = ExtractConfig.from_json_file(args.config)
        env = read_dist_env(cfg)
        source = Source(cfg)
        if holds_this_extraction(out_dir, cfg) and read_manifest(out_dir) is not None:
            print(f"done: {out_dir} already holds this extraction", flush=True)
            return 0
        if env.is_main:
            prepare(cfg, source, out_dir)
    except BAD_INPUT as exc:
        return report_bad_input(out_dir, exc)
    init_process_group(env)
    try:
        sinks: list[MetricsSink] = []
        if env.is_main:
            sinks = [JsonlSink(out_dir / METRICS_FILE), *(extra_sinks() if extra_sinks else [])]
        if dist.is_initialized():
            dist.barrier()  # rank 0 has written the contexts
        extract(cfg, source, env, out_dir, sinks)
        gc.collect()
    except BAD_INPUT as exc:
        return report_bad_input(out_dir, exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
