"""The kinds of job the queue runs, and every fact about each, in one table: nothing outside this module asks a
job's kind by name.

A kind is its config class (what the row's config_json holds), the entry module torchrun runs with `--config
FILE --out DIR`, where it writes and which file says it finished, how a failed one is resumed, the gate's check
of it, and what the Jobs page shows of it. The checks are named by "module:function" (imported by the gate),
so this table stays beneath the modules that implement them.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import EvaluateConfig, ExtractConfig, InspectConfig, StrictConfig, TrainConfig
from ..db.tables import Job
from ..files import (
    EVAL_FILE,
    EVALUATE_REQUEST_FILE,
    EXTRACT_REQUEST_FILE,
    INSPECT_DONE_FILE,
    INSPECT_REQUEST_FILE,
    MANIFEST_FILE,
    MODEL_EVAL_FILE,
    SWEEP_RESULT_FILE,
    TRAIN_REQUEST_FILE,
)
from ..sweep import Sweep

# How `resume` continues a failed or cancelled job of the kind (submission.py implements each):
# "checkpoint": from the newest complete checkpoint (its own, or its source's); "shards": in the folder that
# holds the shards already written; "again": the same job from the start (nothing to continue).
Resume = Literal["checkpoint", "shards", "again"]
# The Jobs page's sixth tile: the share of time spent waiting for data, the disk written, the model's figures.
Tile = Literal["data_wait", "disk", "model_figures"]


@dataclass(frozen=True)
class JobKind:
    name: str  # the job row's `kind`
    noun: str  # for messages: "the training exited ..."
    config: type[StrictConfig] | type[Sweep]
    entry: str  # the module torchrun runs
    request_file: str  # the config as the file `--config` names, in the job folder
    total_field: str  # the config field progress counts to: steps, rows, contexts, rows
    progress_label: str  # what that count is, on the Jobs page
    finished_file: str  # in the folder it writes into: present once the job did all its work
    check: str  # "module:function", the gate's check of a config of this kind
    resume: Resume
    tile: Tile
    chart_metrics: tuple[str, ...] | None  # what the Jobs page charts; None: a training's figures and named losses
    result_note: str  # where its result appears, said on the Jobs page until it does

    def total(self, cfg: StrictConfig | Sweep) -> int:
        return int(getattr(cfg, self.total_field))

    def writes_into(self, job: Job) -> Path:
        """Where the job writes: its own folder, or, for a resumed kind that continues in its shards, its source's
        (a sibling job folder), so that the shards already computed are kept."""
        out_dir = Path(job.out_dir)
        if self.resume == "shards" and job.resumed_from is not None:
            return out_dir.parent / str(job.resumed_from)
        return out_dir

    def finished_marker(self, job: Job) -> Path:
        """The file whose presence says the job did all its work."""
        return self.writes_into(job) / self.finished_file

    def check_function(self) -> Callable:
        return _function(self.check)


@functools.cache
def _function(reference: str) -> Callable:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


KINDS = {
    kind.name: kind
    for kind in (
        JobKind(
            "train",
            "training",
            TrainConfig,
            "sae_core.train",
            TRAIN_REQUEST_FILE,
            "total_steps",
            "Step",
            EVAL_FILE,
            "sae_core.jobs.train_checks:check_train",
            "checkpoint",
            "data_wait",
            None,
            "The SAE download appears when the job completes.",
        ),
        JobKind(
            "sweep",
            "sweep",
            Sweep,
            "sae_core.train",
            TRAIN_REQUEST_FILE,
            "total_steps",
            "Step",
            SWEEP_RESULT_FILE,
            "sae_core.jobs.train_checks:check_sweep",
            "checkpoint",
            "data_wait",
            None,
            "Each member's SAE appears on the SAEs page (and in its comparison view) when the sweep completes.",
        ),
        JobKind(
            "extract",
            "extraction",
            ExtractConfig,
            "sae_core.extract",
            EXTRACT_REQUEST_FILE,
            "n_tokens",
            "Rows",
            MANIFEST_FILE,
            "sae_core.jobs.extract_checks:check_extract",
            "shards",
            "disk",
            ("tokens_per_s", "disk_bytes"),
            "The activations appear in the Train page's dataset picker when the job completes.",
        ),
        JobKind(
            "evaluate",
            "evaluation",
            EvaluateConfig,
            "sae_core.evaluate",
            EVALUATE_REQUEST_FILE,
            "contexts",
            "Contexts",
            MODEL_EVAL_FILE,
            "sae_core.jobs.evaluate_checks:check_evaluate",
            "again",
            "model_figures",
            ("tokens_per_s",),
            "The figures are added to the SAE's eval.json (SAEs page) when the job completes.",
        ),
        JobKind(
            "inspect",
            "inspection",
            InspectConfig,
            "sae_core.inspect",
            INSPECT_REQUEST_FILE,
            "tokens",
            "Rows",
            INSPECT_DONE_FILE,
            "sae_core.jobs.evaluate_checks:check_inspect",
            "again",
            "data_wait",
            ("tokens_per_s",),
            "The latents appear on the Explore page when the job completes.",
        ),
    )  # fmt: skip
}


def kind_of(cfg: StrictConfig | Sweep) -> JobKind:
    """The kind of a job config (ValueError for a config no kind runs)."""
    for kind in KINDS.values():
        if isinstance(cfg, kind.config):
            return kind
    raise ValueError(f"no job kind runs a {type(cfg).__name__}")


def job_kind(name: str) -> JobKind:
    """The kind a row names (ValueError naming the kinds for any other name)."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"job kind {name!r} is not one of {', '.join(KINDS)}") from None
