"""Processes on a GPU: who runs them (user, command), their ancestry, and which SAE Lab job they belong to.

A pid alone names a process only while it lives: pids are reused. A process is therefore identified by
(pid, start time) everywhere (`process_if_same`), and a job's processes are found from its leader's
(pid, start time) as stored in lab.db. Reading the store is the queue's business (jobs/gpus.py builds
the `JobIndex`); this module only matches processes against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psutil

from .types import GpuInfo

# psutil's create_time is derived from the boot time, which the kernel reports in whole seconds: the same
# process can read up to a second apart in two processes.
PID_START_TOLERANCE_S = 1.0
COMMAND_MAX_CHARS = 200


def process_if_same(pid: int | None, start_time: float | None) -> psutil.Process | None:
    """The live process with this pid AND this start time (a reused pid is someone else)."""
    if not pid or start_time is None:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if abs(proc.create_time() - start_time) > PID_START_TOLERANCE_S:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


@dataclass
class ProcessFacts:
    create_time: float
    user: str | None
    command: str | None
    lineage: tuple[tuple[int, float], ...]  # (pid, create_time) of the process and its ancestors


_proc_cache: dict[int, ProcessFacts] = {}  # user/command/ancestry do not change for a live process


def process_facts(pid: int) -> ProcessFacts | None:
    """User, command and ancestry of `pid`, cached while the same process (pid + start time) lives."""
    try:
        proc = psutil.Process(pid)
        created = proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        _proc_cache.pop(pid, None)
        return None
    cached = _proc_cache.get(pid)
    if cached is not None and cached.create_time == created:
        return cached
    facts = ProcessFacts(created, _safe(proc.username), _command_of(proc), _lineage(proc, created))
    _proc_cache[pid] = facts
    return facts


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (psutil.Error, OSError):
        return None


def _command_of(proc: psutil.Process) -> str | None:
    cmdline = _safe(proc.cmdline)
    text = " ".join(cmdline) if cmdline else _safe(proc.name)
    if text and len(text) > COMMAND_MAX_CHARS:
        text = text[: COMMAND_MAX_CHARS - 1] + "…"
    return text or None


def _lineage(proc: psutil.Process, created: float) -> tuple[tuple[int, float], ...]:
    chain = [(proc.pid, created)]
    for parent in _safe(proc.parents) or []:
        started = _safe(parent.create_time)
        if started is not None:
            chain.append((parent.pid, started))
    return tuple(chain)


def attribute_processes(gpus: Iterable[GpuInfo], job_index: JobIndex | None) -> None:
    """Fill in each GPU process's user, command and SAE Lab job (when `job_index` is given)."""
    seen = set()
    for info in gpus:
        for proc in info.processes or []:
            seen.add(proc.pid)
            facts = process_facts(proc.pid)
            if facts is not None:
                proc.user, proc.command = facts.user, facts.command
            if job_index is not None:
                proc.job_id = job_index.job_of(facts)  # the facts just read: no second /proc lookup
    for pid in [p for p in _proc_cache if p not in seen]:
        del _proc_cache[pid]  # keep the cache to the processes currently on GPUs


def forget_processes() -> None:
    """Drop the cache of process facts (tests switching scenarios; a forked child)."""
    _proc_cache.clear()


class JobIndex:
    """Which SAE Lab job a process belongs to: the job whose leader (torchrun's wrapper, as stored with
    its start time) is the process itself or one of its ancestors."""

    def __init__(self, leaders: dict[int, tuple[int | None, float | None]]):
        # leaders: job id -> (leader pid, its psutil create_time as stored)
        self.by_pid: dict[int, tuple[int, float]] = {
            pid: (job_id, started) for job_id, (pid, started) in leaders.items() if pid and started is not None
        }

    def job_of(self, facts: ProcessFacts | None) -> int | None:
        if facts is None or not self.by_pid:
            return None
        for ancestor_pid, ancestor_started in facts.lineage:
            entry = self.by_pid.get(ancestor_pid)
            if entry is not None and abs(entry[1] - ancestor_started) <= PID_START_TOLERANCE_S:
                return entry[0]
        return None
