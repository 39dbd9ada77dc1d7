"""What a GPU probe returns: GPUs, their processes and MIG instances, the host, as plain dataclasses.

A probe travels as JSON (the sampler's snapshot in lab.db), so every class converts to and from dicts;
fields a newer version added are ignored by an older reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


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
