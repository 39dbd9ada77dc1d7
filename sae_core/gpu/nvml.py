"""GPUs through NVML: every GPU's figures and processes, read by guarded calls that never raise.

NVML is the only way to see every GPU and every process on it, including processes that are not
ours; `torch.cuda` sees neither. Rules kept here:

- `nvmlInit` runs once per process (`_session()`); a failure is remembered with its reason, so a
  CPU-only machine answers "no GPUs: <reason>" at once instead of retrying every second.
- Every NVML call is guarded. NotSupported (and other "this GPU cannot tell") becomes None, shown as
  n/a. A lost GPU (GpuIsLost, ResetRequired, or an Unknown error on its identity or memory) becomes an
  entry with `error` set while the other GPUs are still listed.
- The module is the one named by SAE_LAB_NVML_MODULE (default `pynvml`): a module name, or the path
  of a .py file (so that a test's fake reaches processes that cannot import the tests package). The
  fake keeps the real error classes, so the code below is what runs on a real machine.

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

import importlib
import importlib.util
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .host import host_info
from .processes import JobIndex, attribute_processes, forget_processes
from .types import GpuInfo, GpuProcess, MigDevice, Probe

NVML_MODULE_ENV = "SAE_LAB_NVML_MODULE"


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
        forget_processes()


def _import_nvml(name: str) -> ModuleType:
    """The NVML module: by name, or from a .py file's path (a test's fake in another process)."""
    if not name.endswith(".py"):
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location("sae_lab_nvml_module", name)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {name}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _open_session() -> _Session:
    name = os.environ.get(NVML_MODULE_ENV, "pynvml")
    try:
        nvml = _import_nvml(name)
    except (ImportError, OSError) as exc:
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


def probe(job_index: JobIndex | None = None) -> Probe:
    """Every GPU's figures and processes, plus the host. Never raises for NVML trouble.

    `job_index` names the SAE Lab job each process belongs to (the queue builds it: jobs/gpus.py)."""
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
        attribute_processes(gpus, job_index)
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
    levels: list[list[int | None]] = [[None] * n for _ in range(n)]
    supported = False
    for i in handles:
        for j in handles:
            if nvml is None or fn is None or i >= j:
                continue
            try:
                level = _optional(nvml, fn, handles[i], handles[j])
            except _GpuGone:
                level = None
            if level is not None:
                levels[i][j] = levels[j][i] = int(level)
                supported = True
    for i in handles:
        levels[i][i] = 0
    matrix = levels if supported else None
    session.topology[key] = matrix
    return matrix


def cuda_visible_devices(gpu_ids: Iterable[int], probe_result: Probe | None = None) -> str:
    """CUDA_VISIBLE_DEVICES for the NVML-indexed `gpu_ids`: their UUIDs, in the given order.

    Set together with CUDA_DEVICE_ORDER=PCI_BUS_ID; then `cuda:0` in the job is the first GPU
    listed here. Falls back to the indices themselves when a UUID is unknown (PCI bus order makes
    them agree with NVML's)."""
    ids = [int(i) for i in gpu_ids]
    current = probe_result if probe_result is not None else probe()
    uuids = {g.index: g.uuid for g in current.gpus if g.error is None}
    names = [uuids.get(i) for i in ids]
    if ids and all(names):
        return ",".join(str(name) for name in names)
    return ",".join(str(i) for i in ids)


def nvml_index_of_uuid(uuid: str, probe_result: Probe) -> int | None:
    """The NVML index of the GPU with this UUID (torch's device properties carry the UUID too)."""
    wanted = uuid.lower().removeprefix("gpu-")
    for g in probe_result.gpus:
        if g.uuid and g.uuid.lower().removeprefix("gpu-") == wanted:
            return g.index
    return None
