"""GPUs through NVML: figures, processes (with user, command and SAE Lab job), and the host.

NVML is the only way to see every GPU and every process on it, including processes that are not
ours; `torch.cuda` sees neither. Rules kept here:

- `nvmlInit` runs once per process (`_session()`); a failure is remembered with its reason, so a
  CPU-only machine answers "no GPUs: <reason>" at once instead of retrying every second.
- Every NVML call is guarded. NotSupported (and other "this GPU cannot tell") becomes None, shown as
  n/a. A lost GPU (GpuIsLost, ResetRequired, or an Unknown error on its identity or memory) becomes an
  entry with `error` set while the other GPUs are still listed.
- The module is the one named by SAE_LAB_NVML_MODULE (default `pynvml`); tests point it at
  `tests.fakes.fake_pynvml`, which keeps the real error classes, so the code below is what runs on a
  real machine.

Index order. The index shown everywhere in SAE Lab (pages, Job.gpu_ids, the CLI) is NVML's, which
in practice is PCI bus order (nvidia-smi's numbering). CUDA by default numbers the fastest GPU
first, so a job must be started with CUDA_DEVICE_ORDER=PCI_BUS_ID and CUDA_VISIBLE_DEVICES naming
its GPUs. `cuda_visible_devices()` gives their UUIDs: a UUID names one physical GPU whatever the
ordering, and stays right even if the launcher itself runs under an outer CUDA_VISIBLE_DEVICES or
NVML's enumeration differs from bus order (NVML does not promise a stable order). Indices, with
PCI_BUS_ID order, name the same GPUs when every GPU is visible; they are the fallback when NVML has
no UUID. MIG instances are listed under their GPU; a GPU in MIG mode is not offered for jobs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

NVML_MODULE_ENV = "SAE_LAB_NVML_MODULE"
PID_START_TOLERANCE_S = 1.0  # psutil create_time vs the stored Job.pid_start_time
COMMAND_MAX_CHARS = 200

JobOfPid = Callable[[int], "int | None"]


# ---------------------------------------------------------------------------------------------
# What a probe returns
# ---------------------------------------------------------------------------------------------
@dataclass
class GpuProcess:
    pid: int
    gpu_memory: int | None  # bytes; None when NVML cannot tell (MIG, some containers)
    user: str | None = None  # None: the process is gone or hidden from us
    command: str | None = None
    job_id: int | None = None  # the SAE Lab job the process belongs to, if any
    kind: str = "compute"  # "compute" or "graphics"


@dataclass
class MigDevice:
    index: int
    uuid: str | None = None
    name: str | None = None
    memory_total: int | None = None
    memory_used: int | None = None
    memory_free: int | None = None


@dataclass
class GpuInfo:
    index: int  # NVML index = PCI bus order
    uuid: str | None = None
    name: str | None = None
    pci_bus_id: str | None = None
    memory_total: int | None = None  # bytes
    memory_used: int | None = None
    memory_free: int | None = None
    util_gpu: float | None = None  # percent
    util_mem: float | None = None
    temperature: float | None = None  # degrees C
    power_w: float | None = None
    power_limit_w: float | None = None
    fan: float | None = None  # percent
    clock_sm: int | None = None  # MHz
    clock_mem: int | None = None
    pcie_gen: int | None = None  # current link: an idle GPU downshifts it
    pcie_width: int | None = None
    pcie_gen_max: int | None = None  # what the link runs at under load (used for scaling predictions)
    pcie_width_max: int | None = None
    ecc_uncorrected: int | None = None  # volatile count since the driver loaded
    processes: list[GpuProcess] | None = field(default_factory=list)  # None: NVML cannot list them
    mig_enabled: bool | None = None  # None: not MIG-capable
    mig_devices: list[MigDevice] = field(default_factory=list)
    error: str | None = None  # set when the GPU is lost; the figures above are then mostly None


@dataclass
class HostInfo:
    hostname: str = ""
    cpu_percent: float | None = None  # whole machine, 0-100
    cpu_count: int | None = None
    ram_used: int | None = None  # total - available, bytes
    ram_total: int | None = None


@dataclass
class Probe:
    gpus: list[GpuInfo]
    reason: str | None  # why there are no GPUs (no driver, ...); None when NVML works
    host: HostInfo
    t: float  # Unix seconds
    driver_version: str | None = None
    # topology[i][j]: nvmlDeviceGetTopologyCommonAncestor level between GPUs i and j (0 = same board,
    # 10 = same PCIe switch, ... 50 = across CPU sockets); None when NVML does not report it.
    topology: list[list[int | None]] | None = None

    def gpu(self, index: int) -> GpuInfo | None:
        return next((g for g in self.gpus if g.index == index), None)

    def to_dict(self) -> dict:
        """Plain JSON-able data (hand-written: dataclasses.asdict deep-copies and costs a
        millisecond per probe, which the sampler pays every second)."""
        out = _shallow(self)
        out["host"] = _shallow(self.host)
        out["gpus"] = []
        for g in self.gpus:
            info = _shallow(g)
            info["processes"] = None if g.processes is None else [_shallow(p) for p in g.processes]
            info["mig_devices"] = [_shallow(m) for m in g.mig_devices]
            out["gpus"].append(info)
        out["topology"] = None if self.topology is None else [list(row) for row in self.topology]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Probe:
        gpus = []
        for g in data.get("gpus", []):
            g = dict(g)
            procs = g.pop("processes", [])
            migs = g.pop("mig_devices", [])
            info = GpuInfo(**_known(GpuInfo, g))
            info.processes = None if procs is None else [GpuProcess(**_known(GpuProcess, p)) for p in procs]
            info.mig_devices = [MigDevice(**_known(MigDevice, m)) for m in migs]
            gpus.append(info)
        return cls(
            gpus=gpus,
            reason=data.get("reason"),
            host=HostInfo(**_known(HostInfo, data.get("host", {}))),
            t=float(data.get("t", 0.0)),
            driver_version=data.get("driver_version"),
            topology=data.get("topology"),
        )


def _shallow(obj: Any) -> dict:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


def _known(cls: type, data: dict) -> dict:
    """Keys of `data` that `cls` has: a snapshot written by a newer version still loads."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


# ---------------------------------------------------------------------------------------------
# NVML session: initialised once per process
# ---------------------------------------------------------------------------------------------
@dataclass
class _Session:
    nvml: ModuleType | None
    reason: str | None = None
    driver_version: str | None = None
    topology: dict[tuple, list[list[int | None]] | None] = field(default_factory=dict)


_lock = threading.RLock()  # the sampler thread and a page may probe at once in one process
_session_state: _Session | None = None


def _session() -> _Session:
    global _session_state
    with _lock:
        if _session_state is None:
            _session_state = _open_session()
        return _session_state


def reset() -> None:
    """Forget the NVML session and caches (tests switching scenarios; a forked child)."""
    global _session_state
    with _lock:
        _session_state = None
        _proc_cache.clear()


def _open_session() -> _Session:
    name = os.environ.get(NVML_MODULE_ENV, "pynvml")
    try:
        nvml = importlib.import_module(name)
    except ImportError as exc:
        return _Session(None, f"NVML Python module {name!r} is not installed ({exc}); running without GPUs")
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError, or OSError from a broken library: never fatal
        return _Session(None, _init_failure_reason(nvml, exc))
    driver = _text(_optional(nvml, nvml.nvmlSystemGetDriverVersion))
    return _Session(nvml, None, driver)


def _init_failure_reason(nvml: ModuleType, exc: Exception) -> str:
    value = getattr(exc, "value", None)
    if value == getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", object()):
        return "no NVIDIA driver found (the NVML library libnvidia-ml is missing); running on CPU only"
    if value == getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", object()):
        return "the NVIDIA driver is installed but not loaded (see `nvidia-smi`); running on CPU only"
    if value == getattr(nvml, "NVML_ERROR_NO_PERMISSION", object()):
        return "no permission to use NVML (check /dev/nvidia* access); running on CPU only"
    return f"NVML failed to start: {exc}; running on CPU only"


# ---------------------------------------------------------------------------------------------
# Guarded NVML calls
# ---------------------------------------------------------------------------------------------
class _GpuGone(Exception):
    """The GPU stopped answering: its entry becomes an error, the others go on."""


def _gone_codes(nvml: ModuleType) -> set[int]:
    return {nvml.NVML_ERROR_GPU_IS_LOST, getattr(nvml, "NVML_ERROR_RESET_REQUIRED", -1)}


def _optional(nvml: ModuleType, fn: Callable, *args: Any, critical: bool = False) -> Any:
    """fn(*args), or None when this GPU cannot answer it (NotSupported, NoPermission, ...).

    A lost GPU raises _GpuGone. `critical` calls (handle, memory) also treat Unknown as lost:
    a GPU that cannot say how much memory it has is not usable."""
    try:
        return fn(*args)
    except nvml.NVMLError as exc:
        if exc.value in _gone_codes(nvml) or (critical and exc.value == nvml.NVML_ERROR_UNKNOWN):
            raise _GpuGone(str(exc)) from None
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _number(value: Any, scale: float = 1.0) -> float | None:
    return None if value is None else float(value) * scale


# ---------------------------------------------------------------------------------------------
# Probing
# ---------------------------------------------------------------------------------------------
def probe(job_of_pid: JobOfPid | None = None) -> Probe:
    """Every GPU's figures and processes, plus the host. Never raises for NVML trouble.

    `job_of_pid(pid)` names the SAE Lab job a process belongs to (see `job_of_pid_from_store`)."""
    with _lock:
        session = _session()
        host = host_info()
        if session.nvml is None:
            return Probe([], session.reason, host, time.time())
        nvml = session.nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:
            return Probe([], f"NVML could not count GPUs: {exc}", host, time.time(), session.driver_version)
        handles: dict[int, Any] = {}
        gpus = []
        for index in range(count):
            info, handle = _probe_gpu(nvml, index)
            gpus.append(info)
            if handle is not None and info.error is None:
                handles[index] = handle
        _attribute_processes(gpus, job_of_pid)
        topology = _topology(session, gpus, handles)
        return Probe(gpus, None, host, time.time(), session.driver_version, topology)


def _probe_gpu(nvml: ModuleType, index: int) -> tuple[GpuInfo, Any]:
    info = GpuInfo(index=index)
    handle = None
    try:
        handle = _optional(nvml, nvml.nvmlDeviceGetHandleByIndex, index, critical=True)
        if handle is None:
            raise _GpuGone("NVML returned no handle")
        _fill_identity(nvml, handle, info)
        _fill_figures(nvml, handle, info)
        info.processes = _gpu_processes(nvml, handle)
        _fill_mig(nvml, handle, info)
    except _GpuGone as exc:
        info.error = f"GPU {index} is not responding (NVML: {exc}); it may have fallen off the bus or need a reset"
    except Exception as exc:  # an NVML binding bug must not hide the other GPUs
        info.error = f"GPU {index} could not be read: {type(exc).__name__}: {exc}"
    return info, handle


def _fill_identity(nvml: ModuleType, handle: Any, info: GpuInfo) -> None:
    info.uuid = _text(_optional(nvml, nvml.nvmlDeviceGetUUID, handle))
    info.name = _text(_optional(nvml, nvml.nvmlDeviceGetName, handle))
    pci = _optional(nvml, nvml.nvmlDeviceGetPciInfo, handle)
    info.pci_bus_id = _text(getattr(pci, "busId", None)) if pci is not None else None
    memory = _optional(nvml, nvml.nvmlDeviceGetMemoryInfo, handle, critical=True)
    if memory is not None:
        info.memory_total, info.memory_used, info.memory_free = int(memory.total), int(memory.used), int(memory.free)


def _fill_figures(nvml: ModuleType, handle: Any, info: GpuInfo) -> None:
    util = _optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
    if util is not None:
        info.util_gpu, info.util_mem = float(util.gpu), float(util.memory)
    info.temperature = _number(_optional(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU))
    info.power_w = _number(_optional(nvml, nvml.nvmlDeviceGetPowerUsage, handle), 1e-3)  # mW -> W
    info.power_limit_w = _number(_optional(nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, handle), 1e-3)
    info.fan = _number(_optional(nvml, nvml.nvmlDeviceGetFanSpeed, handle))
    info.clock_sm = _optional(nvml, nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM)
    info.clock_mem = _optional(nvml, nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM)
    info.pcie_gen = _optional(nvml, nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle)
    info.pcie_width = _optional(nvml, nvml.nvmlDeviceGetCurrPcieLinkWidth, handle)
    info.pcie_gen_max = _optional(nvml, nvml.nvmlDeviceGetMaxPcieLinkGeneration, handle)
    info.pcie_width_max = _optional(nvml, nvml.nvmlDeviceGetMaxPcieLinkWidth, handle)
    info.ecc_uncorrected = _optional(
        nvml,
        nvml.nvmlDeviceGetTotalEccErrors,
        handle,
        nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
        nvml.NVML_VOLATILE_ECC,
    )


def _gpu_processes(nvml: ModuleType, handle: Any) -> list[GpuProcess] | None:
    """Compute and graphics processes; a pid in both lists (C+G) is listed once."""
    compute = _optional(nvml, nvml.nvmlDeviceGetComputeRunningProcesses, handle)
    graphics = _optional(nvml, nvml.nvmlDeviceGetGraphicsRunningProcesses, handle)
    if compute is None and graphics is None:
        return None
    seen: dict[int, GpuProcess] = {}
    for kind, plist in (("compute", compute or []), ("graphics", graphics or [])):
        for p in plist:
            used = getattr(p, "usedGpuMemory", None)
            if p.pid in seen:
                if used is not None and seen[p.pid].gpu_memory is None:
                    seen[p.pid].gpu_memory = int(used)
                continue
            seen[p.pid] = GpuProcess(pid=int(p.pid), gpu_memory=None if used is None else int(used), kind=kind)
    return list(seen.values())


def _fill_mig(nvml: ModuleType, handle: Any, info: GpuInfo) -> None:
    mode = _optional(nvml, nvml.nvmlDeviceGetMigMode, handle)
    if mode is None:
        return  # not MIG-capable (or the driver cannot tell)
    info.mig_enabled = bool(mode[0])
    if not info.mig_enabled:
        return
    slots = _optional(nvml, nvml.nvmlDeviceGetMaxMigDeviceCount, handle) or 0
    for slot in range(slots):
        mig_handle = _optional(nvml, nvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, slot)
        if mig_handle is None:
            continue  # an empty slot answers NotFound
        device = MigDevice(index=slot)
        device.uuid = _text(_optional(nvml, nvml.nvmlDeviceGetUUID, mig_handle))
        device.name = _text(_optional(nvml, nvml.nvmlDeviceGetName, mig_handle))
        memory = _optional(nvml, nvml.nvmlDeviceGetMemoryInfo, mig_handle)
        if memory is not None:
            device.memory_total, device.memory_used = int(memory.total), int(memory.used)
            device.memory_free = int(memory.free)
        info.mig_devices.append(device)


def _topology(session: _Session, gpus: list[GpuInfo], handles: dict[int, Any]) -> list[list[int | None]] | None:
    """Common-ancestor levels between every pair of GPUs, read once per set of GPUs (it is hardware)."""
    key = tuple((g.index, g.uuid) for g in gpus if g.index in handles)
    if key in session.topology:
        return session.topology[key]
    nvml = session.nvml
    fn = getattr(nvml, "nvmlDeviceGetTopologyCommonAncestor", None)
    n = len(gpus)
    matrix: list[list[int | None]] | None = [[None] * n for _ in range(n)]
    supported = False
    for i in handles:
        for j in handles:
            if fn is None or i >= j:
                continue
            try:
                level = _optional(nvml, fn, handles[i], handles[j])
            except _GpuGone:
                level = None
            if level is not None:
                matrix[i][j] = matrix[j][i] = int(level)
                supported = True
    if supported:
        for i in handles:
            matrix[i][i] = 0
    else:
        matrix = None
    session.topology[key] = matrix
    return matrix


# ---------------------------------------------------------------------------------------------
# Process attribution: user, command, SAE Lab job
# ---------------------------------------------------------------------------------------------
@dataclass
class _ProcFacts:
    create_time: float
    user: str | None
    command: str | None
    lineage: tuple[tuple[int, float], ...]  # (pid, create_time) of the process and its ancestors


_proc_cache: dict[int, _ProcFacts] = {}  # user/command/ancestry do not change for a live process


def process_facts(pid: int) -> _ProcFacts | None:
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
    facts = _ProcFacts(created, _safe(proc.username), _command_of(proc), _lineage(proc, created))
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


def _attribute_processes(gpus: Iterable[GpuInfo], job_of_pid: JobOfPid | None) -> None:
    seen = set()
    for info in gpus:
        for proc in info.processes or []:
            seen.add(proc.pid)
            facts = process_facts(proc.pid)
            if facts is not None:
                proc.user, proc.command = facts.user, facts.command
            if isinstance(job_of_pid, JobOfPidFromStore):
                proc.job_id = job_of_pid.job_of(facts)  # the facts just read: no second /proc lookup
            elif job_of_pid is not None:
                proc.job_id = job_of_pid(proc.pid)
    for pid in [p for p in _proc_cache if p not in seen]:
        del _proc_cache[pid]  # keep the cache to the processes currently on GPUs


class JobOfPidFromStore:
    """`job_of_pid` backed by the store: a pid belongs to a live job when that job's torchrun pid is
    the process itself or one of its ancestors, and the stored start time matches (a pid alone can
    be reused by an unrelated process after the job's torchrun exited)."""

    def __init__(self, live_jobs: dict[int, tuple[int, float | None]]):
        # live_jobs: job id -> (torchrun pid, its psutil create_time as stored)
        self.by_pid: dict[int, tuple[int, float]] = {
            pid: (job_id, started) for job_id, (pid, started) in live_jobs.items() if pid and started is not None
        }

    def __call__(self, pid: int) -> int | None:
        return self.job_of(process_facts(pid)) if self.by_pid else None

    def job_of(self, facts: _ProcFacts | None) -> int | None:
        if facts is None or not self.by_pid:
            return None
        for ancestor_pid, ancestor_started in facts.lineage:
            entry = self.by_pid.get(ancestor_pid)
            if entry is not None and abs(entry[1] - ancestor_started) <= PID_START_TOLERANCE_S:
                return entry[0]
        return None


def job_of_pid_from_store(engine: Any) -> JobOfPidFromStore:
    """Read the live jobs once; the returned callable maps a pid to its job id (or None)."""
    from sqlalchemy import select

    from .models import LIVE_STATUSES, Job

    # A Core query on a plain connection: the sampler runs this every second.
    query = select(Job.id, Job.pid, Job.pid_start_time).where(Job.status.in_(LIVE_STATUSES), Job.pid.is_not(None))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return JobOfPidFromStore({job_id: (pid, started) for job_id, pid, started in rows})


# ---------------------------------------------------------------------------------------------
# Host
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# CUDA device naming for jobs
# ---------------------------------------------------------------------------------------------
def cuda_visible_devices(gpu_ids: Iterable[int], probe_result: Probe | None = None) -> str:
    """CUDA_VISIBLE_DEVICES for the NVML-indexed `gpu_ids`: their UUIDs, in the given order.

    Set together with CUDA_DEVICE_ORDER=PCI_BUS_ID; then `cuda:0` in the job is the first GPU
    listed here. Falls back to the indices themselves when a UUID is unknown (PCI bus order makes
    them agree with NVML's)."""
    ids = [int(i) for i in gpu_ids]
    current = probe_result if probe_result is not None else probe()
    uuids = {g.index: g.uuid for g in current.gpus if g.error is None}
    if ids and all(uuids.get(i) for i in ids):
        return ",".join(uuids[i] for i in ids)
    return ",".join(str(i) for i in ids)


def nvml_index_of_uuid(uuid: str, probe_result: Probe) -> int | None:
    """The NVML index of the GPU with this UUID (torch's device properties carry the UUID too)."""
    wanted = uuid.lower().removeprefix("gpu-")
    for g in probe_result.gpus:
        if g.uuid and g.uuid.lower().removeprefix("gpu-") == wanted:
            return g.index
    return None


# ---------------------------------------------------------------------------------------------
# CLI: python -m sae_core gpus [--json]
# ---------------------------------------------------------------------------------------------
def format_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1024**3:.1f} GiB"


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


def _store_job_of_pid() -> JobOfPid | None:
    """Job attribution when this lab has a database; never creates one just to list GPUs."""
    home = Path(os.environ.get("SAE_LAB_HOME", "lab_data"))
    if not (home / "lab.db").exists():
        return None
    try:
        from . import db

        return job_of_pid_from_store(db.get_engine(home.resolve()))
    except Exception:
        return None


def cli_gpus(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_core gpus", description="List GPUs, processes and host.")
    parser.add_argument("--json", action="store_true", help="print the probe as JSON")
    args = parser.parse_args(argv)
    host_info()  # prime psutil's CPU counter so the reading below covers a real interval
    time.sleep(0.2)
    result = probe(_store_job_of_pid())
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_probe(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli_gpus(sys.argv[1:]))
