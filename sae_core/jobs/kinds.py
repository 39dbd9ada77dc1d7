"""The kinds of job the queue runs, and what differs between them, in one table.

Every kind is a config class (what the row's config_json holds), an entry module that torchrun runs with
`--config FILE --out DIR`, the request file that `--config` names, and the count its progress runs to.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import EvaluateConfig, ExtractConfig, InspectConfig, StrictConfig, TrainConfig
from ..files import EVALUATE_REQUEST_FILE, EXTRACT_REQUEST_FILE, INSPECT_REQUEST_FILE, TRAIN_REQUEST_FILE


@dataclass(frozen=True)
class JobKind:
    name: str  # the job row's `kind`
    noun: str  # for messages: "the training exited ..."
    config: type[StrictConfig]
    entry: str  # the module torchrun runs
    request_file: str  # the config as the file `--config` names, in the job folder
    total_field: str  # the config field progress counts to: steps, rows, contexts, rows

    def total(self, cfg: StrictConfig) -> int:
        return int(getattr(cfg, self.total_field))


KINDS = {
    kind.name: kind
    for kind in (
        JobKind("train", "training", TrainConfig, "sae_core.train", TRAIN_REQUEST_FILE, "total_steps"),
        JobKind("extract", "extraction", ExtractConfig, "sae_core.extract", EXTRACT_REQUEST_FILE, "n_tokens"),
        JobKind("evaluate", "evaluation", EvaluateConfig, "sae_core.evaluate", EVALUATE_REQUEST_FILE, "contexts"),
        JobKind("inspect", "inspection", InspectConfig, "sae_core.inspect", INSPECT_REQUEST_FILE, "tokens"),
    )
}


def kind_of(cfg: StrictConfig) -> JobKind:
    return next(kind for kind in KINDS.values() if isinstance(cfg, kind.config))


def job_kind(name: str) -> JobKind:
    """The kind a row names (rows written before kinds existed are trainings)."""
    return KINDS.get(name or "train", KINDS["train"])
