"""Which GPUs can take a job: busy detection, a recommendation, and validation of a selection.

A GPU is busy when
- an SAE Lab job that is queued, starting or running holds it (Job.gpu_ids in the store), or
- processes that are not SAE Lab jobs hold more than FOREIGN_BUSY_BYTES or FOREIGN_BUSY_FRACTION of
  its memory, whichever is smaller. A bare CUDA context is ~0.3-0.6 GiB, so 1 GiB means "someone is
  computing here", while a desktop's Xorg/compositor (tens to hundreds of MiB) does not count;
  10 % keeps the rule sensible on small GPUs. When NVML cannot list processes (some containers),
  memory in use beyond the same threshold with no SAE Lab job on the GPU counts the same way.
A lost GPU and a GPU in MIG mode are not selectable either (SAE Lab runs one rank per whole GPU).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import gpus as gpus_mod
from .config import ConfigError, TrainConfig

GiB = 1024**3
FOREIGN_BUSY_BYTES = 1 * GiB
FOREIGN_BUSY_FRACTION = 0.10
SNAPSHOT_MAX_AGE_S = 10.0  # older sampler snapshots are replaced by a live probe
MAX_COMBINATIONS = 20_000  # beyond this many GPU sets, pick greedily instead of trying them all


@dataclass
class GpuStatus:
    index: int
    name: str | None
    uuid: str | None
    memory_total: int | None
    memory_used: int | None
    memory_free: int | None
    util_gpu: float | None
    busy: bool  # someone (an SAE Lab job or a foreign process) is using it
    reason: str | None  # why it is busy or unavailable, naming the job or pid/user/command
    error: str | None = None  # lost GPU
    mig_enabled: bool = False
    job_ids: list[int] = field(default_factory=list)  # live SAE Lab jobs holding it
    foreign_bytes: int = 0  # memory of processes that are not SAE Lab jobs
    links: list[int | None] | None = None  # NVML topology level to each GPU index (lower = closer)

    @property
    def available(self) -> bool:
        """Can be selected for a new job now."""
        return not self.busy and self.error is None and not self.mig_enabled


def foreign_threshold(memory_total: int | None) -> int:
    if not memory_total:
        return FOREIGN_BUSY_BYTES
    return min(FOREIGN_BUSY_BYTES, int(FOREIGN_BUSY_FRACTION * memory_total))


# ---------------------------------------------------------------------------------------------
# Statuses
# ---------------------------------------------------------------------------------------------
def gpu_statuses(engine: Any = None, probe: gpus_mod.Probe | None = None) -> list[GpuStatus]:
    """One status per GPU. `probe` defaults to the sampler's snapshot when fresh, else a live probe;
    the store (`engine`, default this lab's) says which live jobs hold which GPUs."""
    from . import db

    engine = engine if engine is not None else db.get_engine()
    if probe is None:
        probe = _current_probe(engine)
    holders = live_jobs_by_gpu(engine)
    return statuses_from(probe, holders)


def _current_probe(engine: Any) -> gpus_mod.Probe:
    from . import history

    snapshot = history.latest_probe(engine)
    if snapshot is not None and time.time() - snapshot.t <= SNAPSHOT_MAX_AGE_S:
        return snapshot
    return gpus_mod.probe(gpus_mod.job_of_pid_from_store(engine))


@dataclass
class JobRef:
    id: int
    name: str
    status: str

    def describe(self) -> str:
        name = f" '{self.name}'" if self.name else ""
        return f"SAE Lab job {self.id}{name} ({self.status})"


def live_jobs_by_gpu(engine: Any) -> dict[int, list[JobRef]]:
    """GPU index -> the queued/starting/running jobs that hold it."""
    from sqlmodel import select

    from . import db
    from .models import LIVE_STATUSES, Job

    with db.read_session(engine) as session:
        rows = session.exec(
            select(Job.id, Job.name, Job.status, Job.gpu_ids).where(Job.status.in_(LIVE_STATUSES), Job.gpu_ids != "")
        ).all()
    holders: dict[int, list[JobRef]] = {}
    for job_id, name, status, gpu_ids in rows:
        for part in gpu_ids.split(","):
            if part.strip().isdigit():
                holders.setdefault(int(part), []).append(JobRef(job_id, name, status))
    return holders


def statuses_from(probe: gpus_mod.Probe, holders: dict[int, list[JobRef]]) -> list[GpuStatus]:
    """Pure: the probe's GPUs with busy/reason decided (the tests drive this directly)."""
    statuses = []
    for g in probe.gpus:
        status = GpuStatus(
            index=g.index,
            name=g.name,
            uuid=g.uuid,
            memory_total=g.memory_total,
            memory_used=g.memory_used,
            memory_free=g.memory_free,
            util_gpu=g.util_gpu,
            busy=False,
            reason=None,
            error=g.error,
            mig_enabled=bool(g.mig_enabled),
            links=probe.topology[g.index] if probe.topology and g.index < len(probe.topology) else None,
        )
        jobs = holders.get(g.index, [])
        status.job_ids = [j.id for j in jobs]
        reasons = [f"held by {j.describe()}" for j in jobs]
        foreign_reason, status.foreign_bytes = _foreign_use(g, bool(jobs))
        if foreign_reason:
            reasons.append(foreign_reason)
        status.busy = bool(reasons)
        if g.error:
            reasons.insert(0, f"unavailable: {g.error}")
        elif g.mig_enabled:
            reasons.append("MIG mode is on; SAE Lab runs one rank per whole GPU (disable MIG to use it)")
        status.reason = "; ".join(reasons) or None
        statuses.append(status)
    return statuses


def _foreign_use(g: gpus_mod.GpuInfo, held_by_job: bool) -> tuple[str | None, int]:
    """(reason, bytes) for memory used by processes that are not SAE Lab jobs."""
    threshold = foreign_threshold(g.memory_total)
    if g.processes is None:
        # NVML cannot list processes here: judge by the memory in use when no job of ours explains it.
        used = g.memory_used or 0
        if not held_by_job and used > threshold:
            return f"{_gib(used)} in use by processes NVML cannot list", used
        return None, 0
    foreign = [p for p in g.processes if p.job_id is None]
    total = sum(p.gpu_memory or 0 for p in foreign)
    if total <= threshold:
        return None, total
    foreign.sort(key=lambda p: p.gpu_memory or 0, reverse=True)
    described = ", ".join(_describe_process(p) for p in foreign[:3])
    more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
    return f"used by {described}{more}", total


def _describe_process(p: gpus_mod.GpuProcess) -> str:
    command = p.command or "command unknown"
    program, _, args = command.partition(" ")
    command = f"{program.rsplit('/', 1)[-1]} {args}".strip()  # the program's name, not its whole path
    if len(command) > 60:
        command = command[:59] + "…"
    return f"pid {p.pid} ({p.user or 'user unknown'}: {command}, {_gib(p.gpu_memory)})"


def _gib(n: int | float | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.1f} GiB"


# ---------------------------------------------------------------------------------------------
# Recommendation
# ---------------------------------------------------------------------------------------------
def _statuses_or_current(statuses: Sequence[GpuStatus] | None) -> list[GpuStatus]:
    return list(statuses) if statuses is not None else gpu_statuses()


def recommend(required_bytes: int, count: int, statuses: Sequence[GpuStatus] | None = None) -> list[int]:
    """Up to `count` free GPUs with at least `required_bytes` free each, most free memory first.

    For several GPUs, when NVML reports topology, the set whose farthest pair shares the closest
    link (same PCIe switch before same CPU socket before across sockets) wins; free memory breaks
    ties. Fewer than `count` indices come back when fewer GPUs qualify (none: an empty list)."""
    if count < 1:
        return []
    candidates = [s for s in _statuses_or_current(statuses) if s.available and (s.memory_free or 0) >= required_bytes]
    candidates.sort(key=lambda s: (-(s.memory_free or 0), s.index))
    if len(candidates) <= count:
        return [s.index for s in candidates]
    if count == 1 or not _has_topology(candidates):
        return [s.index for s in candidates[:count]]
    return [s.index for s in _closest_set(candidates, count)]


def _has_topology(candidates: Iterable[GpuStatus]) -> bool:
    return all(s.links is not None for s in candidates)


def _link(a: GpuStatus, b: GpuStatus) -> float:
    level = a.links[b.index] if a.links is not None and b.index < len(a.links) else None
    return math.inf if level is None else float(level)


def _set_key(group: Sequence[GpuStatus]) -> tuple:
    worst_link = max(_link(a, b) for a, b in itertools.combinations(group, 2))
    return (worst_link, -sum(s.memory_free or 0 for s in group), sorted(s.index for s in group))


def _closest_set(candidates: list[GpuStatus], count: int) -> list[GpuStatus]:
    if math.comb(len(candidates), count) <= MAX_COMBINATIONS:
        best = min(itertools.combinations(candidates, count), key=_set_key)
    else:  # many GPUs: grow a set from each start, always adding the closest remaining GPU
        best = min((_grow(start, candidates, count) for start in candidates), key=_set_key)
    return sorted(best, key=lambda s: (-(s.memory_free or 0), s.index))


def _grow(start: GpuStatus, candidates: list[GpuStatus], count: int) -> list[GpuStatus]:
    group = [start]
    rest = [s for s in candidates if s is not start]
    while len(group) < count:
        nxt = min(rest, key=lambda s: (max(_link(s, g) for g in group), -(s.memory_free or 0), s.index))
        group.append(nxt)
        rest.remove(nxt)
    return group


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def validate(gpu_ids: Sequence[int], cfg: TrainConfig, statuses: Sequence[GpuStatus] | None = None) -> list[str]:
    """Problems with running `cfg` on `gpu_ids` (NVML indices); an empty list means it can go."""
    ids = list(gpu_ids)
    if not ids:
        return ["select at least one GPU (or run the job on CPU processes)"]
    errors = []
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    errors += [f"GPU {i} is selected more than once" for i in duplicates]
    by_index = {s.index: s for s in _statuses_or_current(statuses)}
    for i in dict.fromkeys(ids):
        status = by_index.get(i)
        if status is None:
            errors.append(_missing_gpu(i, by_index))
        elif status.error or status.mig_enabled:
            errors.append(f"GPU {i} is not usable: {status.reason}")
        elif status.busy:
            errors.append(f"GPU {i} is busy: {status.reason}")
    world = len(set(ids))
    if cfg.batch_size % world:
        errors.append(
            f"batch_size {cfg.batch_size} does not divide evenly across {world} GPUs; "
            f"choose a batch size that is a multiple of {world}, or another number of GPUs"
        )
        return errors
    errors += _memory_errors(ids, cfg, world, by_index)
    return errors


def _missing_gpu(index: int, by_index: dict[int, GpuStatus]) -> str:
    if not by_index:
        return f"GPU {index} does not exist: no GPU was detected on this machine"
    known = ", ".join(str(i) for i in sorted(by_index))
    return f"GPU {index} does not exist (this machine has GPU {known})"


def _memory_errors(ids: list[int], cfg: TrainConfig, world: int, by_index: dict[int, GpuStatus]) -> list[str]:
    from . import memory
    from .data import DatasetError

    try:
        need = memory.estimate(cfg, world).total_bytes
    except (DatasetError, ConfigError, OSError) as exc:
        return [f"cannot estimate GPU memory for this config: {exc}"]
    errors = []
    for i in dict.fromkeys(ids):
        status = by_index.get(i)
        if status is None or status.error or status.memory_free is None:
            continue
        if status.memory_free < need:
            errors.append(
                f"GPU {i} has {_gib(status.memory_free)} free but the run needs about {_gib(need)} per GPU "
                f"(estimate for {world} GPU(s)); pick a GPU with more free memory, more GPUs, or a smaller batch"
            )
    return errors


__all__ = [
    "GpuStatus",
    "gpu_statuses",
    "statuses_from",
    "live_jobs_by_gpu",
    "recommend",
    "validate",
    "foreign_threshold",
    "FOREIGN_BUSY_BYTES",
    "FOREIGN_BUSY_FRACTION",
]
