"""What the submission gate's checks of every kind share: the verdict they fill, and the checks every kind
makes (the labels, the placement and the CPU budget, paths outside the lab's roots, the GPUs chosen, the host's
RAM). Each kind's own check (train_checks, extract_checks, evaluate_checks) starts from `start_verdict`;
`submission.py` is the gate's front door, which picks the kind's check from its JobKind row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from ..config import JobConfig, TrainConfig
from ..data.activations import ActivationSet
from ..data.heldout import EvalPlan
from ..db.tables import Job
from ..gpu.availability import GpuStatus, validate
from ..gpu.host import CPU_BUDGET_ENV, available_ram, cpu_budget
from ..gpu.memory import GiB, host_bytes_of_terms
from ..sweep import Sweep
from ..text import label_problem
from .errors import JobError
from .gpus import gpu_statuses
from .models import ModelFacts
from .placement import Submission, parse_placement

MAX_NAME_CHARS = 200  # a job's name and who submitted it: shown to colleagues on one line


@dataclass(frozen=True)
class Problem:
    """One reason a submission cannot be queued: the field to change and a sentence naming it."""

    field: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class Verdict:
    """What the gate found: problems (none: it may be queued), notes for the person, what it opened."""

    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. "GPU 1: queued behind SAE Lab job 12 ..."
    gpus: list[int] = field(default_factory=list)
    dataset: ActivationSet | None = None
    model: ModelFacts | None = None  # an extraction's model, as the hooks command read it
    memory: dict[str, int] = field(default_factory=dict)  # a model-side job's memory per rank, by term
    disk_bytes: int | None = None  # what an extraction will write
    evaluation: EvalPlan | None = None  # what a model evaluation will run on
    placement_failed: bool = False  # nothing after the placement was checked
    then_evaluation: Job | None = None  # the evaluation submit_extract queued after the training
    config: JobConfig | Sweep | None = None  # what is queued when the check settled part of it (a sweep's placement)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        return "; ".join(str(p) for p in self.problems)

    def add(self, problems: Sequence[tuple[str, str]]) -> None:
        """Record the (field, message) pairs a check returned."""
        self.problems += [Problem(f, m) for f, m in problems]


class SubmissionRejected(JobError):
    """A submission the gate refused; `problems` are all of its reasons."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


def start_verdict(cfg: JobConfig, submission: Submission) -> Verdict:
    """What every kind checks first: the labels, the placement (within the CPU budget), and no CUDA-only config
    on CPU processes."""
    verdict = Verdict()
    for field_name in ("name", "submitted_by"):
        if (why := label_problem(getattr(submission, field_name), MAX_NAME_CHARS)) is not None:
            verdict.problems.append(Problem(field_name, f"{field_name}: {why}"))
    try:
        verdict.gpus = parse_placement(submission.gpu_ids, submission.cpu_procs)
    except JobError as exc:
        verdict.problems.append(Problem("placement", str(exc)))
        verdict.placement_failed = True
        return verdict
    if not verdict.gpus:
        _check_cpu_budget(int(submission.cpu_procs or 1), verdict)
    if not verdict.gpus and cfg.device == "cuda":
        message = "device: 'cuda' cannot run as a CPU job; choose GPUs, or device 'auto' or 'cpu'"
        verdict.problems.append(Problem("device", message))
    return verdict


def ranks(verdict: Verdict, submission: Submission) -> int:
    """The processes a job of a valid placement runs as: a GPU each, or its CPU processes."""
    return len(verdict.gpus) or int(submission.cpu_procs or 1)


def _check_cpu_budget(cpu_procs: int, verdict: Verdict) -> None:
    """A CPU job may not start more processes than the lab's CPU budget (the cores, or SAE_LAB_CPU_BUDGET)."""
    try:
        budget = cpu_budget()
    except ValueError as exc:  # the server's setting is wrong: say which, refuse until it is fixed
        verdict.problems.append(Problem("cpu_procs", f"cpu_procs: cannot be checked: {exc}"))
        return
    if cpu_procs > budget:
        message = (
            f"cpu_procs: {cpu_procs} processes, but this machine runs at most {budget} at once (its CPU cores, or "
            f"{CPU_BUDGET_ENV}); choose {budget} or fewer"
        )
        verdict.problems.append(Problem("cpu_procs", message))


def outside_roots(verdict: Verdict, outside: list[tuple[str, str]]) -> bool:
    """Record the paths outside the lab's roots; True when there are any (nothing of them is read then)."""
    verdict.add(outside)
    return bool(outside)


# What makes each kind smaller, for the host-RAM message.
_SMALLER = {"run": "lower d_sae or batch_size", "inspection": "lower chunk_rows"}


def check_host_memory(verdict: Verdict, noun: str, need: int, ranks: int) -> None:
    """Every kind, on GPUs or CPU processes: the job's host RAM (`need`, all its processes) against what is
    available now."""
    free = available_ram()
    if need <= free:
        return
    field_name, fewer = ("gpus", "fewer GPUs") if verdict.gpus else ("cpu_procs", "fewer processes")
    message = (
        f"{field_name}: the {noun} needs about {need / GiB:.1f} GiB of RAM for {ranks} process(es), but this machine "
        f"has {free / GiB:.1f} GiB available; {_SMALLER.get(noun, 'lower batch_size')}, or use {fewer}"
    )
    verdict.problems.append(Problem(field_name, message))


def check_gpus(
    cfg: TrainConfig | None,
    statuses: Sequence[GpuStatus] | None,
    engine: Engine | None,
    verdict: Verdict,
    d_in: int | None,
    need_bytes: int | None = None,
) -> None:
    """The chosen GPUs: present, not busy with foreign work, with room for the job (a training's estimate from
    `cfg` and `d_in`, or `need_bytes`); a GPU held by another SAE Lab job gets a note that the job queues."""
    statuses = list(statuses) if statuses is not None else gpu_statuses(engine)
    problems = validate(verdict.gpus, cfg, statuses, d_in, need_bytes)
    verdict.problems += [Problem("gpus", message) for message in problems]
    by_index = {s.index: s for s in statuses}
    for index in verdict.gpus:
        status = by_index.get(index)
        if status is not None and status.available and status.queue_note:
            verdict.notes.append(f"GPU {index}: {status.queue_note}")


def check_model_memory(verdict: Verdict, noun: str, submission: Submission, statuses, engine) -> None:
    """A job that runs a model or an SAE: its memory per rank (verdict.memory) on the chosen GPUs, and its
    host RAM (on GPUs what passes through RAM, on CPU processes all of it)."""
    if verdict.gpus:
        check_gpus(None, statuses, engine, verdict, None, sum(verdict.memory.values()))
    count = ranks(verdict, submission)
    check_host_memory(verdict, noun, host_bytes_of_terms(verdict.memory, count, bool(verdict.gpus)), count)
