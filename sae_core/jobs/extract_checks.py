"""The submission gate's check of an extraction (called through its JobKind row by submission.py, the one
gate): where the model and the text may come from, the model and its hook, the text's first document (those
three shared with a training streamed from a model: source_checks.py), the disk, the memory.

No torch: the model is read by `python -m sae_core hooks` in a child process (models.py). What needs the
tokenizer (are there `n_tokens` rows?) is checked by the job before it writes anything.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import Engine

from .. import paths
from ..config import ExtractConfig
from ..gpu.availability import GpuStatus
from ..gpu.model_memory import DTYPE_BYTES, extraction_bytes
from ..text import format_bytes
from . import store
from .errors import guarded
from .gate import Verdict, check_model_memory, outside_roots, start_verdict
from .models import loaded_dtype
from .placement import Submission
from .source_checks import first_document, locations, model_and_hooks

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
    if outside_roots(verdict, locations(cfg.model, cfg.dataset, home)):
        return verdict
    verdict.model, problems = model_and_hooks(cfg.model, [cfg.hook])
    verdict.add(problems + first_document(cfg.dataset, cfg.text_field, cfg.split))
    if verdict.model is None or cfg.hook not in verdict.model.hooks:
        return verdict
    verdict.disk_bytes = disk_needed(cfg, verdict.model.hooks[cfg.hook])
    verdict.add(disk_problem(verdict.disk_bytes, paths.jobs_dir(home)))
    verdict.memory = memory_per_rank(cfg, verdict.model, on_gpu=bool(verdict.gpus))
    check_model_memory(verdict, "extraction", submission, statuses, engine)
    return verdict


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
