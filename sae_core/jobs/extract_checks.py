"""The submission gate's check of an extraction (called through its JobKind row by submission.py, the one
gate): where the model and the text may come from, the model and its hook, the text's first document, the
disk, the memory.

No torch: the model is read by `python -m sae_core hooks` in a child process (models.py). What needs the
tokenizer (are there `n_tokens` rows?) is checked by the job before it writes anything.
"""

from __future__ import annotations

import difflib
import shutil
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import Engine

from .. import paths
from ..config import ExtractConfig
from ..data.catalog import OUTSIDE_MODEL_ROOTS, OUTSIDE_ROOTS, model_allowed, text_allowed
from ..data.text import TextError, iter_pieces
from ..gpu.availability import GpuStatus
from ..gpu.memory import DTYPE_BYTES, extraction_bytes
from ..text import format_bytes
from . import store
from .errors import guarded
from .gate import Verdict, check_model_memory, outside_roots, start_verdict
from .models import ModelProblem, loaded_dtype, model_facts
from .placement import Submission

INDEX_BYTES_PER_ROW = 4 + 8 + 4  # token_ids int32, context_ids int64, positions int32


def check_extract(
    cfg: ExtractConfig,
    submission: Submission,
    *,
    statuses: Sequence[GpuStatus] | None = None,
    engine: Engine | None = None,
) -> Verdict:
    """Every problem of queueing the extraction `cfg` as `submission`: names, placement, where the model and
    text come from, the model and its hook, the text's first document, the disk, the memory per GPU (or of
    the host)."""
    verdict = start_verdict(cfg, submission)
    if verdict.placement_failed:
        return verdict
    home = store.engine_home(store.engine_or_default(engine))
    if outside_roots(verdict, locations(cfg, home)):
        return verdict
    verdict.model, problems = model_and_hook(cfg)
    verdict.add(problems + first_document(cfg))
    if verdict.model is None or cfg.hook not in verdict.model.hooks:
        return verdict
    verdict.disk_bytes = disk_needed(cfg, verdict.model.hooks[cfg.hook])
    verdict.add(disk_problem(verdict.disk_bytes, paths.jobs_dir(home)))
    verdict.memory = memory_per_rank(cfg, verdict.model, on_gpu=bool(verdict.gpus))
    check_model_memory(verdict, "extraction", submission, statuses, engine)
    return verdict


def locations(cfg: ExtractConfig, home: Path) -> list[tuple[str, str]]:
    """(field, message) for a model or dataset path outside the lab's roots (hub names in the local cache are
    fine; any other name is a path)."""
    problems = []
    if not model_allowed(cfg.model, home):
        problems.append(("model", f"model: {OUTSIDE_MODEL_ROOTS}"))
    if not text_allowed(cfg.dataset, home):
        problems.append(("dataset", f"dataset: {OUTSIDE_ROOTS}"))
    return problems


@guarded("model", with_value=True)
def model_and_hook(cfg: ExtractConfig):
    """(facts, problems): the model as the hooks command reads it, and whether the hook is one of its modules."""
    try:
        facts = model_facts(cfg.model)
    except ModelProblem as exc:
        return None, [(exc.field, str(exc))]
    if cfg.hook not in facts.hooks:
        close = difflib.get_close_matches(cfg.hook, list(facts.hooks), n=5, cutoff=0.5)
        hint = f"; close: {', '.join(close)}" if close else ""
        message = f"hook: {cfg.hook!r} is not a module of this model with a [batch, tokens, width] output{hint}"
        return facts, [("hook", f"{message} (`python -m sae_core hooks MODEL` lists them)")]
    return facts, []


@guarded("dataset")
def first_document(cfg: ExtractConfig) -> list[tuple[str, str]]:
    """The text can be opened and holds at least one document of the field asked for."""
    try:
        next(iter(iter_pieces(cfg.dataset, cfg.text_field, cfg.split)))
    except StopIteration:
        return [("dataset", "dataset: it holds no documents")]
    except TextError as exc:
        field = str(exc).split(":", 1)[0] if str(exc).startswith(("text_field:", "split:")) else "dataset"
        return [(field, str(exc))]
    return []


def disk_needed(cfg: ExtractConfig, d_in: int) -> int:
    """Bytes the shards and the contexts take (the contexts: at most one int32 per row's token)."""
    per_row = d_in * DTYPE_BYTES[cfg.storage_dtype] + INDEX_BYTES_PER_ROW
    return cfg.n_tokens * per_row + cfg.n_tokens * 4


@guarded("n_tokens")
def disk_problem(need: int, jobs_dir: Path) -> list[tuple[str, str]]:
    where = jobs_dir if jobs_dir.exists() else jobs_dir.parent
    free = shutil.disk_usage(where).free
    if need <= free:
        return []
    return [
        (
            "n_tokens",
            f"n_tokens: the activations need about {format_bytes(need)} but {where} has {format_bytes(free)} free",
        )
    ]


def memory_per_rank(cfg: ExtractConfig, facts, on_gpu: bool) -> dict[str, int]:
    """The estimate's terms for one rank; the weights in the dtype the job will load them in."""
    dtype = loaded_dtype(facts, cfg.model_dtype, on_gpu)
    terms = extraction_bytes(facts.parameters, dtype, cfg.batch_size, cfg.context_size, facts.hidden_size, facts.heads)
    if not on_gpu:
        terms.pop("cuda_context")
    return terms
