"""The host's figures beside the GPUs: CPU utilization and RAM (psutil), and the lab's CPU budget."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import psutil

from .types import HostInfo

_cpu_primed = False


def host_info() -> HostInfo:
    """CPU utilization since the previous call (None on the very first call of a process) and RAM."""
    global _cpu_primed
    cpu = psutil.cpu_percent(interval=None)
    cpu_value = cpu if _cpu_primed else None  # psutil's first reading has no interval behind it
    _cpu_primed = True
    memory = psutil.virtual_memory()
    return HostInfo(
        hostname=socket.gethostname(),
        cpu_percent=cpu_value,
        cpu_count=psutil.cpu_count(),
        ram_used=int(memory.total - memory.available),
        ram_total=int(memory.total),
    )


def available_ram() -> int:
    """Bytes of RAM a new process could use now (psutil's `available`: free plus reclaimable cache)."""
    return int(psutil.virtual_memory().available)


CPU_BUDGET_ENV = "SAE_LAB_CPU_BUDGET"


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's limit, not the
    machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity call on this platform
        return os.cpu_count() or 1


def cpu_budget(env: Mapping[str, str] = os.environ) -> int:
    """How many CPU processes the lab's jobs may run at once: SAE_LAB_CPU_BUDGET when it is set, else the
    usable cores. The gate refuses a CPU job wider than this; the queue runs CPU jobs side by side within it.
    ValueError (naming the variable) for a value that is not a whole number of 1 or more."""
    raw = env.get(CPU_BUDGET_ENV, "").strip()
    if not raw:
        return usable_cores()
    if raw.isdecimal() and int(raw) >= 1:
        return int(raw)
    raise ValueError(f"{CPU_BUDGET_ENV}: must be a whole number of processes, 1 or more (got {raw[:40]!r})")
