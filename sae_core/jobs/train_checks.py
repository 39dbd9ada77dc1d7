"""The submission gate's check of a training (called through its JobKind row by submission.py, the one gate):
the batch split over the ranks, the activations (inside the lab's roots, readable, finite) or the model, hooks
and text it streams from (stream_checks.py), the GPUs and the memory estimate, the host's RAM."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import Engine

from ..config import ConfigError, TrainConfig
from ..data.catalog import OUTSIDE_ROOTS, in_data_roots
from ..data.checks import DatasetError, check_dataset
from ..gpu.availability import GpuStatus
from ..gpu.memory import StreamSource, estimate, host_bytes, sweep_host_bytes
from ..sweep import Sweep
from . import store, stream_checks, sweep_layout
from .errors import unexpected
from .gate import Problem, Verdict, check_gpus, check_host_memory, ranks, start_verdict
from .gpus import gpu_statuses
from .placement import Submission


def check_train(
    cfg: TrainConfig,
    submission: Submission,
    *,
    statuses: Sequence[GpuStatus] | None = None,
    engine: Engine | None = None,
    scan_values: bool | None = None,
    planned_d_in: int | None = None,
    planned_rows: int | None = None,
) -> Verdict:
    """Every problem of queueing the training `cfg` as `submission`.

    `scan_values` None scans values for NaN/Inf as `check_dataset` does (all of a set up to 2 GiB, a sample of a
    larger one); False checks the structure only, as the Train page does while a person types. `statuses`
    defaults to the GPUs as the queue sees them now. `planned_d_in`: the activations do not exist yet (an
    extraction queued before this training will write them, this wide, `planned_rows` of them); their other
    checks are the job's."""
    verdict = start_verdict(cfg, submission)
    if verdict.placement_failed:
        return verdict
    if not verdict.gpus:
        _check_cpu_batch(cfg, int(submission.cpu_procs or 1), verdict)
    # after the dataset: the memory fit needs its width
    d_in, stream = _check_data(cfg, verdict, engine, scan_values, planned_d_in, planned_rows)
    if verdict.gpus:
        check_gpus(cfg, statuses, engine, verdict, d_in, _streamed_need(cfg, len(set(verdict.gpus)), d_in, stream))
    if d_in is not None and not verdict.problems:
        count = ranks(verdict, submission)
        need = host_bytes(cfg, count, d_in, on_gpu=bool(verdict.gpus), stream=stream)
        check_host_memory(verdict, "run", need, count)
    return verdict


def _streamed_need(cfg: TrainConfig, world: int, d_in: int | None, stream: StreamSource | None) -> int | None:
    """A streamed run's estimate per GPU (None: the files' estimate, which the GPU check makes itself, or a batch
    that does not split, which it names)."""
    if stream is None or d_in is None:
        return None
    try:
        return estimate(cfg, world, d_in, stream).total_bytes
    except ConfigError:
        return None


def _check_data(
    cfg: TrainConfig,
    verdict: Verdict,
    engine: Engine | None,
    scan_values: bool | None,
    planned_d_in: int | None,
    planned_rows: int | None,
    hooks: list[str] | None = None,
    keys: list[str] | None = None,
) -> tuple[int | None, StreamSource | None]:
    """The activations (or, for a training queued behind its extraction, the rows it will write; or the model,
    `hooks` and text it streams from); their width when known, and what the stream holds."""
    if cfg.streamed and planned_d_in is None:
        home = store.engine_home(store.engine_or_default(engine))
        hooks = hooks or stream_checks.hooks_of(cfg)
        keys = keys or stream_checks.keys_of(cfg)
        stream = stream_checks.check_stream(cfg, hooks, verdict, home, count_rows=scan_values is not False, keys=keys)
        if stream is None or verdict.model is None:
            return None, None
        return stream_checks.stream_d_in(verdict.model, hooks), stream
    if planned_d_in is None:
        _check_dataset(cfg, scan_values, store.engine_home(store.engine_or_default(engine)), verdict)
    elif planned_rows is not None and planned_rows < cfg.batch_size + cfg.holdout_tokens:
        message = (
            f"the extraction writes {planned_rows:,} rows, fewer than one global batch (batch_size "
            f"{cfg.batch_size:,}) plus the holdout (holdout_tokens {cfg.holdout_tokens:,}); extract more tokens "
            "or lower batch_size/holdout_tokens"
        )
        verdict.problems.append(Problem("n_tokens", message))
    return (planned_d_in if planned_d_in is not None else verdict.dataset.d_in if verdict.dataset else None), None


def _check_cpu_batch(cfg: TrainConfig, cpu_procs: int, verdict: Verdict) -> None:
    try:
        cfg.per_rank_batch(cpu_procs)
    except ConfigError as exc:
        verdict.problems.append(Problem("batch_size", str(exc)))


def _check_dataset(cfg: TrainConfig, scan_values: bool | None, home: Path, verdict: Verdict) -> None:
    assert cfg.activation_source is not None  # a streamed config is checked by stream_checks
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


def check_sweep(
    sweep: Sweep,
    submission: Submission,
    *,
    statuses: Sequence[GpuStatus] | None = None,
    engine: Engine | None = None,
    scan_values: bool | None = None,
    planned_d_in: int | None = None,
    planned_rows: int | None = None,
) -> Verdict:
    """Every problem of queueing the sweep: its data once (every member reads the same; streamed, every hook a
    member reads, the SAEs' memory at the widest), the GPUs chosen, and the
    whole group's memory in the layout it asks for; "auto" takes "batch" on one rank, else "batch" when it
    fits, else "members" when that fits, else a refusal naming both figures. The layout chosen is in the notes
    and in `verdict.config`, the sweep that is queued."""
    verdict = start_verdict(sweep.shared, submission)
    if verdict.placement_failed:
        return verdict
    hooks = stream_checks.hooks_of(sweep)
    keys = stream_checks.keys_of(sweep)
    d_in, stream = _check_data(sweep.shared, verdict, engine, scan_values, planned_d_in, planned_rows, hooks, keys)
    count = ranks(verdict, submission)
    if verdict.gpus:
        statuses = list(statuses) if statuses is not None else gpu_statuses(engine)
        check_gpus(None, statuses, engine, verdict, None)  # present, not busy; the memory is the layout's
    layout = sweep_layout.choose(sweep, count, d_in, verdict, statuses or [], stream)
    if layout is not None:
        verdict.config = sweep.with_placement(layout)
        if verdict.gpus and d_in is not None and not verdict.problems:
            need = sweep_host_bytes(sweep, count, d_in, layout, on_gpu=True, stream=stream)
            check_host_memory(verdict, "run", need, count)
    return verdict
