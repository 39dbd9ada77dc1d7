"""The submission gate's check of a training streamed from a model (single or sweep; called from
train_checks.py): the model, every hook a member reads and the text, as an extraction's (source_checks.py),
and whether the text gives every row the run reads; what the memory estimate counts for the stream."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..config import TrainConfig
from ..data.stream_cache import cache_to_problems
from ..data.stream_plan import rows_needed
from ..gpu.memory import StreamSource
from ..model_source import stream_key
from ..sweep import Sweep
from .gate import Verdict, outside_roots
from .models import ModelFacts, TextQuery, loaded_dtype
from .source_checks import enough_rows, first_document, locations, model_and_hooks

FEWER_ROWS = "lower batch_size, total_steps or holdout_tokens, or give more text"


def hooks_of(cfg: TrainConfig | Sweep) -> list[str]:
    """The distinct hooks the members read, in member order (one forward feeds them all)."""
    configs = [m.config for m in cfg.members] if isinstance(cfg, Sweep) else [cfg]
    return list(dict.fromkeys(c.hook for c in configs if c.hook is not None))


def keys_of(cfg: TrainConfig | Sweep) -> list[str]:
    """The distinct stream keys the members read: each hook's output, and a transcoder's module input."""
    configs = [m.config for m in cfg.members] if isinstance(cfg, Sweep) else [cfg]
    return list(dict.fromkeys(key for c in configs for key in c.stream_keys))


def check_stream(
    cfg: TrainConfig,
    hooks: Sequence[str],
    verdict: Verdict,
    home: Path,
    count_rows: bool = True,
    keys: Sequence[str] | None = None,
) -> StreamSource | None:
    """Record the stream's problems in `verdict` (and the model's facts in `verdict.model`); what the memory
    estimate counts for it (the stream `keys` the members read, keys_of), or None when the model or a hook cannot
    be used. `count_rows` False leaves the rows uncounted (the Train page while a person types: counting runs the
    tokenizer over the text)."""
    assert cfg.model is not None and cfg.dataset is not None  # a streamed config names both
    if outside_roots(verdict, locations(cfg.model, cfg.dataset, home)):
        return None
    verdict.model, problems = model_and_hooks(cfg.model, hooks)
    text = first_document(cfg.dataset, cfg.text_field, cfg.split)
    stream_keys = list(keys) if keys is not None else [stream_key(hook) for hook in hooks]
    verdict.add(problems + text + kept_and_evaluated(cfg, stream_keys, verdict.model, home))
    if verdict.model is None or problems:
        return None
    if count_rows and not text:
        needed = rows_needed(cfg.batch_size, cfg.total_steps, cfg.holdout_tokens)
        asked = f"the run (batch_size {cfg.batch_size:,} x total_steps {cfg.total_steps:,} + holdout_tokens {cfg.holdout_tokens:,})"
        note, short = enough_rows(text_query(cfg), needed, asked, FEWER_ROWS)
        verdict.add(short)
        verdict.notes += [note] if note else []
    return stream_source(cfg, verdict.model, hooks, on_gpu=bool(verdict.gpus), keys=keys)


def kept_and_evaluated(cfg: TrainConfig, keys: Sequence[str], facts: ModelFacts | None, home: Path) -> list:
    """Where the stream is kept (`cache_to`: inside the data roots, not holding a kept stream yet), and whether the
    model can evaluate the SAEs after training (`evaluate_contexts`: a causal language model)."""
    problems = [("cache_to", m) for m in cache_to_problems(cfg.cache_to, list(keys), home)] if cfg.cache_to else []
    if cfg.evaluate_contexts and facts is not None and not facts.causal_lm:
        message = "evaluate_contexts: the model is not a causal language model (CE loss needs one); set it to 0"
        problems.append(("evaluate_contexts", message))
    return problems


def text_query(cfg: TrainConfig) -> TextQuery:
    assert cfg.model is not None and cfg.dataset is not None
    return TextQuery(
        cfg.model,
        cfg.dataset,
        cfg.text_field,
        cfg.split,
        cfg.context_size,
        cfg.prepend_bos,
        cfg.exclude_special_tokens,
    )


def stream_source(
    cfg: TrainConfig, facts: ModelFacts, hooks: Sequence[str], on_gpu: bool, keys: Sequence[str] | None = None
) -> StreamSource:
    """What a rank holds for the stream: the model in the dtype the job loads it in, a forward of
    model_batch_size contexts, and a mixing window per distinct stream key: each hook's output and, for a
    transcoder, its module's input (`keys`, keys_of: what the members read; by default each hook's output, and its
    input when `cfg` is a transcoder)."""
    if keys is None:
        keys = [stream_key(h, side) for h in hooks for side in (("in", "out") if cfg.transcoder else ("out",))]
    # `hooks MODEL` lists each module's output width only: a module's input counts at its output's width (an
    # MLP block, a transcoder's usual module, reads and writes the residual).
    widths = tuple(facts.hooks[key.partition(":")[2]] for key in dict.fromkeys(keys))
    return StreamSource(
        parameters=facts.parameters,
        model_dtype=loaded_dtype(facts, cfg.model_dtype, on_gpu),
        hidden_size=facts.hidden_size,
        heads=facts.heads,
        model_batch_size=cfg.model_batch_size,
        context_size=cfg.context_size,
        mixing_contexts=cfg.mixing_contexts,
        hook_widths=widths,
        kept=cfg.cache_to is not None,
    )


def stream_d_in(facts: ModelFacts, hooks: Sequence[str]) -> int:
    """The width the SAEs' memory is estimated at: the hook's, or for a sweep over hooks the widest."""
    return max(facts.hooks[h] for h in hooks)
