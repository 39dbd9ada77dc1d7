"""A stand-in for the `pynvml` module, driven by a scenario, for machines without an NVIDIA driver.

`sae_core.gpu.nvml` imports the module named by `SAE_LAB_NVML_MODULE` (default `pynvml`); point it here
(`tests.fakes.fake_pynvml` in this process, this file's path in another) and the real probing code runs
against a described set of GPUs. Only the
NVML functions are replaced: the error classes and constants are the real ones from nvidia-ml-py, so
`except pynvml.NVMLError_NotSupported` and friends are exercised exactly as on a real machine.

Where the scenario comes from, in order:
1. `set_scenario(scn)` in this process (tests, AppTest pages);
2. the JSON file named by `SAE_LAB_FAKE_GPUS` (other processes: the launcher daemon, streamlit, benches).
   The file is re-read when it changes, so a test can turn a GPU busy under a running daemon.

A scenario is plain JSON-able data. Build one with `scenario(...)`, `gpu(...)`, `process(...)`:

    scn = scenario(n_gpus=8)                                   # eight idle 80 GiB H100s
    scn = scenario(n_gpus=2, overrides={1: {"memory_used": 79 * GiB}})   # GPU 1 nearly full
    scn = scenario(n_gpus=1, overrides={0: {"processes": [process(pid, 2 * GiB)]}})
    scn = scenario(n_gpus=4, overrides={2: {"lost": "GpuIsLost"}})
    scn = no_driver()                                          # nvmlInit raises LibraryNotFound
    write_scenario(tmp_path / "gpus.json", scn)                # then set SAE_LAB_FAKE_GPUS to it

Per-GPU keys (see `gpu()` for defaults): name, uuid, pci_bus_id, memory_total, memory_used (None =
sum of its processes), util_gpu, util_mem, temperature, power_w, power_limit_w, fan, clock_sm,
clock_mem, pcie_gen, pcie_width, ecc_uncorrected, mig_mode (None = not MIG-capable), mig_devices,
processes, not_supported (field names whose NVML call raises NotSupported), lost (None, "GpuIsLost":
the handle cannot be obtained, or "Unknown": every query on the handle fails).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml as _real

# The real error classes (NVMLError, NVMLError_NotSupported, ...) and NVML_* constants.
for _name in dir(_real):
    if _name.startswith(("NVML_", "NVMLError")):
        globals()[_name] = getattr(_real, _name)
NVMLError = _real.NVMLError

SCENARIO_ENV = "SAE_LAB_FAKE_GPUS"
MODULE_NAME = "tests.fakes.fake_pynvml"  # the value for SAE_LAB_NVML_MODULE in this process
MODULE_FILE = str(Path(__file__).resolve())  # ... and in other processes, which cannot import `tests`
GiB = 1024**3
MiB = 1024**2

_INIT_ERRORS = {
    "LibraryNotFound": _real.NVML_ERROR_LIBRARY_NOT_FOUND,
    "DriverNotLoaded": _real.NVML_ERROR_DRIVER_NOT_LOADED,
    "NoPermission": _real.NVML_ERROR_NO_PERMISSION,
}
_LOST_ERRORS = {"GpuIsLost": _real.NVML_ERROR_GPU_IS_LOST, "Unknown": _real.NVML_ERROR_UNKNOWN}

# Levels of nvmlDeviceGetTopologyCommonAncestor: smaller is closer.
TOPO_SINGLE = _real.NVML_TOPOLOGY_SINGLE  # same PCIe switch
TOPO_NODE = _real.NVML_TOPOLOGY_NODE  # same NUMA node / CPU socket
TOPO_SYSTEM = _real.NVML_TOPOLOGY_SYSTEM  # across sockets


# ---------------------------------------------------------------------------------------------
# Scenario builders
# ---------------------------------------------------------------------------------------------
def process(pid: int, used_memory: int | None, kind: str = "compute", mig: int | None = None) -> dict:
    """A process on a GPU. `used_memory` None = NVML cannot tell (as under MIG or WDDM)."""
    return {"pid": int(pid), "used_memory": used_memory, "kind": kind, "mig": mig}


def gpu(index: int = 0, **overrides: Any) -> dict:
    """One GPU with an idle H100 SXM's figures; any key can be overridden."""
    spec = {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": f"GPU-fa4e0000-0000-4000-8000-{index:012d}",
        "pci_bus_id": f"00000000:{0x18 + 0x10 * index:02X}:00.0",
        "memory_total": 80 * GiB,
        "memory_used": None,
        "util_gpu": 0,
        "util_mem": 0,
        "temperature": 33,
        "power_w": 70.0,
        "power_limit_w": 700.0,
        "fan": 0,
        "clock_sm": 345,
        "clock_mem": 2619,
        "pcie_gen": 5,
        "pcie_width": 16,
        "ecc_uncorrected": 0,
        "mig_mode": 0,
        "mig_devices": [],
        "processes": [],
        "not_supported": ["fan"],  # SXM boards have no fan NVML can read
        "lost": None,
    }
    unknown = set(overrides) - set(spec)
    if unknown:
        raise KeyError(f"unknown GPU keys {sorted(unknown)}; allowed: {sorted(spec)}")
    spec.update(overrides)
    return spec


def mig_device(index: int, parent: int = 0, memory_total: int = 10 * GiB, memory_used: int = 0) -> dict:
    return {
        "uuid": f"MIG-0000{parent:04d}-0000-4000-8000-{index:012d}",
        "name": "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
        "memory_total": memory_total,
        "memory_used": memory_used,
    }


def dgx_topology(n_gpus: int) -> list[list[int]]:
    """Pairs share a PCIe switch, each half of the GPUs shares a CPU socket, halves talk across sockets."""
    half = max(1, n_gpus // 2)
    matrix = []
    for i in range(n_gpus):
        row = []
        for j in range(n_gpus):
            if i == j:
                row.append(_real.NVML_TOPOLOGY_INTERNAL)
            elif i // 2 == j // 2:
                row.append(TOPO_SINGLE)
            elif i // half == j // half:
                row.append(TOPO_NODE)
            else:
                row.append(TOPO_SYSTEM)
        matrix.append(row)
    return matrix


def scenario(
    n_gpus: int = 8,
    *,
    overrides: dict[int, dict] | None = None,
    topology: str | list[list[int]] | None = None,
    driver_version: str = "550.54.15",
    init_error: str | None = None,
    **common: Any,
) -> dict:
    """`n_gpus` identical GPUs (keys of `gpu()` in `common`), with per-index `overrides`.

    topology: None (NVML reports NotSupported), "dgx" (see `dgx_topology`) or an explicit matrix.
    init_error: None, "LibraryNotFound", "DriverNotLoaded" or "NoPermission" (raised by nvmlInit).
    """
    overrides = overrides or {}
    bad = [i for i in overrides if not 0 <= i < n_gpus]
    if bad:
        raise IndexError(f"overrides for GPUs {bad} outside 0..{n_gpus - 1}")
    gpus = [gpu(i, **{**common, **overrides.get(i, {})}) for i in range(n_gpus)]
    if init_error is not None and init_error not in _INIT_ERRORS:
        raise ValueError(f"init_error {init_error!r}; allowed: {sorted(_INIT_ERRORS)}")
    if topology == "dgx":
        topology = dgx_topology(n_gpus)
    return {"driver_version": driver_version, "init_error": init_error, "topology": topology, "gpus": gpus}


def no_driver() -> dict:
    """No NVIDIA driver installed: nvmlInit raises NVMLError_LibraryNotFound."""
    return scenario(0, init_error="LibraryNotFound")


def write_scenario(path: str | Path, scn: dict | None = None, **kwargs: Any) -> Path:
    """Write `scn` (or `scenario(**kwargs)`) as JSON for `SAE_LAB_FAKE_GPUS`; atomic, so a reader never
    sees half a file."""
    path = Path(path)
    data = scn if scn is not None else scenario(**kwargs)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
    return path


def env_for(path: str | Path) -> dict[str, str]:
    """Environment variables that make another process's `sae_core.gpu.nvml` use this fake and `path`."""
    return {"SAE_LAB_NVML_MODULE": MODULE_FILE, SCENARIO_ENV: str(path)}


# ---------------------------------------------------------------------------------------------
# Scenario state of this process
# ---------------------------------------------------------------------------------------------
_state: dict[str, Any] = {"scenario": None, "file": None, "file_mtime": None, "initialized": False, "init_calls": 0}


def set_scenario(scn: dict | None) -> None:
    """Use `scn` in this process (None: go back to the file named by SAE_LAB_FAKE_GPUS)."""
    _state["scenario"] = scn
    _state["file"] = None
    _state["file_mtime"] = None


def init_calls() -> int:
    """How many times nvmlInit was called in this process (a test checks it is once)."""
    return _state["init_calls"]


def reset() -> None:
    """Forget everything: scenario, initialisation, counters."""
    _state.update(scenario=None, file=None, file_mtime=None, initialized=False, init_calls=0)


def current_scenario(reload: bool = False) -> dict:
    """The scenario in force. The file is checked for changes only when `reload` (nvmlInit and
    nvmlDeviceGetCount, i.e. once per probe), not on every NVML call."""
    if _state["scenario"] is not None and (_state["file"] is None or not reload):
        return _state["scenario"]
    path = os.environ.get(SCENARIO_ENV)
    if not path:
        raise RuntimeError(f"fake_pynvml has no scenario: call set_scenario() or set {SCENARIO_ENV} to a JSON file")
    st = os.stat(path)
    # write_scenario replaces the file, so the inode changes even when two writes share an mtime tick.
    version = (st.st_ino, st.st_mtime_ns, st.st_size)
    if _state["file"] != path or _state["file_mtime"] != version:
        _state["scenario"] = json.loads(Path(path).read_text())
        _state["file"], _state["file_mtime"] = path, version
    return _state["scenario"]


def _gpus() -> list[dict]:
    if not _state["initialized"]:
        raise NVMLError(_real.NVML_ERROR_UNINITIALIZED)
    return current_scenario()["gpus"]


class _Handle:
    __slots__ = ("index", "mig")

    def __init__(self, index: int, mig: int | None = None):
        self.index, self.mig = index, mig

    def __repr__(self) -> str:
        return f"<fake nvmlDevice {self.index}{'' if self.mig is None else f' mig {self.mig}'}>"


def _spec(handle: _Handle, field: str | None = None) -> dict:
    """The GPU behind `handle`; raises like NVML for lost GPUs and unsupported fields."""
    if not isinstance(handle, _Handle):
        raise NVMLError(_real.NVML_ERROR_INVALID_ARGUMENT)
    spec = _gpus()[handle.index]
    if spec.get("lost"):
        raise NVMLError(_LOST_ERRORS[spec["lost"]])
    if field is not None and field in spec.get("not_supported", ()):
        raise NVMLError(_real.NVML_ERROR_NOT_SUPPORTED)
    return spec


def _mig_spec(handle: _Handle) -> dict:
    return _spec(handle)["mig_devices"][handle.mig]


def _memory_used(spec: dict) -> int:
    if spec.get("memory_used") is not None:
        return int(spec["memory_used"])
    return sum(p["used_memory"] or 0 for p in spec.get("processes", ()))


# ---------------------------------------------------------------------------------------------
# The NVML functions sae_core.gpus calls
# ---------------------------------------------------------------------------------------------
def nvmlInit() -> None:
    _state["init_calls"] += 1
    error = current_scenario(reload=True).get("init_error")
    if error:
        raise NVMLError(_INIT_ERRORS[error])
    _state["initialized"] = True


def nvmlShutdown() -> None:
    _state["initialized"] = False


def nvmlSystemGetDriverVersion() -> str:
    _gpus()
    return current_scenario().get("driver_version", "")


def nvmlDeviceGetCount() -> int:
    _gpus()
    return len(current_scenario(reload=True)["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    gpus = _gpus()
    if not 0 <= index < len(gpus):
        raise NVMLError(_real.NVML_ERROR_INVALID_ARGUMENT)
    if gpus[index].get("lost") == "GpuIsLost":
        raise NVMLError(_real.NVML_ERROR_GPU_IS_LOST)
    return _Handle(index)


def nvmlDeviceGetIndex(handle: _Handle) -> int:
    _spec(handle)
    return handle.index


def nvmlDeviceGetName(handle: _Handle) -> str:
    return _mig_spec(handle)["name"] if handle.mig is not None else _spec(handle, "name")["name"]


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    return _mig_spec(handle)["uuid"] if handle.mig is not None else _spec(handle, "uuid")["uuid"]


def nvmlDeviceGetPciInfo(handle: _Handle) -> SimpleNamespace:
    spec = _spec(handle, "pci_bus_id")
    # The real structure carries bytes; sae_core.gpus must decode it.
    return SimpleNamespace(busId=spec["pci_bus_id"].encode(), busIdLegacy=spec["pci_bus_id"][4:].encode())


def nvmlDeviceGetMemoryInfo(handle: _Handle, version: Any = None) -> SimpleNamespace:
    if handle.mig is not None:
        mig = _mig_spec(handle)
        total, used = int(mig["memory_total"]), int(mig["memory_used"])
    else:
        spec = _spec(handle, "memory")
        total, used = int(spec["memory_total"]), _memory_used(spec)
    return SimpleNamespace(total=total, used=used, free=max(0, total - used))


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> SimpleNamespace:
    spec = _spec(handle, "util")
    if spec.get("mig_mode") == 1:  # NVML does not report utilization of a GPU in MIG mode
        raise NVMLError(_real.NVML_ERROR_NOT_SUPPORTED)
    return SimpleNamespace(gpu=spec["util_gpu"], memory=spec["util_mem"])


def nvmlDeviceGetTemperature(handle: _Handle, sensor: int) -> int:
    return int(_spec(handle, "temperature")["temperature"])


def nvmlDeviceGetPowerUsage(handle: _Handle) -> int:
    return int(round(_spec(handle, "power_w")["power_w"] * 1000))  # milliwatts, like NVML


def nvmlDeviceGetEnforcedPowerLimit(handle: _Handle) -> int:
    return int(round(_spec(handle, "power_limit_w")["power_limit_w"] * 1000))


def nvmlDeviceGetFanSpeed(handle: _Handle) -> int:
    return int(_spec(handle, "fan")["fan"])


def nvmlDeviceGetClockInfo(handle: _Handle, clock_type: int) -> int:
    if clock_type == _real.NVML_CLOCK_SM:
        return int(_spec(handle, "clock_sm")["clock_sm"])
    if clock_type == _real.NVML_CLOCK_MEM:
        return int(_spec(handle, "clock_mem")["clock_mem"])
    raise NVMLError(_real.NVML_ERROR_INVALID_ARGUMENT)


def nvmlDeviceGetCurrPcieLinkGeneration(handle: _Handle) -> int:
    return int(_spec(handle, "pcie_gen")["pcie_gen"])


def nvmlDeviceGetCurrPcieLinkWidth(handle: _Handle) -> int:
    return int(_spec(handle, "pcie_width")["pcie_width"])


def nvmlDeviceGetMaxPcieLinkGeneration(handle: _Handle) -> int:
    spec = _spec(handle, "pcie_gen")
    return int(spec.get("pcie_gen_max", spec["pcie_gen"]))


def nvmlDeviceGetMaxPcieLinkWidth(handle: _Handle) -> int:
    spec = _spec(handle, "pcie_width")
    return int(spec.get("pcie_width_max", spec["pcie_width"]))


def nvmlDeviceGetTotalEccErrors(handle: _Handle, error_type: int, counter_type: int) -> int:
    return int(_spec(handle, "ecc_uncorrected")["ecc_uncorrected"])


def _processes(handle: _Handle, kind: str) -> list[SimpleNamespace]:
    spec = _spec(handle, "processes")
    out = []
    for p in spec.get("processes", ()):
        if p.get("kind", "compute") != kind or (handle.mig is not None and p.get("mig") != handle.mig):
            continue
        out.append(
            SimpleNamespace(
                pid=p["pid"],
                usedGpuMemory=p["used_memory"],
                gpuInstanceId=0xFFFFFFFF if p.get("mig") is None else p["mig"],
                computeInstanceId=0xFFFFFFFF if p.get("mig") is None else 0,
            )
        )
    return out


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[SimpleNamespace]:
    return _processes(handle, "compute")


def nvmlDeviceGetGraphicsRunningProcesses(handle: _Handle) -> list[SimpleNamespace]:
    return _processes(handle, "graphics")


def nvmlDeviceGetMigMode(handle: _Handle) -> list[int]:
    spec = _spec(handle, "mig_mode")
    if spec.get("mig_mode") is None:
        raise NVMLError(_real.NVML_ERROR_NOT_SUPPORTED)
    return [int(spec["mig_mode"]), int(spec["mig_mode"])]


def nvmlDeviceGetMaxMigDeviceCount(handle: _Handle) -> int:
    spec = _spec(handle)
    if spec.get("mig_mode") != 1:
        raise NVMLError(_real.NVML_ERROR_NOT_SUPPORTED)
    return 7


def nvmlDeviceGetMigDeviceHandleByIndex(handle: _Handle, index: int) -> _Handle:
    spec = _spec(handle)
    if spec.get("mig_mode") != 1:
        raise NVMLError(_real.NVML_ERROR_NOT_SUPPORTED)
    if not 0 <= index < len(spec["mig_devices"]):
        raise NVMLError(_real.NVML_ERROR_NOT_FOUND)  # an empty MIG slot, as NVML reports it
    return _Handle(handle.index, index)


def nvmlDeviceGetTopologyCommonAncestor(handle1: _Handle, handle2: _Handle) -> int:
    _spec(handle1)
    _spec(handle2)
    matrix = current_scenario().get("topology")
    if matrix is None:
        raise NVMLError(_real.NVML_ERROR_NOT_SUPPORTED)
    return int(matrix[handle1.index][handle2.index])
