"""Which GPUs can take a job: busy detection, a recommendation, and validation of a selection (pure).

A GPU is busy when processes that are not SAE Lab jobs hold more than FOREIGN_BUSY_BYTES or
FOREIGN_BUSY_FRACTION of its memory, whichever is smaller. A bare CUDA context is ~0.3-0.6 GiB, so
1 GiB means "someone is computing here", while a desktop's Xorg/compositor (tens to hundreds of MiB)
does not count; 10 % keeps the rule sensible on small GPUs. When NVML cannot list processes (some
containers), memory in use beyond the same threshold with no SAE Lab job on the GPU counts the same way.
A lost GPU and a GPU in MIG mode are not selectable either (SAE Lab runs one rank per whole GPU).

A GPU held by SAE Lab jobs (queued, starting or running on it) is NOT busy: it may be selected and the
new job queues behind them, so the memory their ranks use counts as free. The queue (jobs/gpus.py)
says which jobs hold which GPU; this module only decides from a probe and those holders.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..config import ConfigError, TrainConfig
from .memory import estimate
from .types import GpuInfo, GpuProcess, Probe

GiB = 1024**3
FOREIGN_BUSY_BYTES = 1 * GiB
FOREIGN_BUSY_FRACTION = 0.10
MAX_COMBINATIONS = 20_000  # beyond this many GPU sets, pick greedily instead of trying them all


@dataclass
class JobRef:
    """An SAE Lab job that holds a GPU, as the pages name it."""

    id: int
    name: str
    status: str

    def describe(self) -> str:
        name = f" '{self.name}'" if self.name else ""
        return f"SAE Lab job {self.id}{name} ({self.status})"


@dataclass
class GpuStatus:
    index: int
    name: str | None
    uuid: str | None
    memory_total: int | None
    memory_used: int | None
    memory_free: int | None  # free once the SAE Lab jobs holding it are done (their memory counts as free)
    util_gpu: float | None
    busy: bool  # a process that is not an SAE Lab job is using it
    reason: str | None  # why it is busy or unavailable, naming the pid/user/command
    error: str | None = None  # lost GPU
    mig_enabled: bool = False
    holders: list[JobRef] = field(default_factory=list)  # live SAE Lab jobs holding it: a new job waits
    foreign_bytes: int = 0  # memory of processes that are not SAE Lab jobs
    links: list[int | None] | None = None  # NVML topology level to each GPU index (lower = closer)

    @property
    def available(self) -> bool:
        """Can be selected for a new job (which may queue behind the jobs holding it)."""
        return not self.busy and self.error is None and not self.mig_enabled

    @property
    def idle(self) -> bool:
        """Available and held by no SAE Lab job: a job placed here can start now."""
        return self.available and not self.holders

    @property
    def job_ids(self) -> list[int]:
        return [job.id for job in self.holders]

    @property
    def queue_note(self) -> str | None:
        """'queued behind SAE Lab job 12 'sweep' (running)' when jobs hold it; None when none does."""
        if not self.holders:
            return None
        return "queued behind " + ", ".join(job.describe() for job in self.holders)


def foreign_threshold(memory_total: int | None) -> int:
    if not memory_total:
        return FOREIGN_BUSY_BYTES
    return min(FOREIGN_BUSY_BYTES, int(FOREIGN_BUSY_FRACTION * memory_total))


# ---------------------------------------------------------------------------------------------
# Statuses
# ---------------------------------------------------------------------------------------------
def statuses_from(probe: Probe, holders: dict[int, list[JobRef]]) -> list[GpuStatus]:
    """The probe's GPUs with busy/reason decided; `holders` says which live SAE Lab jobs hold which GPU."""
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
        status.holders = list(holders.get(g.index, []))
        reasons = []
        foreign_reason, status.foreign_bytes = _foreign_use(g, bool(status.holders))
        if foreign_reason:
            reasons.append(foreign_reason)
        status.busy = bool(reasons)
        ours = sum(p.gpu_memory or 0 for p in (g.processes or []) if p.job_id is not None)
        if ours and status.memory_free is not None:
            status.memory_free += ours  # freed before a job queued behind ours starts
        if g.error:
            reasons.insert(0, f"unavailable: {g.error}")
        elif g.mig_enabled:
            reasons.append("MIG mode is on; SAE Lab runs one rank per whole GPU (disable MIG to use it)")
        status.reason = "; ".join(reasons) or None
        statuses.append(status)
    return statuses


def _foreign_use(g: GpuInfo, held_by_job: bool) -> tuple[str | None, int]:
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


def _describe_process(p: GpuProcess) -> str:
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
def recommend(required_bytes: int, count: int, statuses: Sequence[GpuStatus]) -> list[int]:
    """Up to `count` idle GPUs with at least `required_bytes` free each, most free memory first.

    For several GPUs, when NVML reports topology, the set whose farthest pair shares the closest
    link (same PCIe switch before same CPU socket before across sockets) wins; free memory breaks
    ties. Fewer than `count` indices come back when fewer GPUs qualify (none: an empty list)."""
    if count < 1:
        return []
    candidates = [s for s in statuses if s.idle and (s.memory_free or 0) >= required_bytes]
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
    best: Sequence[GpuStatus]
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
def validate(
    gpu_ids: Sequence[int],
    cfg: TrainConfig | None,
    statuses: Sequence[GpuStatus],
    d_in: int | None,
    need_bytes: int | None = None,
) -> list[str]:
    """Problems with running `cfg` on `gpu_ids` (NVML indices); an empty list means it can go. The memory
    fit is checked when the activations' width `d_in` is known, or against `need_bytes` per GPU (a job
    that is not a training, cfg None)."""
    ids = list(gpu_ids)
    if not ids:
        return ["select at least one GPU (or run the job on CPU processes)"]
    errors = []
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    errors += [f"GPU {i} is selected more than once" for i in duplicates]
    by_index = {s.index: s for s in statuses}
    for i in dict.fromkeys(ids):
        status = by_index.get(i)
        if status is None:
            errors.append(_missing_gpu(i, by_index))
        elif status.error or status.mig_enabled:
            errors.append(f"GPU {i} is not usable: {status.reason}")
        elif status.busy:
            errors.append(f"GPU {i} is busy: {status.reason}")
    world = len(set(ids))
    if cfg is not None:
        try:
            cfg.per_rank_batch(world, ranks="GPUs")
            if need_bytes is None and d_in is not None:
                need_bytes = estimate(cfg, world, d_in).total_bytes
        except ConfigError as exc:
            errors.append(f"{exc}, or another number of GPUs")
            return errors
    if need_bytes is not None:
        errors += _memory_errors(ids, need_bytes, world, by_index)
    return errors


def _missing_gpu(index: int, by_index: dict[int, GpuStatus]) -> str:
    if not by_index:
        return f"GPU {index} does not exist: no GPU was detected on this machine"
    known = ", ".join(str(i) for i in sorted(by_index))
    return f"GPU {index} does not exist (this machine has GPU {known})"


def _memory_errors(ids: list[int], need: int, world: int, by_index: dict[int, GpuStatus]) -> list[str]:
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
    "JobRef",
    "statuses_from",
    "recommend",
    "validate",
    "foreign_threshold",
    "FOREIGN_BUSY_BYTES",
    "FOREIGN_BUSY_FRACTION",
]
