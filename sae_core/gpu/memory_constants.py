"""The memory estimate's GPU-only constants, measured: read from a small JSON file when one is given.

The CUDA context, the NCCL buffers and the allocator's headroom can only be measured on a GPU
(`bench/gpu_check.sh` writes them as `memory/memory_constants.json`). Where the estimate finds such a file
it takes whichever of the three it holds; `gpu/memory.py` keeps the provisional built-in values for the rest.

Where the file is: the path in SAE_LAB_MEMORY_CONSTANTS, else `SAE_LAB_HOME/memory_constants.json`. Its
keys: `cuda_context_bytes` and `nccl_bytes` (whole numbers, 0-64 GiB), `allocator_headroom` (0-1, a fraction
of the allocator's peak); any other key (the device, the date) is for people and ignored. A file that
cannot be used (unreadable, not JSON, a value out of range) is logged once and ignored, so an estimate
never fails because of it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..files import MEMORY_CONSTANTS_FILE
from ..paths import home_path

log = logging.getLogger(__name__)

MEMORY_CONSTANTS_ENV = "SAE_LAB_MEMORY_CONSTANTS"
MAX_FILE_BYTES = 64 * 1024
_GiB = 1024**3
# constant -> (its type, lowest, highest allowed)
RANGES: dict[str, tuple[type, float, float]] = {
    "cuda_context_bytes": (int, 0, 64 * _GiB),
    "nccl_bytes": (int, 0, 64 * _GiB),
    "allocator_headroom": (float, 0.0, 1.0),
}


@dataclass(frozen=True)
class CudaConstants:
    """The estimate's terms that only a GPU can measure, and where they came from."""

    cuda_context_bytes: int
    nccl_bytes: int
    allocator_headroom: float
    source: str


def constants_path() -> Path:
    named = os.environ.get(MEMORY_CONSTANTS_ENV)
    return Path(named) if named else home_path() / MEMORY_CONSTANTS_FILE


def load_constants(built_in: CudaConstants) -> CudaConstants:
    """`built_in`, with each constant the constants file holds (when there is one, readable and valid)."""
    path = constants_path()
    try:
        stat = path.stat()
    except OSError:  # no file: the common case
        return built_in
    return _read(str(path), stat.st_mtime_ns, stat.st_size, built_in)


@functools.lru_cache(maxsize=8)  # keyed by mtime and size too: a rewritten file is read again, once
def _read(path: str, mtime_ns: int, size: int, built_in: CudaConstants) -> CudaConstants:  # noqa: ARG001
    try:
        if size > MAX_FILE_BYTES:
            raise ValueError(f"it is larger than {MAX_FILE_BYTES} bytes")
        values = parse_constants(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as exc:  # JSON and UTF-8 decoding errors are ValueErrors
        log.warning("memory constants file %s ignored, the built-in constants are used: %s", path, exc)
        return built_in
    return replace(built_in, **values, source=path) if values else built_in


def parse_constants(data: object) -> dict[str, Any]:
    """The constants a file's JSON holds, checked; ValueError naming the first bad one."""
    if not isinstance(data, dict):
        raise ValueError("it is not a JSON object")
    values: dict[str, Any] = {}  # int for the byte counts, float for the headroom
    for name, (kind, lowest, highest) in RANGES.items():
        if name not in data:
            continue
        value = data[name]
        is_number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not is_number or (kind is int and value != int(value)):
            raise ValueError(f"{name} must be a {'whole ' if kind is int else ''}number, got {value!r}")
        if not lowest <= value <= highest:
            raise ValueError(f"{name} must be between {lowest:g} and {highest:g}, got {value}")
        values[name] = kind(value)
    return values


MiB = 1024**2
GiB = 1024**3

# CUDA context + lazily loaded kernels + cuBLAS, as nvidia-smi shows it for a process minus what
# torch's allocator reserved. PyTorch maintainers report ~300-400 MB for CUDA >= 11.7 with lazy
# module loading (pytorch/pytorch#107667, #109888, pre-Hopper GPUs); Hopper contexts are larger
# (~500 MB) and the first cuBLAS/topk kernels add tens of MB. Provisional until
# bench/memory_accuracy.py measures it on a lent GPU (its "context" column).
CUDA_CONTEXT_BYTES = 600 * MiB
# NCCL communicator buffers per rank: 544-688 MB per rank measured on 4x A100 NVLink
# (NVIDIA/nccl#964), up to ~1.6 GB with NVLS on H100 (NVIDIA/nccl#864). DDP uses one communicator.
NCCL_BYTES = 1 * GiB
# Reserved over allocated: provisional, calibrated by bench/memory_accuracy.py.
ALLOCATOR_HEADROOM = 0.10
BUILT_IN_CONSTANTS = CudaConstants(CUDA_CONTEXT_BYTES, NCCL_BYTES, ALLOCATOR_HEADROOM, source="built-in")


def cuda_constants() -> CudaConstants:
    """The CUDA context, NCCL and allocator constants in force: the built-in ones, or a constants file's."""
    return load_constants(BUILT_IN_CONSTANTS)
