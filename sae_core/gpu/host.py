"""The host's figures beside the GPUs: CPU utilization and RAM (psutil)."""

from __future__ import annotations

import socket

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
