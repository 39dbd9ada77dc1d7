"""Training straight from a model: the model runs on each window of contexts as training reads it, one forward
pass for every hook any member reads, and the window's rows are shuffled together into global batches.

Where the rows come from is `data/stream_plan.py` (a pure function of the text, the config and the seed). Each
rank runs the model on its contiguous share of a window's contexts; the shares are gathered, so every rank holds
the whole window in context order, shuffles it with the window's permutation and takes its slice of each global
batch: the batches never depend on the number of ranks. The feed's state is one number, the stream position (rows
consumed): a resume recomputes the window it falls in, so nothing but that number is checkpointed. The held-out
contexts are run once up front; the end-of-run evaluation reads their rows (`HoldoutRows`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.numpy import save_file as save_numpy

from ..data.stream_plan import StreamPlan, plan_stream, rows_needed, window_of
from ..data.text import Specials, TextError, iter_pieces, kept_positions, pack_contexts
from ..files import HELDOUT_CONTEXTS_FILE
from .hooks import find_module, first_tensor, list_hooks
from .loading import ModelError, load_model, load_tokenizer, resolve_model
from .splice import require_causal_lm
from .stream_cache import StreamCache


class _Reached(Exception):
    """Raised once the deepest hook has run: nothing after it is computed."""


class HooksReader:
    """Runs a model up to the deepest of several modules and returns what each stream key names: `out:<path>` a
    module's output, `in:<path>` its input (a transcoder reads a module's input and predicts its output), each
    [batch, tokens, width]."""

    def __init__(self, model: torch.nn.Module, keys: list[str]):
        self.model, self.keys = model, list(keys)
        self._found: dict[str, torch.Tensor] = {}
        paths = dict.fromkeys(key.partition(":")[2] for key in keys)
        self._handles = [find_module(model, path).register_forward_hook(self._capture(path)) for path in paths]

    def _capture(self, path: str):
        def hook(_module, inputs, output):
            for side, value in (("in", inputs), ("out", output)):
                key = f"{side}:{path}"
                if key in self.keys:
                    tensor = first_tensor(value)
                    if tensor is None:
                        raise ModelError(f"hook: {path}'s {side}put is a {type(value).__name__}, not a tensor")
                    self._found[key] = tensor
            if len(self._found) == len(self.keys):
                raise _Reached

        return hook

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        self._found = {}
        with contextlib.suppress(_Reached):
            self.model(input_ids=input_ids)
        missing = [key for key in self.keys if key not in self._found]
        if missing:
            raise ModelError(f"hook: {', '.join(missing)} not run by the model's forward pass")
        found, self._found = self._found, {}
        return found

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class StreamSource:
    """The model, its contexts and the plan of a streamed training: every rank builds the same."""

    reader: HooksReader
    tokens: np.ndarray  # int32 [n_contexts, context_size]
    kept: np.ndarray  # bool [n_contexts, context_size]: the rows each context gives
    plan: StreamPlan
    widths: dict[str, int]  # the width of each stream key's rows
    model_batch_size: int
    device: torch.device
    model_dir: Path | None = None
    specials: Specials | None = None

    def rows(self, contexts: np.ndarray) -> dict[str, torch.Tensor]:
        """The kept rows of `contexts` for every stream key, in context order, float32 on the device."""
        pieces: dict[str, list[torch.Tensor]] = {key: [] for key in self.widths}
        for start in range(0, len(contexts), self.model_batch_size):
            batch = contexts[start : start + self.model_batch_size]
            ids = torch.from_numpy(self.tokens[batch].astype(np.int64)).to(self.device)
            mask = torch.from_numpy(self.kept[batch]).to(self.device)
            for key, hidden in self.reader(ids).items():
                pieces[key].append(hidden[mask].float())
        return {
            key: torch.cat(found) if found else torch.zeros(0, self.widths[key], device=self.device)
            for key, found in pieces.items()
        }


def open_source(cfg, keys: list[str], device: torch.device) -> StreamSource:
    """Check and load what `cfg` (a streamed TrainConfig) names, pack its text and plan the stream of `keys`
    (`out:<hook>`, `in:<hook>`). ModelError or TextError name what is wrong (before anything is trained)."""
    model_dir = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    specials = Specials.of(tokenizer)
    widths_found = {h.path: h.width for h in list_hooks(model_dir)}
    for hook in dict.fromkeys(key.partition(":")[2] for key in keys):
        if hook not in widths_found:
            raise ModelError(f"hook: {hook!r} does not output a [batch, tokens, width] tensor")
    prepend_bos = specials.adds_start if cfg.prepend_bos is None else cfg.prepend_bos
    needed = rows_needed(cfg.batch_size, cfg.total_steps, cfg.holdout_tokens) + cfg.context_size
    found = 0

    def enough(contexts) -> bool:
        nonlocal found
        found += int(kept_positions(contexts, specials, cfg.exclude_special_tokens).sum())
        return found >= needed

    pieces = iter_pieces(cfg.dataset, cfg.text_field, cfg.split)
    tokens, _ = pack_contexts(tokenizer, pieces, cfg.context_size, prepend_bos, enough, specials)
    if found < needed:
        raise TextError(
            f"dataset: the run reads {needed:,} rows (batch_size x total_steps + holdout_tokens, and a context to "
            f"spare), but the text gives only {found:,} at context_size {cfg.context_size}; give more text or lower "
            "total_steps"
        )
    kept = kept_positions(tokens, specials, cfg.exclude_special_tokens)
    plan = plan_stream(kept, cfg.holdout_tokens, cfg.mixing_contexts, cfg.seed)
    model = load_model(model_dir, cfg.model_dtype, device)
    reader = HooksReader(model, keys)
    probe = reader(torch.from_numpy(tokens[:1].astype(np.int64)).to(device))  # an input's width is seen, not listed
    widths = {key: int(probe[key].shape[-1]) for key in keys}
    return StreamSource(reader, tokens, kept, plan, widths, cfg.model_batch_size, device, model_dir, specials)


def gather_rows(mine: dict[str, torch.Tensor], ranks: int) -> dict[str, torch.Tensor]:
    """Every rank's rows, in rank order (each rank computed a contiguous share of the contexts)."""
    if ranks == 1 or not dist.is_initialized():
        return mine
    out = {}
    for key, rows in mine.items():
        counts = [torch.zeros(1, dtype=torch.int64, device=rows.device) for _ in range(ranks)]
        dist.all_gather(counts, torch.tensor([len(rows)], dtype=torch.int64, device=rows.device))
        longest = int(max(int(c) for c in counts))
        padded = torch.zeros(longest, rows.shape[1], dtype=rows.dtype, device=rows.device)
        padded[: len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in range(ranks)]
        dist.all_gather(parts, padded)
        out[key] = torch.cat([part[: int(count)] for part, count in zip(parts, counts, strict=True)])
    return out


class StreamFeed:
    """This rank's slice of each global batch from the stream, as `{stream_key(hook): rows}`: the trainer's
    reader when training from a model. `ranks` share each batch (1: this rank reads whole batches)."""

    def __init__(self, source: StreamSource, batch_size: int, rank: int, ranks: int, position: int = 0, cache=None):
        self.source, self.batch_size, self.rank, self.ranks = source, batch_size, rank, ranks
        self.position = position
        self.cache: StreamCache | None = cache  # cache_to: each window also goes there as training reads it
        self.starts = source.plan.window_starts()
        self._windows: dict[int, dict[str, torch.Tensor]] = {}
        self.wait_seconds = 0.0  # time spent running the model (the trainer's data_wait)

    def window(self, index: int) -> dict[str, torch.Tensor]:
        """Window `index`'s rows at every hook, shuffled (computed once; earlier windows are dropped)."""
        if index not in self._windows:
            started = time.perf_counter()
            contexts = self.source.plan.windows[index]
            share = np.array_split(contexts, self.ranks)[self.rank]
            rows = gather_rows(self.source.rows(share), self.ranks)
            order = torch.from_numpy(self.source.plan.permutation(index)).to(self.source.device)
            self._windows = {w: rows for w, rows in self._windows.items() if w > index - 1}
            self._windows[index] = {key: key_rows[order] for key, key_rows in rows.items()}
            if self.cache is not None:
                self.cache.put_window(index, self._windows[index])
            self.wait_seconds += time.perf_counter() - started
        return self._windows[index]

    def global_rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows [start, stop) of the stream (they may span windows)."""
        if stop > self.starts[-1]:
            raise TextError(f"the stream holds {int(self.starts[-1]):,} rows; row {stop:,} was asked for")
        pieces = []
        while start < stop:
            index = window_of(self.starts, start)
            end = min(stop, int(self.starts[index + 1]))
            offset = int(self.starts[index])
            pieces.append({key: rows[start - offset : end - offset] for key, rows in self.window(index).items()})
            start = end
        return {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0]}

    def next(self) -> dict[str, torch.Tensor]:
        # The whole global batch first: every rank computes the same windows at the same time (they gather).
        whole = self.global_rows(self.position, self.position + self.batch_size)
        self.position += self.batch_size
        share = self.batch_size // self.ranks
        return {key: rows[self.rank * share : (self.rank + 1) * share] for key, rows in whole.items()}

    def first_batch(self) -> dict[str, torch.Tensor]:
        """The whole first global batch (every member initialises from it)."""
        return self.global_rows(0, self.batch_size)

    def state_dict(self) -> dict:
        return {"stream_position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["stream_position"])

    def close(self) -> None:
        self._windows.clear()


class HoldoutRows:
    """The held-out contexts' rows at one hook (the last holdout_tokens of them, so the first context may be cut,
    as in the tail holdout of an extracted set: a kept stream holds the very same rows last), as the evaluation
    reads data."""

    from_model = True
    features = None

    def __init__(self, rows: torch.Tensor, holdout_tokens: int):
        self.rows = rows[len(rows) - holdout_tokens :].cpu().numpy()
        self.d_in = self.rows.shape[1]

    def read(self, index) -> np.ndarray:
        return self.rows[index]


class StreamOrder:
    """What the trainer asks of its data order, for a stream: the holdout's rows and the feed's position."""

    holdout_kind = "contexts"

    def __init__(self, feed: StreamFeed, holdout_rows: int):
        self.feed, self.n_holdout = feed, holdout_rows

    def holdout_rows(self) -> np.ndarray:
        return np.arange(self.n_holdout)

    def load_state_dict(self, state: dict) -> None:
        self.feed.load_state_dict(state)


@dataclass
class Stream:
    """A streamed training's feed, its order and the held-out rows of each hook; with the model still loaded after
    training, it evaluates the SAEs spliced in (`evaluate`), and it keeps the stream when asked (`cache`)."""

    feed: StreamFeed
    order: StreamOrder
    holdout: dict[str, HoldoutRows]
    cache: StreamCache | None = None
    model_name: str | None = None

    def held_out_contexts(self) -> np.ndarray:
        """The held-out contexts whose every row the end-of-run evaluation reads (the first may be cut), in order."""
        source = self.feed.source
        held = source.plan.holdout
        rows = source.plan.context_rows[held]
        first_row = np.cumsum(rows) - rows  # where each context's rows start among the held-out rows
        return held[first_row >= int(rows.sum()) - self.order.n_holdout]

    def write_heldout(self, sae_dirs: list[Path]) -> None:
        """Beside each SAE: its held-out contexts' tokens, so that `evaluate SAE_DIR` runs them later."""
        source = self.feed.source
        ids = self.held_out_contexts()
        specials = source.specials.special_ids if source.specials is not None else ()
        tensors: dict[str, np.ndarray] = {
            "tokens": np.ascontiguousarray(source.tokens[ids], dtype=np.int32),
            "context_ids": ids.astype(np.int64),
            "special_token_ids": np.array(sorted(specials), dtype=np.int64),
        }
        for folder in sae_dirs:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / HELDOUT_CONTEXTS_FILE
            partial = path.with_name(f".{path.name}.partial")
            save_numpy(tensors, str(partial))
            os.replace(partial, path)

    def finish(self) -> None:
        """After training, every rank: the kept stream completed (manifest last); the model's hooks removed."""
        if self.cache is not None:
            self.cache.finish(self.feed)  # a resumed run computes the windows it skipped: the hooks are needed
        self.feed.source.reader.close()

    def evaluate(self, saes: list[tuple[Path, str]], contexts: int, env) -> None:
        """Every rank: each SAE (folder, hook) spliced into the loaded model at its hook on the first `contexts`
        held-out contexts; the writing rank merges the figures into each eval.json, as a separate evaluation
        (`python -m sae_core evaluate SAE_DIR`, which reads the same contexts back) merges them."""
        from ..config import EvaluateConfig
        from ..engine.saelens import load as load_sae
        from .evaluate import merge_figures, splice_totals

        self.feed.source.reader.close()  # its hooks would stop the forward at the deepest hook
        source = self.feed.source
        ids = self.held_out_contexts()[:contexts]
        tokens, mask = source.tokens[ids], source.kept[ids]
        batch = EvaluateConfig.model_fields["batch_size"].default  # a separate evaluation's: the same sums
        for hook in dict.fromkeys(hook for _, hook in saes):
            folders = [folder for folder, at in saes if at == hook]
            loaded = [load_sae(folder, env.device) for folder in folders]
            totals = splice_totals(source.reader.model, loaded, hook, tokens, mask, batch, env, [])
            if env.is_main:
                figures = [
                    {
                        **sums.figures(),
                        "eval_model": self.model_name,
                        "eval_hook": hook,
                        "eval_contexts": len(tokens),
                        "eval_context_size": int(tokens.shape[1]),
                        "eval_source": str(folder / HELDOUT_CONTEXTS_FILE),
                    }
                    for folder, sums in zip(folders, totals, strict=True)
                ]
                merge_figures(folders, figures)


def open_stream(cfg, keys: list[str], device: torch.device, rank: int, ranks: int) -> Stream:
    """The stream of `keys` (each member's stream_key, and its target's for a transcoder) for a streamed config;
    with cache_to, the writing rank (global rank 0) also keeps it."""
    source = open_source(cfg, keys, device)
    if cfg.evaluate_contexts:  # before training, not after it
        require_causal_lm(source.reader.model)
    held = source.rows(source.plan.holdout)  # every rank: whoever writes a member evaluates it
    n_holdout = min(cfg.holdout_tokens, source.plan.holdout_rows)
    holdout = {key: HoldoutRows(rows, n_holdout) for key, rows in held.items()}
    cache = None
    if cfg.cache_to is not None:
        writes = not dist.is_initialized() or dist.get_rank() == 0
        cache = StreamCache(cfg, source, cache_provenance(cfg, source), writes)
        cache.write_holdout(held)
    feed = StreamFeed(source, cfg.batch_size, rank, ranks, cache=cache)
    return Stream(feed, StreamOrder(feed, n_holdout), holdout, cache, cfg.model)


def cache_provenance(cfg, source: StreamSource) -> dict:
    """What an extraction's manifest says of where its rows came from, for a kept stream."""
    specials = source.specials
    return {
        "model": cfg.model,
        "context_size": cfg.context_size,
        "tokenizer": str(source.model_dir),
        "bos_token_id": specials.start_id if specials is not None else None,
        "special_token_ids": list(specials.special_ids) if specials is not None else [],
        "n_contexts": len(source.tokens),
        "dataset": cfg.dataset,
        "text_field": cfg.text_field,
        "split": cfg.split,
        "exclude_special_tokens": cfg.exclude_special_tokens,
    }


def provenance(cfg) -> dict:
    """What the SAE was trained on, for its cfg.json's metadata."""
    return {
        "model_name": cfg.model,
        "hook_name": cfg.hook,
        "dataset_path": cfg.dataset,
        "context_size": cfg.context_size,
    }


__all__ = ["HoldoutRows", "Stream", "StreamFeed", "StreamOrder", "open_stream"]
