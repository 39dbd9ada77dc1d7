"""The one gate every submission passes — the CLI's `submit` and `resume`, and the Train page.

`check` returns every problem of a submission at once, as data: the placement, the config against it,
the dataset, the GPU selection (busy, lost, MIG, missing) and the memory fit. `submit` queues a job only
when there is none. The rule for GPUs held by other SAE Lab jobs is decided here once: they may be
chosen, and the new job queues behind them (a note says so); GPUs that foreign processes use are busy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine

from .. import paths
from ..config import ConfigError, EvaluateConfig, ExtractConfig, InspectConfig, TrainConfig
from ..data.activations import ActivationSet
from ..data.catalog import OUTSIDE_ROOTS, in_data_roots
from ..data.checks import DatasetError, check_dataset
from ..data.heldout import EvalPlan
from ..db.tables import Job
from ..gpu.availability import GpuStatus, validate
from ..gpu.host import CPU_BUDGET_ENV, available_ram, cpu_budget
from ..gpu.memory import GiB, host_bytes, host_bytes_of_terms
from ..outputs import checkpoint_root, latest_checkpoint
from ..text import label_problem
from . import evaluate_checks, extract_checks, store
from .errors import JobError, unexpected
from .gpus import gpu_statuses
from .models import ModelFacts
from .placement import parse_placement

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
    memory: dict[str, int] = field(default_factory=dict)  # an extraction's memory per rank, by term
    disk_bytes: int | None = None  # what an extraction will write
    evaluation: EvalPlan | None = None  # what a model evaluation will run on
    placement_failed: bool = False  # nothing after the placement was checked
    then_evaluation: Job | None = None  # the evaluation submit_extract queued after the training

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        return "; ".join(str(p) for p in self.problems)


class SubmissionRejected(JobError):
    """A submission the gate refused; `problems` are all of its reasons."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


def check(
    cfg: TrainConfig,
    gpu_ids: Sequence[int] | str | None,
    cpu_procs: int | None,
    *,
    name: str = "",
    submitted_by: str = "",
    scan_values: bool | None = None,
    statuses: Sequence[GpuStatus] | None = None,
    engine: Engine | None = None,
    planned_d_in: int | None = None,
    planned_rows: int | None = None,
) -> Verdict:
    """Every problem of queueing `cfg` on `gpu_ids` or `cpu_procs` CPU processes, named `name` by `submitted_by`.

    `scan_values` None scans values for NaN/Inf as `check_dataset` does (all of a set up to 2 GiB, a sample of a
    larger one); False checks the structure only, as the Train page does while a person types. `statuses`
    defaults to the GPUs as the queue sees them now. `planned_d_in`: the activations do not exist yet (an
    extraction queued before this training will write them, this wide, `planned_rows` of them); their other
    checks are the job's."""
    verdict = _start_verdict(cfg, gpu_ids, cpu_procs, name, submitted_by)
    if verdict.placement_failed:
        return verdict
    if not verdict.gpus:
        _check_cpu_batch(cfg, int(cpu_procs or 1), verdict)
    if planned_d_in is None:
        _check_dataset(cfg, scan_values, store.engine_home(store.engine_or_default(engine)), verdict)
    elif planned_rows is not None and planned_rows < cfg.batch_size + cfg.holdout_tokens:
        message = (
            f"the extraction writes {planned_rows:,} rows, fewer than one global batch (batch_size "
            f"{cfg.batch_size:,}) plus the holdout (holdout_tokens {cfg.holdout_tokens:,}); extract more tokens "
            "or lower batch_size/holdout_tokens"
        )
        verdict.problems.append(Problem("n_tokens", message))
    # after the dataset: the memory fit needs its width
    d_in = planned_d_in if planned_d_in is not None else verdict.dataset.d_in if verdict.dataset else None
    if verdict.gpus:
        _check_gpus(cfg, statuses, engine, verdict, d_in)
    if d_in is not None and not verdict.problems:
        ranks = len(verdict.gpus) or int(cpu_procs or 1)
        _check_host_memory(verdict, "run", host_bytes(cfg, ranks, d_in, on_gpu=bool(verdict.gpus)), ranks)
    return verdict


def _start_verdict(cfg, gpu_ids, cpu_procs, name: str, submitted_by: str) -> Verdict:
    """What every kind checks first: the labels, the placement, and no CUDA-only config on CPU processes."""
    verdict = Verdict()
    for field_name, value in (("name", name), ("submitted_by", submitted_by)):
        if (why := label_problem(value, MAX_NAME_CHARS)) is not None:
            verdict.problems.append(Problem(field_name, f"{field_name}: {why}"))
    try:
        verdict.gpus = parse_placement(gpu_ids, cpu_procs)
    except JobError as exc:
        verdict.problems.append(Problem("placement", str(exc)))
        verdict.placement_failed = True
        return verdict
    if not verdict.gpus:
        _check_cpu_budget(int(cpu_procs or 1), verdict)
    if not verdict.gpus and cfg.device == "cuda":
        message = "device: 'cuda' cannot run as a CPU job; choose GPUs, or device 'auto' or 'cpu'"
        verdict.problems.append(Problem("device", message))
    return verdict


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


def _outside_roots(verdict: Verdict, outside: list[tuple[str, str]]) -> bool:
    """Record the paths outside the lab's roots; True when there are any (nothing of them is read then)."""
    verdict.problems += [Problem(f, m) for f, m in outside]
    return bool(outside)


def _check_cpu_batch(cfg: TrainConfig, cpu_procs: int, verdict: Verdict) -> None:
    try:
        cfg.per_rank_batch(cpu_procs)
    except ConfigError as exc:
        verdict.problems.append(Problem("batch_size", str(exc)))


# What makes each kind smaller, for the host-RAM message.
_SMALLER = {"run": "lower d_sae or batch_size", "inspection": "lower chunk_rows"}


def _check_host_memory(verdict: Verdict, noun: str, need: int, ranks: int) -> None:
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


def _check_dataset(cfg: TrainConfig, scan_values: bool | None, home: Path, verdict: Verdict) -> None:
    if not in_data_roots(cfg.activation_source, home):
        verdict.problems.append(Problem("activation_source", f"activation_source: {OUTSIDE_ROOTS}"))
        return
    try:
        scan = True if scan_values is None else scan_values
        # One rank: the batch's split across the real ranks is the placement's problem, reported once.
        verdict.dataset = check_dataset(cfg, 1, scan_values=scan)
    except (DatasetError, ConfigError, OSError) as exc:
        verdict.problems.append(Problem("activation_source", str(exc)))
    except Exception:  # noqa: BLE001  (the gate's safety net: logged, and named by field)
        verdict.problems.append(Problem(*unexpected("activation_source")))


def _check_gpus(
    cfg: TrainConfig | None,
    statuses: Sequence[GpuStatus] | None,
    engine: Engine | None,
    verdict: Verdict,
    d_in: int | None,
    need_bytes: int | None = None,
) -> None:
    statuses = list(statuses) if statuses is not None else gpu_statuses(engine)
    problems = validate(verdict.gpus, cfg, statuses, d_in, need_bytes)
    verdict.problems += [Problem("gpus", message) for message in problems]
    by_index = {s.index: s for s in statuses}
    for index in verdict.gpus:
        status = by_index.get(index)
        if status is not None and status.available and status.queue_note:
            verdict.notes.append(f"GPU {index}: {status.queue_note}")


def submit(
    cfg: TrainConfig,
    gpu_ids: Sequence[int] | str | None,
    cpu_procs: int | None,
    name: str = "",
    submitted_by: str = "",
    resumed_from: int | None = None,
    engine: Engine | None = None,
) -> tuple[Job, Verdict]:
    """Queue a job if the gate finds no problem (else SubmissionRejected, nothing written)."""
    verdict = check(cfg, gpu_ids, cpu_procs, name=name, submitted_by=submitted_by, engine=engine)
    if not verdict.ok:
        raise SubmissionRejected(verdict.problems)
    job = store.submit_job(cfg, verdict.gpus, cpu_procs, name, submitted_by, resumed_from, engine)
    return job, verdict


def check_extract(
    cfg: ExtractConfig,
    gpu_ids: Sequence[int] | str | None,
    cpu_procs: int | None,
    *,
    name: str = "",
    submitted_by: str = "",
    statuses: Sequence[GpuStatus] | None = None,
    engine: Engine | None = None,
) -> Verdict:
    """Every problem of queueing the extraction `cfg`: names, placement, where the model and text come from,
    the model and its hook, the text's first document, the disk, the memory per GPU (or of the host)."""
    verdict = _start_verdict(cfg, gpu_ids, cpu_procs, name, submitted_by)
    if verdict.placement_failed:
        return verdict
    home = store.engine_home(store.engine_or_default(engine))
    if _outside_roots(verdict, extract_checks.locations(cfg, home)):
        return verdict
    verdict.model, problems = extract_checks.model_and_hook(cfg)
    problems += extract_checks.first_document(cfg)
    verdict.problems += [Problem(f, m) for f, m in problems]
    if verdict.model is None or cfg.hook not in verdict.model.hooks:
        return verdict
    d_in = verdict.model.hooks[cfg.hook]
    verdict.disk_bytes = extract_checks.disk_needed(cfg, d_in)
    verdict.problems += [
        Problem(f, m) for f, m in extract_checks.disk_problem(verdict.disk_bytes, paths.jobs_dir(home))
    ]
    verdict.memory = extract_checks.memory_per_rank(cfg, verdict.model, on_gpu=bool(verdict.gpus))
    _check_model_memory(verdict, "extraction", cpu_procs, statuses, engine)
    return verdict


def _check_model_memory(verdict: Verdict, noun: str, cpu_procs: int | None, statuses, engine) -> None:
    """A job that runs a model or an SAE: its memory per rank (verdict.memory) on the chosen GPUs, and its
    host RAM (on GPUs what passes through RAM, on CPU processes all of it)."""
    if verdict.gpus:
        _check_gpus(None, statuses, engine, verdict, None, sum(verdict.memory.values()))
    ranks = len(verdict.gpus) or int(cpu_procs or 1)
    _check_host_memory(verdict, noun, host_bytes_of_terms(verdict.memory, ranks, bool(verdict.gpus)), ranks)


def check_evaluate(
    cfg: EvaluateConfig,
    gpu_ids: Sequence[int] | str | None,
    cpu_procs: int | None,
    *,
    name: str = "",
    submitted_by: str = "",
    statuses: Sequence[GpuStatus] | None = None,
    engine: Engine | None = None,
    planned: bool = False,
) -> Verdict:
    """Every problem of queueing the model evaluation `cfg`: names, placement, where the SAE, model and text
    come from, what it runs on (the job's own plan), the model and its hook, the memory. `planned`: the SAE
    does not exist yet (a training queued before it will write it); its checks are then the job's."""
    verdict = _start_verdict(cfg, gpu_ids, cpu_procs, name, submitted_by)
    if verdict.placement_failed or planned:
        return verdict
    if _outside_roots(verdict, evaluate_checks.locations(cfg, store.engine_home(store.engine_or_default(engine)))):
        return verdict
    verdict.evaluation, problems = evaluate_checks.plan(cfg)
    if verdict.evaluation is not None:
        verdict.model, problems = evaluate_checks.model_problems(verdict.evaluation)
    verdict.problems += [Problem(f, m) for f, m in problems]
    if verdict.ok and verdict.model is not None and verdict.evaluation is not None:
        on_gpu = bool(verdict.gpus)
        verdict.memory = evaluate_checks.memory_per_rank(cfg, verdict.model, verdict.evaluation, on_gpu)
        _check_model_memory(verdict, "evaluation", cpu_procs, statuses, engine)
    return verdict


def submit_evaluate(
    cfg: EvaluateConfig,
    gpu_ids: Sequence[int] | str | None,
    cpu_procs: int | None,
    name: str = "",
    submitted_by: str = "",
    engine: Engine | None = None,
) -> tuple[Job, Verdict]:
    """Queue a model evaluation if the gate finds no problem (else SubmissionRejected, nothing written)."""
    return _queue_checked(check_evaluate, cfg, gpu_ids, cpu_procs, name, submitted_by, engine)


def submit_extract(
    cfg: ExtractConfig,
    gpu_ids: Sequence[int] | str | None,
    cpu_procs: int | None,
    name: str = "",
    submitted_by: str = "",
    then_train: TrainConfig | None = None,
    engine: Engine | None = None,
    then_evaluate: EvaluateConfig | None = None,
) -> tuple[Job, Job | None, Verdict]:
    """Queue an extraction, and with `then_train` a training on its output that waits for it (same placement),
    and with `then_evaluate` (which needs `then_train`) a model evaluation of the SAE that waits for the
    training (its `sae` is set to the training's folder). All are checked first; SubmissionRejected with
    every problem of any, and nothing is queued. Returns the extraction, the training and the verdict;
    the evaluation is `verdict.then_evaluation`."""
    if then_evaluate is not None and then_train is None:
        raise SubmissionRejected([Problem("then_evaluate", "then evaluate: needs a training to evaluate (then train)")])
    verdict = check_extract(cfg, gpu_ids, cpu_procs, name=name, submitted_by=submitted_by, engine=engine)
    if then_train is not None and verdict.model is not None and cfg.hook in verdict.model.hooks:
        planned = check(
            then_train, gpu_ids, cpu_procs, name=name, submitted_by=submitted_by, engine=engine,
            planned_d_in=verdict.model.hooks[cfg.hook], planned_rows=cfg.n_tokens,
        )  # fmt: skip
        verdict.problems += [Problem(p.field, f"then train: {p.message}") for p in planned.problems]
    if then_evaluate is not None:
        later = check_evaluate(then_evaluate, gpu_ids, cpu_procs, name=name, submitted_by=submitted_by, engine=engine, planned=True)  # fmt: skip
        verdict.problems += [Problem(p.field, f"then evaluate: {p.message}") for p in later.problems]
        if then_train is not None and then_train.holdout_tokens < 2 * cfg.context_size:
            message = (
                f"then evaluate: the training holds out {then_train.holdout_tokens:,} rows, not two whole contexts of "
                f"{cfg.context_size} tokens to evaluate on; raise holdout_tokens"
            )
            verdict.problems.append(Problem("holdout_tokens", message))
    if not verdict.ok:
        raise SubmissionRejected(verdict.problems)
    extraction = store.submit_job(cfg, verdict.gpus, cpu_procs, name, submitted_by, engine=engine)
    training = None
    if then_train is not None:
        trained = then_train.model_copy(update={"activation_source": extraction.out_dir})
        train_name = f"{extraction.name} (train)"
        training = store.submit_job(
            trained, verdict.gpus, cpu_procs, train_name, submitted_by, engine=engine, depends_on=extraction.id
        )
    if then_evaluate is not None and training is not None:
        evaluated = then_evaluate.model_copy(update={"sae": training.out_dir})
        verdict.then_evaluation = store.submit_job(
            evaluated, verdict.gpus, cpu_procs, f"{extraction.name} (evaluate)", submitted_by, engine=engine,
            depends_on=training.id,
        )  # fmt: skip
    return extraction, training, verdict


def check_inspect(
    cfg: InspectConfig,
    gpu_ids: Sequence[int] | str | None,
    cpu_procs: int | None,
    *,
    name: str = "",
    submitted_by: str = "",
    statuses: Sequence[GpuStatus] | None = None,
    engine: Engine | None = None,
) -> Verdict:
    """Every problem of queueing the inspection `cfg`: names, placement, where the SAE and its activations come
    from, what it runs on (the job's own plan), the memory per rank."""
    verdict = _start_verdict(cfg, gpu_ids, cpu_procs, name, submitted_by)
    if verdict.placement_failed:
        return verdict
    if _outside_roots(
        verdict, evaluate_checks.inspect_locations(cfg, store.engine_home(store.engine_or_default(engine)))
    ):
        return verdict
    plan, problems = evaluate_checks.inspect_plan(cfg)
    verdict.problems += [Problem(f, m) for f, m in problems]
    if plan is not None:
        verdict.memory = evaluate_checks.inspection_memory(cfg, plan, on_gpu=bool(verdict.gpus))
        _check_model_memory(verdict, "inspection", cpu_procs, statuses, engine)
    return verdict


def submit_inspect(
    cfg: InspectConfig,
    gpu_ids: Sequence[int] | str | None,
    cpu_procs: int | None,
    name: str = "",
    submitted_by: str = "",
    engine: Engine | None = None,
) -> tuple[Job, Verdict]:
    """Queue an inspection if the gate finds no problem (else SubmissionRejected, nothing written)."""
    return _queue_checked(check_inspect, cfg, gpu_ids, cpu_procs, name, submitted_by, engine)


def _queue_checked(check_kind, cfg, gpu_ids, cpu_procs, name: str, submitted_by: str, engine) -> tuple[Job, Verdict]:
    """Queue `cfg` if `check_kind` (the gate's check of its kind) finds no problem; else SubmissionRejected."""
    verdict = check_kind(cfg, gpu_ids, cpu_procs, name=name, submitted_by=submitted_by, engine=engine)
    if not verdict.ok:
        raise SubmissionRejected(verdict.problems)
    return store.submit_job(cfg, verdict.gpus, cpu_procs, name, submitted_by, engine=engine), verdict


def resume(job_id: int, submitted_by: str = "", engine: Engine | None = None) -> tuple[Job, Verdict]:
    """Queue a job that continues a failed or cancelled one from its last complete checkpoint, on the same
    placement, through the same gate as a new submission."""
    old = store.require_job(job_id, engine)
    if old.status not in ("failed", "cancelled"):
        raise JobError(f"job {job_id} is {old.status}; only failed or cancelled jobs can be resumed")
    if old.kind == "extract":
        return _resume_extraction(old, submitted_by, engine)
    if old.kind in ("evaluate", "inspect"):  # nothing to continue: the same job again
        name = old.name if old.name.endswith("(resumed)") else f"{old.name} (resumed)"
        cpu_procs = old.cpu_procs if old.is_cpu_job else None
        again = submit_evaluate if old.kind == "evaluate" else submit_inspect
        return again(store.job_config(old), old.gpu_list, cpu_procs, name, submitted_by or old.submitted_by, engine)
    # A resume that died before its first checkpoint continues from its own source's checkpoint.
    source = old
    while _checkpoint_of(source) is None and source.resumed_from is not None:
        source = store.require_job(source.resumed_from, engine)
    if _checkpoint_of(source) is None:
        raise JobError(f"job {job_id} has no complete checkpoint in {checkpoint_root(old.out_dir)} to resume from")
    return submit(
        TrainConfig.model_validate_json(old.config_json),
        old.gpu_list,
        old.cpu_procs if old.is_cpu_job else None,
        name=old.name if old.name.endswith("(resumed)") else f"{old.name} (resumed)",
        submitted_by=submitted_by or old.submitted_by,
        resumed_from=source.id,
        engine=engine,
    )


def _resume_extraction(old: Job, submitted_by: str, engine: Engine | None) -> tuple[Job, Verdict]:
    """An extraction continues in the folder that holds its shards (its own, or its source's): the finished
    shards are kept, the rest computed."""
    cfg = store.job_config(old)
    assert isinstance(cfg, ExtractConfig)
    cpu_procs = old.cpu_procs if old.is_cpu_job else None
    name = old.name if old.name.endswith("(resumed)") else f"{old.name} (resumed)"
    verdict = check_extract(cfg, old.gpu_list, cpu_procs, name=name, submitted_by=submitted_by, engine=engine)
    if not verdict.ok:
        raise SubmissionRejected(verdict.problems)
    data_job = old.resumed_from if old.resumed_from is not None else old.id
    job = store.submit_job(cfg, verdict.gpus, cpu_procs, name, submitted_by or old.submitted_by, data_job, engine)
    return job, verdict


def _checkpoint_of(job: Job) -> Path | None:
    return latest_checkpoint(job.out_dir) if job.out_dir else None
