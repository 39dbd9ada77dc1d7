"""`python -m sae_core gpus [--json]`: GPUs, their processes (with user, command and SAE Lab job), the host."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from .. import db
from ..files import DATABASE_FILE
from ..gpu.host import host_info
from ..gpu.nvml import probe
from ..gpu.processes import JobIndex
from ..gpu.types import Probe
from ..jobs.gpus import job_index
from ..text import format_bytes


def _na(value: Any, fmt: str = "{}") -> str:
    return "n/a" if value is None else fmt.format(value)


def format_probe(p: Probe) -> str:
    lines = []
    host = p.host
    lines.append(
        f"host {host.hostname}: CPU {_na(host.cpu_percent, '{:.0f}%')} of {_na(host.cpu_count)} cores, "
        f"RAM {format_bytes(host.ram_used)} / {format_bytes(host.ram_total)}"
    )
    if not p.gpus:
        lines.append(f"no GPUs: {p.reason or 'NVML lists none'}")
        return "\n".join(lines)
    lines.append(f"driver {p.driver_version or 'n/a'}")
    for g in p.gpus:
        if g.error:
            lines.append(f"GPU {g.index}: ERROR {g.error}")
            continue
        power = f"{_na(g.power_w, '{:.0f}')}/{_na(g.power_limit_w, '{:.0f}')} W"
        mig = " [MIG]" if g.mig_enabled else ""
        lines.append(
            f"GPU {g.index}: {g.name or 'n/a'}{mig} | mem {format_bytes(g.memory_used)} / {format_bytes(g.memory_total)}"
            f" | util {_na(g.util_gpu, '{:.0f}%')} | {_na(g.temperature, '{:.0f}°C')} | {power}"
            f" | fan {_na(g.fan, '{:.0f}%')} | PCIe {_na(g.pcie_gen)}x{_na(g.pcie_width)}"
        )
        for m in g.mig_devices:
            lines.append(
                f"    MIG {m.index}: {m.name or 'n/a'} {format_bytes(m.memory_used)} / {format_bytes(m.memory_total)}"
            )
        if g.processes is None:
            lines.append("    processes: n/a (NVML cannot list them)")
        for proc in g.processes or []:
            job = f" [SAE Lab job {proc.job_id}]" if proc.job_id is not None else ""
            lines.append(
                f"    pid {proc.pid} {proc.user or '?'} {format_bytes(proc.gpu_memory)} "
                f"{proc.command or '(gone or hidden)'}{job}"
            )
    return "\n".join(lines)


def _store_job_index() -> JobIndex | None:
    """Job attribution when this lab has a database; never creates one just to list GPUs."""
    home = Path(os.environ.get("SAE_LAB_HOME", "lab_data"))
    if not (home / DATABASE_FILE).exists():
        return None
    try:
        return job_index(db.get_engine(home.resolve()))
    except Exception:  # an unreadable lab.db must not stop GPUs from being listed
        return None


def cli_gpus(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_core gpus", description="List GPUs, processes and host.")
    parser.add_argument("--json", action="store_true", help="print the probe as JSON")
    args = parser.parse_args(argv)
    host_info()  # prime psutil's CPU counter so the reading below covers a real interval
    time.sleep(0.2)
    result = probe(_store_job_index())
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_probe(result))
    return 0
