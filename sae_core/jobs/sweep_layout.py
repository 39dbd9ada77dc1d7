"""How a sweep's members share its ranks, as the gate decides it (no torch): "batch" (every rank trains every member
on its share of each batch) or "members" (member i on rank i % ranks, each on whole batches).

A layout the sweep asks for is checked as asked; "auto" takes "batch" on one rank, and on several "batch" when it
fits, else "members" when it fits. What must fit is the whole group on each GPU (the fullest one's estimate
against the least free memory of the chosen GPUs), or for CPU processes the job's host RAM.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..config import ConfigError
from ..gpu.availability import GpuStatus
from ..gpu.host import available_ram
from ..gpu.memory import GiB, StreamSource, members_on_ranks, sweep_estimate, sweep_host_bytes
from ..sweep import Placement, Sweep
from .gate import Problem, Verdict

LAYOUTS: tuple[Placement, ...] = ("batch", "members")


def choose(
    sweep: Sweep,
    count: int,
    d_in: int | None,
    verdict: Verdict,
    statuses: Sequence[GpuStatus],
    stream: StreamSource | None = None,
) -> Placement | None:
    """The layout the sweep runs in on `count` ranks (a note says which and its figure), or None with the
    reasons in `verdict.problems`. Without the data's width (`d_in` None) the memory is not checked; a sweep
    streamed from a model counts the model on every rank (`stream`)."""
    on_gpus = bool(verdict.gpus)
    if sweep.placement in LAYOUTS:
        candidates: tuple[Placement, ...] = (sweep.placement,)
    else:
        candidates = ("batch",) if count == 1 else LAYOUTS
    reasons = {layout: why for layout in candidates if (why := cannot_run(sweep, count, layout, on_gpus))}
    runnable = [layout for layout in candidates if layout not in reasons]
    if not runnable:
        verdict.problems += list(reasons.values())
        return None
    if d_in is None:
        return runnable[0]
    needs = {layout: need_bytes(sweep, count, d_in, layout, on_gpus, stream) for layout in runnable}
    room, where = _room(verdict, statuses)
    for layout in runnable:
        if room is None or needs[layout] <= room:
            verdict.notes.append(describe(sweep, count, layout, needs[layout], on_gpus))
            return layout
    verdict.problems.append(_refusal(needs, reasons, room, where, on_gpus, sweep.placement))
    return None


def cannot_run(sweep: Sweep, count: int, layout: Placement, on_gpus: bool) -> Problem | None:
    """Why `layout` cannot run the sweep on `count` ranks at all (whatever the memory), or None."""
    unit = "GPUs" if on_gpus else "processes"
    if layout == "members" and count > len(sweep.members):
        message = (
            f"placement: members gives each of the {count} {unit} its own members, but the sweep has "
            f"{len(sweep.members)}, so {count - len(sweep.members)} would idle; use at most {len(sweep.members)} "
            f"{unit}, or placement batch"
        )
        return Problem("placement", message)
    try:
        for member in sweep.members:
            member.config.per_rank_batch(count if layout == "batch" else 1, ranks=unit)
    except ConfigError as exc:
        return Problem("batch_size", f"placement {layout}: {exc}")
    return None


def need_bytes(
    sweep: Sweep, count: int, d_in: int, layout: Placement, on_gpus: bool, stream: StreamSource | None = None
) -> int:
    """What must fit: per GPU the fullest rank's estimate; on CPU processes the job's host RAM."""
    if on_gpus:
        return sweep_estimate(sweep, count, d_in, layout, stream).total_bytes
    return sweep_host_bytes(sweep, count, d_in, layout, stream=stream)


def _room(verdict: Verdict, statuses: Sequence[GpuStatus]) -> tuple[int | None, str]:
    """The least free memory of the chosen GPUs (and which), or the host's available RAM."""
    if not verdict.gpus:
        return available_ram(), "this machine"
    known = [s for s in statuses if s.index in verdict.gpus and s.error is None and s.memory_free is not None]
    if not known:
        return None, ""
    least = min(known, key=lambda s: (s.memory_free or 0, s.index))
    return least.memory_free, f"GPU {least.index}"


def _spread(sweep: Sweep, count: int) -> str:
    sizes = {len(group) for group in members_on_ranks(len(sweep.members), count)}
    return "–".join(str(n) for n in sorted(sizes))


def describe(sweep: Sweep, count: int, layout: Placement, need: int, on_gpus: bool) -> str:
    """The gate's note: 'sweep placement: members (4 members on 2 GPUs, 2 per GPU; ~3.1 GiB per GPU)'."""
    unit = "GPU" if on_gpus else "process"
    units = f"{count} {unit}{'s' if count > 1 and on_gpus else 'es' if count > 1 else ''}"
    figure = f"~{need / GiB:.1f} GiB per GPU" if on_gpus else f"~{need / GiB:.1f} GiB of RAM in all"
    members = f"{len(sweep.members)} member{'s' if len(sweep.members) > 1 else ''}"
    if layout == "batch":
        tokens = sweep.shared.batch_size // count
        return f"sweep placement: batch ({members} on each of {units}, {tokens:,} tokens per {unit} per step; {figure})"
    return f"sweep placement: members ({members} on {units}, {_spread(sweep, count)} per {unit}; {figure})"


def _refusal(
    needs: dict[Placement, int], reasons: dict[Placement, Problem], room: int | None, where: str, on_gpus: bool,
    asked: str,
) -> Problem:  # fmt: skip
    field_name = "gpus" if on_gpus else "cpu_procs"
    per = "per GPU" if on_gpus else "of RAM"
    figures = [f"placement {layout} needs about {need / GiB:.1f} GiB {per}" for layout, need in needs.items()]
    figures += [f"placement {layout} cannot run here ({reason.message})" for layout, reason in reasons.items()]
    has = f"{where} has {(room or 0) / GiB:.1f} GiB {'free' if on_gpus else 'available'}"
    more = "more GPUs or GPUs with more free memory" if on_gpus else "more RAM"
    other = "" if asked == "auto" else ", placement auto"
    message = (
        f"{field_name}: the sweep does not fit: {'; '.join(figures)}, but {has}; choose {more}{other}, or fewer or "
        "smaller members"
    )
    return Problem(field_name, message)
