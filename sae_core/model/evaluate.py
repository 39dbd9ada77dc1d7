"""The model evaluation entry's body: plan, load the SAE and the model, splice, reduce, write the figures.

`sae_core.evaluate` (what `python -m sae_core.evaluate` and torchrun run) calls `main` here. Everything the
user can get wrong is checked before the model runs: the SAE folder, where the model, hook and contexts
come from (data/heldout.py), the model being a causal LM and the hook's width being the SAE's d_in. A
problem ends the run with exit code 2 and its reason in error.txt. Each rank takes every world-th context;
rank 0 writes `model_eval.json` into the job folder (the figures and the context ids) and adds the figures
to the SAE's eval.json (replaced atomically).

Several SAEs of one model and hook (`saes`, or a sweep's folder as `sae`) are evaluated in one pass over the
same contexts: each batch runs the clean and the two ablated forwards once, then one forward per SAE spliced
in; each SAE's eval.json gains exactly the figures a single evaluation of it would give.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.numpy import load_file as load_numpy
from torch.distributed.elastic.multiprocessing.errors import record

from ..config import ConfigError, EvaluateConfig
from ..data.formats import DatasetError
from ..data.heldout import EvalPlan, plan_evaluation
from ..data.text import Specials, TextError, iter_pieces, kept_positions, pack_contexts
from ..engine.distributed import DistEnv, read_dist_env
from ..engine.run import run_ranks
from ..engine.saelens import load as load_sae
from ..engine.sinks import MetricsSink, report_done
from ..files import CFG_FILE, EVAL_FILE, MODEL_EVAL_FILE
from ..outputs import read_json
from .hooks import HookReader, find_module, list_hooks
from .loading import ModelError, load_model, load_tokenizer, meta_model, resolve_model
from .splice import Splicer, SpliceTotals, input_mean, require_causal_lm, splice_batch

BAD_INPUT = (ConfigError, DatasetError, ModelError, TextError)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sae_core.evaluate",
        description="Evaluate an SAE spliced into its model: CE loss and KL recovered (one process, or under torchrun).",
    )
    parser.add_argument("--config", required=True, help="EvaluateConfig JSON file")
    parser.add_argument("--out", required=True, help="folder for model_eval.json (and error.txt)")
    return parser.parse_args(argv)


class Target:
    """The plan with what needs the model folder: its tokenizer, the hook's width checked, the contexts."""

    def __init__(self, cfg: EvaluateConfig):
        self.plan: EvalPlan = plan_evaluation(cfg)
        self.model_dir = resolve_model(self.plan.model)
        hook = self.plan.hook
        skeleton = meta_model(self.model_dir)  # no weights: the checks cost no memory
        require_causal_lm(skeleton)
        find_module(skeleton, hook)  # an unknown hook is named with the close ones
        widths = {h.path: h.width for h in list_hooks(self.model_dir)}
        if hook not in widths:
            raise ModelError(f"hook: {hook!r} is not a module of this model with a [batch, tokens, width] output")
        # What the hook's output must match: the SAE's input, or a transcoder's output (it reads the module's input)
        self.d_out = int(read_json(self.plan.sae_dir / CFG_FILE).get("d_out") or self.plan.d_in)
        if widths[hook] != self.d_out:
            field = "d_out" if self.d_out != self.plan.d_in else "d_in"
            raise ConfigError(f"hook: {hook} outputs width {widths[hook]} but the SAE's {field} is {self.d_out}")
        self.tokens, self.mask = self._contexts(cfg)

    def _contexts(self, cfg: EvaluateConfig) -> tuple[np.ndarray, np.ndarray]:
        """Token ids [n, context_size] and the positions to replace, from the held-out contexts or the text."""
        plan = self.plan
        if plan.contexts_file is not None:
            assert plan.context_ids is not None
            tokens = load_numpy(str(plan.contexts_file))["tokens"][plan.context_ids]
            specials = Specials(None, None, plan.special_token_ids, False)
            return tokens, kept_positions(tokens, specials, plan.exclude_special_tokens)
        assert cfg.dataset is not None
        tokenizer = load_tokenizer(self.model_dir)
        specials = Specials.of(tokenizer)
        pieces = iter_pieces(cfg.dataset, cfg.text_field, cfg.split)
        count = 0

        def enough(contexts) -> bool:
            nonlocal count
            count += len(contexts)
            return count >= cfg.contexts

        tokens, _ = pack_contexts(tokenizer, pieces, cfg.context_size, specials.adds_start, enough, specials)
        if not len(tokens):
            raise TextError(f"dataset: it holds fewer than {cfg.context_size} tokens, not one whole context")
        tokens = tokens[: cfg.contexts]
        return tokens, kept_positions(tokens, specials, True)

    def summary(self) -> dict:
        ids = self.plan.context_ids
        return {
            "eval_model": self.plan.model,
            "eval_hook": self.plan.hook,
            "eval_contexts": len(self.tokens),
            "eval_context_size": int(self.tokens.shape[1]),
            "eval_source": str(self.plan.activation_dir or self.plan.contexts_file or "dataset"),
            "eval_context_ids": ids.tolist() if ids is not None else None,
        }


def run(cfg: EvaluateConfig, target: Target, env: DistEnv, sinks: list[MetricsSink]) -> list[dict]:
    """This rank's share of the contexts through the clean and ablated runs, and each SAE spliced in; the
    figures of all ranks together, one dict per SAE (target.plan.sae_dirs' order)."""
    saes = [load_sae(folder, env.device) for folder in target.plan.sae_dirs]
    model = load_model(target.model_dir, cfg.model_dtype, env.device)
    totals = splice_totals(model, saes, target.plan.hook, target.tokens, target.mask, cfg.batch_size, env, sinks)
    summary = target.summary()
    return [{**sums.figures(), **summary} for sums in totals]


def splice_totals(
    model: torch.nn.Module,
    saes: list,
    hook: str,
    tokens_all: np.ndarray,
    mask_all: np.ndarray,
    batch_size: int,
    env: DistEnv,
    sinks: list[MetricsSink],
) -> list[SpliceTotals]:
    """Every rank's share of the contexts (`tokens_all` [n, context_size], positions to splice `mask_all`) through
    the clean and ablated runs and each SAE spliced in at `hook`; the totals of all ranks together, one per SAE.
    The model evaluation job and a streamed training's own evaluation (`evaluate_contexts`) both run this."""
    mine = np.arange(env.rank, len(tokens_all), env.world_size)

    def batches():
        for start in range(0, len(mine), batch_size):
            chosen = mine[start : start + batch_size]
            tokens = torch.from_numpy(tokens_all[chosen].astype(np.int64)).to(env.device)
            yield tokens, torch.from_numpy(mask_all[chosen]).to(env.device)

    reader = HookReader(model, hook)
    mean = input_mean(reader, batches, saes[0].d_out, env.device)
    reader.close()
    splicer = Splicer(model, hook)
    totals = [SpliceTotals(sae.d_out, sae.d_sae, env.device) for sae in saes]
    started, done = time.perf_counter(), 0
    for tokens, mask in batches():
        splice_batch(splicer, saes, tokens, mask, mean, totals)
        done += len(tokens)
        if env.is_main:
            report_progress(sinks, done * env.world_size, len(tokens_all), tokens.shape[1], started)
    splicer.close()
    for sums in totals:
        sums.reduce()
    return totals


def report_progress(sinks: list[MetricsSink], contexts: int, total: int, context_size: int, started: float) -> None:
    contexts = min(contexts, total)
    seconds = max(time.perf_counter() - started, 1e-9)
    tokens = contexts * context_size
    record_ = {"step": contexts, "total_steps": total, "tokens": tokens, "tokens_per_s": tokens / seconds}
    for sink in sinks:
        sink.write(record_)
    print(f"contexts {contexts:,}/{total:,} | {record_['tokens_per_s']:,.0f} tok/s", flush=True)


def write_figures(out_dir: Path, sae_dirs: Sequence[Path], figures: Sequence[dict]) -> dict:
    """model_eval.json in the job folder; each SAE's figures (not the context ids) added to its own eval.json,
    exactly as a single evaluation adds them. One SAE: model_eval.json holds its figures; several: the shared
    summary, and `saes` lists each one's folder and figures. Returns what model_eval.json holds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    merge_figures(sae_dirs, figures)
    if len(figures) == 1:
        result = figures[0]
    else:
        shared = {k: v for k, v in figures[0].items() if k in SHARED_FIGURES or k in SUMMARY}
        result = {**shared, "saes": [{"sae": str(d), **_own(f)} for d, f in zip(sae_dirs, figures, strict=True)]}
    _replace_json(out_dir / MODEL_EVAL_FILE, result)
    return result


def merge_figures(sae_dirs: Sequence[Path], figures: Sequence[dict]) -> None:
    """Each SAE's figures (not the context ids) added to its eval.json, replaced atomically."""
    for sae_dir, own in zip(sae_dirs, figures, strict=True):
        merged = {**read_json(sae_dir / EVAL_FILE), **{k: v for k, v in own.items() if k != "eval_context_ids"}}
        _replace_json(sae_dir / EVAL_FILE, merged)


# What every SAE of one pass shares: the clean and ablated runs, and what the contexts were.
SHARED_FIGURES = ("ce_clean", "ce_zero_ablation", "ce_mean_ablation", "kl_zero_ablation", "kl_mean_ablation")
SUMMARY = (
    "eval_model",
    "eval_hook",
    "eval_contexts",
    "eval_context_size",
    "eval_source",
    "eval_context_ids",
    "eval_tokens",
)


def _own(figures: dict) -> dict:
    return {k: v for k, v in figures.items() if k not in SHARED_FIGURES and k not in SUMMARY}


def _replace_json(path: Path, value: dict) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=2))
    os.replace(partial, path)


def prepare(args: argparse.Namespace) -> tuple[DistEnv, tuple[EvaluateConfig, Target]]:
    cfg = EvaluateConfig.from_json_file(args.config)
    return read_dist_env(cfg), (cfg, Target(cfg))


def evaluate_ranks(out_dir: Path, env: DistEnv, state, sinks: list[MetricsSink]) -> None:
    cfg, target = state
    figures = run(cfg, target, env, sinks)
    if env.is_main:
        result = write_figures(out_dir, target.plan.sae_dirs, figures)
        report_done(sinks, {k: v for k, v in result.items() if k not in ("eval_context_ids", "saes")})
    if dist.is_initialized():
        dist.barrier()


@record
def main(argv: list[str] | None = None, extra_sinks: Callable[[], list[MetricsSink]] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    body = functools.partial(evaluate_ranks, out_dir)
    return run_ranks(out_dir, BAD_INPUT, functools.partial(prepare, args), body, extra_sinks)


if __name__ == "__main__":
    sys.exit(main())
