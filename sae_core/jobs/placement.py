"""Where a job runs, parsed and checked: GPU indices or a number of CPU processes, never both (pure); and the
submission of a job as one value: where it runs, what it is called, whose it is, what it waits for."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import JobConfig, TrainConfig
from ..sweep import Sweep
from .errors import JobError

MAX_CPU_PROCS = 512


@dataclass(frozen=True)
class Submission:
    """How a job is queued, whatever its kind: on `gpu_ids` or on `cpu_procs` CPU processes, named `name` by
    `submitted_by`, waiting for job `depends_on`, continuing job `resumed_from` (its checkpoint or shards)."""

    gpu_ids: Sequence[int] | str | None = None
    cpu_procs: int | None = None
    name: str = ""
    submitted_by: str = ""
    depends_on: int | None = None
    resumed_from: int | None = None


def parse_gpu_ids(gpu_ids: Sequence[int] | str | None) -> list[int]:
    """'0,1' or [0, 1] -> [0, 1]; rejects negatives, duplicates and junk with a clear message."""
    if gpu_ids is None:
        return []
    items = [p.strip() for p in gpu_ids.split(",")] if isinstance(gpu_ids, str) else list(gpu_ids)
    if isinstance(gpu_ids, str) and gpu_ids.strip() == "":
        return []
    out: list[int] = []
    for item in items:
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise JobError(f"gpus: {item!r} is not a GPU index (use e.g. 0,1)") from None
        if value < 0:
            raise JobError(f"gpus: GPU index must be 0 or more, got {value}")
        if value in out:
            raise JobError(f"gpus: GPU {value} is listed twice")
        out.append(value)
    return out


def parse_placement(gpu_ids: Sequence[int] | str | None, cpu_procs: int | None) -> list[int]:
    """Exactly one of GPUs / CPU processes, each well formed. Returns the GPU list ([] for a CPU job)."""
    gpus = parse_gpu_ids(gpu_ids)
    if gpus and cpu_procs is not None:
        raise JobError("choose either GPUs or CPU processes for a job, not both")
    if not gpus:
        if cpu_procs is None:
            raise JobError("a job needs GPUs (gpus: e.g. 0,1) or a number of CPU processes (cpu_procs)")
        if not isinstance(cpu_procs, int) or not 1 <= cpu_procs <= MAX_CPU_PROCS:
            raise JobError(f"cpu_procs: must be an integer from 1 to {MAX_CPU_PROCS}, got {cpu_procs!r}")
    return gpus


def check_placement(cfg: JobConfig | Sweep, gpu_ids: Sequence[int] | str | None, cpu_procs: int | None) -> list[int]:
    """`parse_placement`, and for training a batch that splits across the ranks (ConfigError naming both
    numbers; an extraction splits whole shards, any number of ranks; a sweep whose members go to ranks reads whole
    batches on each)."""
    gpus = parse_placement(gpu_ids, cpu_procs)
    if isinstance(cfg, Sweep) and cfg.placement != "members":
        cfg = cfg.shared
    if isinstance(cfg, TrainConfig):
        cfg.per_rank_batch(len(gpus) or int(cpu_procs or 1))
    return gpus
