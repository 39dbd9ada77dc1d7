"""The one gate every submission passes — the CLI's `submit`, `extract`, `evaluate`, `inspect` and `resume`,
and the pages' forms.

`check` returns every problem of a submission at once, as data: the labels, the placement, the config against
it, what the job reads, the GPU selection (busy, lost, MIG, missing) and the memory fit. Which checks a config
gets is its kind's (kinds.py names each kind's check; gate.py holds what they share). `submit` queues a job
only when there is none. The rule for GPUs held by other SAE Lab jobs is decided here once: they may be
chosen, and the new job queues behind them (a note says so); GPUs that foreign processes use are busy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sqlalchemy.engine import Engine

from ..config import EvaluateConfig, ExtractConfig, JobConfig, TrainConfig
from ..db.tables import Job
from ..outputs import checkpoint_root, latest_checkpoint, sweep_members
from ..sweep import Sweep
from . import store
from .errors import JobError
from .gate import MAX_NAME_CHARS, Problem, SubmissionRejected, Verdict
from .kinds import job_kind, kind_of
from .placement import Submission

__all__ = [
    "MAX_NAME_CHARS",
    "Problem",
    "Submission",
    "SubmissionRejected",
    "Verdict",
    "check",
    "resume",
    "submit",
    "submit_extract",
]


def check(cfg: JobConfig | Sweep, submission: Submission, *, engine: Engine | None = None, **options) -> Verdict:
    """Every problem of queueing `cfg` as `submission` (its kind's check). `options` are the check's own:
    `statuses` (the GPUs as the queue sees them, by default now), and for a training `scan_values`."""
    return kind_of(cfg).check_function()(cfg, submission, engine=engine, **options)


def submit(cfg: JobConfig | Sweep, submission: Submission, engine: Engine | None = None) -> tuple[Job, Verdict]:
    """Queue a job if the gate finds no problem (else SubmissionRejected, nothing written): the config as the gate
    settled it (`verdict.config`: a sweep with the placement it chose), else as given."""
    verdict = check(cfg, submission, engine=engine)
    if not verdict.ok:
        raise SubmissionRejected(verdict.problems)
    return store.submit_job(verdict.config or cfg, submission, engine), verdict


def submit_extract(
    cfg: ExtractConfig,
    submission: Submission,
    then_train: TrainConfig | None = None,
    then_evaluate: EvaluateConfig | None = None,
    engine: Engine | None = None,
) -> tuple[Job, Job | None, Verdict]:
    """Queue an extraction, and with `then_train` a training on its output that waits for it (same placement),
    and with `then_evaluate` (which needs `then_train`) a model evaluation of the SAE that waits for the
    training (its `sae` is set to the training's folder). All are checked first; SubmissionRejected with
    every problem of any, and nothing is queued. Returns the extraction, the training and the verdict;
    the evaluation is `verdict.then_evaluation`."""
    if then_evaluate is not None and then_train is None:
        raise SubmissionRejected([Problem("then_evaluate", "then evaluate: needs a training to evaluate (then train)")])
    verdict = check(cfg, submission, engine=engine)
    if then_train is not None and verdict.model is not None and cfg.hook in verdict.model.hooks:
        planned = check(
            then_train, submission, engine=engine, planned_d_in=verdict.model.hooks[cfg.hook], planned_rows=cfg.n_tokens
        )
        verdict.problems += [Problem(p.field, f"then train: {p.message}") for p in planned.problems]
    if then_evaluate is not None:
        later = check(then_evaluate, submission, engine=engine, planned=True)
        verdict.problems += [Problem(p.field, f"then evaluate: {p.message}") for p in later.problems]
        if then_train is not None and then_train.holdout_tokens < 2 * cfg.context_size:
            message = (
                f"then evaluate: the training holds out {then_train.holdout_tokens:,} rows, not two whole contexts of "
                f"{cfg.context_size} tokens to evaluate on; raise holdout_tokens"
            )
            verdict.problems.append(Problem("holdout_tokens", message))
    if not verdict.ok:
        raise SubmissionRejected(verdict.problems)
    extraction = store.submit_job(cfg, submission, engine)
    training = None
    if then_train is not None:
        trained = then_train.model_copy(update={"activation_source": extraction.out_dir})
        waits = dataclasses.replace(submission, name=f"{extraction.name} (train)", depends_on=extraction.id)
        training = store.submit_job(trained, waits, engine)
    if then_evaluate is not None and training is not None:
        evaluated = then_evaluate.model_copy(update={"sae": training.out_dir})
        waits = dataclasses.replace(submission, name=f"{extraction.name} (evaluate)", depends_on=training.id)
        verdict.then_evaluation = store.submit_job(evaluated, waits, engine)
    return extraction, training, verdict


def resume(job_id: int, submitted_by: str = "", engine: Engine | None = None) -> tuple[Job, Verdict]:
    """Queue a job that continues a failed or cancelled one, as its kind continues (kinds.py: from its newest
    checkpoint, in the folder of its shards, or again), on the same placement, through the same gate as a new
    submission."""
    old = store.require_job(job_id, engine)
    if old.status not in ("failed", "cancelled"):
        raise JobError(f"job {job_id} is {old.status}; only failed or cancelled jobs can be resumed")
    submission = Submission(
        old.gpu_list,
        old.cpu_procs if old.is_cpu_job else None,
        name=old.name if old.name.endswith("(resumed)") else f"{old.name} (resumed)",
        submitted_by=submitted_by or old.submitted_by,
        resumed_from=_RESUMED_FROM[job_kind(old.kind).resume](old, engine),
    )
    return submit(store.job_config(old), submission, engine)


def _from_checkpoint(old: Job, engine: Engine | None) -> int:
    """The job whose newest complete checkpoint a training continues from: its own, or, for a resume that died
    before its first checkpoint, its source's."""
    source = old
    while _checkpoint_of(source) is None and source.resumed_from is not None:
        source = store.require_job(source.resumed_from, engine)
    if _checkpoint_of(source) is None:
        raise JobError(f"job {old.id} has no complete checkpoint in {checkpoint_root(old.out_dir)} to resume from")
    return source.id


def _in_its_shards(old: Job, engine: Engine | None) -> int:  # noqa: ARG001  (the same signature as the others)
    """The job whose folder holds the extraction's shards (its own, or its source's): the finished shards are
    kept, the rest computed."""
    return old.resumed_from if old.resumed_from is not None else old.id


def _again(old: Job, engine: Engine | None) -> None:  # noqa: ARG001
    """Nothing to continue: the same job from the start."""
    return


_RESUMED_FROM = {"checkpoint": _from_checkpoint, "shards": _in_its_shards, "again": _again}


def _checkpoint_of(job: Job) -> Path | None:
    """The job's newest complete checkpoint: in its folder, or for a sweep in its members' (the first that has
    one; the sweep's resume finds the step every member has)."""
    if not job.out_dir:
        return None
    folders = [member.folder for member in sweep_members(job.out_dir)] or [Path(job.out_dir)]
    return next((found for found in map(latest_checkpoint, folders) if found is not None), None)
