"""Activation files on disk: safetensors headers, memory maps of .safetensors/.npy tensors, stored dtypes.

Nothing is read whole: a tensor is memory-mapped in its stored dtype (bfloat16 as raw uint16, since
numpy has no bfloat16) and callers copy only the rows they need. No torch here.
"""

from __future__ import annotations

import json
import math
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import ACTIVATION_SUFFIXES, FEATURES_KEY
from ..text import brief

ALLOWED_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")

# safetensors dtype codes we read, and how their bytes are mapped (bfloat16 has no numpy dtype: kept as raw uint16).
_ST_FLOATS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
STORAGE: dict[str, np.dtype] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
}
STORAGE_ITEMSIZE = {name: dtype.itemsize for name, dtype in STORAGE.items()}
_ST_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_MAX_HEADER_BYTES = 100 * 2**20


class DatasetError(ValueError):
    """A problem with the activation data, phrased for a person: which file, what is wrong, what is allowed."""


@dataclass(frozen=True)
class _TensorEntry:
    """One tensor of a safetensors header; `offset` is absolute in the file."""

    name: str
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, _TensorEntry]:
    """Parse the header (8-byte little-endian length, then JSON) without touching the tensor bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise DatasetError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise DatasetError(f"{path}: not a safetensors file (header length {header_len} exceeds the file)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DatasetError(f"{path}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise DatasetError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_start = 8 + header_len
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        expected = math.prod(shape) * _ST_ITEMSIZE.get(dtype, 0)
        if _ST_ITEMSIZE.get(dtype) and (end - begin != expected or begin < 0 or data_start + end > size):
            raise DatasetError(
                f"{path}: tensor {name!r} is truncated or corrupt "
                f"(shape {list(shape)} {dtype} needs {expected} bytes, header says {end - begin}, file has {size})"
            )
        entries[name] = _TensorEntry(name, dtype, shape, data_start + begin, end - begin)
    return entries


def _logical_dtype_of_safetensors(path: Path, entry: _TensorEntry) -> str:
    if entry.dtype in _ST_FLOATS:
        return _ST_FLOATS[entry.dtype]
    kind = "bool" if entry.dtype == "BOOL" else "integer" if entry.dtype[0] in "IU" else "unsupported"
    raise DatasetError(
        f"{path}: tensor {entry.name!r} has {kind} dtype {entry.dtype}; allowed: {', '.join(ALLOWED_DTYPES)}"
    )


def _logical_dtype_of_numpy(path: Path, dtype: np.dtype) -> str:
    if dtype.kind == "f" and dtype.itemsize in (2, 4, 8):
        return {2: "float16", 4: "float32", 8: "float64"}[dtype.itemsize]
    kind = {"b": "bool", "i": "integer", "u": "integer"}.get(dtype.kind, "unsupported")
    raise DatasetError(f"{path}: array has {kind} dtype {dtype}; allowed: {', '.join(ALLOWED_DTYPES)}")


def map_safetensors(path: Path, key: str) -> tuple[np.ndarray, str]:
    """Memory-map tensor `key` of a safetensors file; returns (raw array, logical dtype)."""
    entries = read_safetensors_header(path)
    if key not in entries:
        present = ", ".join(repr(k) for k in entries) or "none"
        raise DatasetError(f"{path}: no tensor named {key!r}; tensors present: {present}")
    entry = entries[key]
    dtype = _logical_dtype_of_safetensors(path, entry)
    if entry.nbytes == 0:  # mmap cannot map zero bytes
        return np.empty(entry.shape, STORAGE[dtype]), dtype
    return np.memmap(path, dtype=STORAGE[dtype], mode="r", offset=entry.offset, shape=entry.shape), dtype


_ST_INTEGERS = {"I64": "<i8", "I32": "<i4"}


def read_shard_tensor(path: Path, key: str) -> np.ndarray | None:
    """An integer index tensor of a shard (`context_ids`, `token_ids`, `positions`) read whole; None when the
    shard has no such tensor (a set not made by extraction)."""
    entry = read_safetensors_header(path).get(key)
    if entry is None or entry.dtype not in _ST_INTEGERS:
        return None
    dtype = np.dtype(_ST_INTEGERS[entry.dtype])
    with open(path, "rb") as f:
        f.seek(entry.offset)
        return np.frombuffer(f.read(entry.nbytes), dtype=dtype).reshape(entry.shape)


def map_npy(path: Path) -> tuple[np.ndarray, str]:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "empty file" in str(exc) or "cannot mmap" in str(exc):
            array = np.load(path, allow_pickle=False)  # a zero-sized array: nothing to map, nothing to read
        else:
            raise DatasetError(f"{path}: not a readable .npy array ({brief(exc, 160)})") from None
    except OverflowError:  # a dimension beyond any integer numpy holds, as a hand-made header may give
        raise DatasetError(f"{path}: not a readable .npy array (its header gives a dimension too large)") from None
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable .npy file ({exc})") from None
    return array, _logical_dtype_of_numpy(path, array.dtype)


def map_file(path: Path, key: str) -> tuple[np.ndarray, str]:
    """Memory-map an activation file of either kind; a file the OS will not give us is a DatasetError."""
    try:
        if path.suffix.lower() == ".safetensors":
            return map_safetensors(path, key)
        return map_npy(path)
    except OSError as exc:
        raise DatasetError(f"{brief(path)}: cannot be read ({exc.strerror or exc})") from None


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Rows in their stored dtype -> C-contiguous float32 (exact for float16/bfloat16, rounded for float64)."""
    if dtype == "bfloat16":
        # bfloat16 is the top half of a float32: shifting the bits up is an exact conversion.
        return (raw.astype(np.uint32, order="C") << 16).view(np.float32)
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes Inf, which the value checks name
        return raw.astype(np.float32, order="C")


def is_features_file(path: Path) -> bool:
    """`features.npy`, `features.safetensors` and `<name>.features.npy` hold ground truth, not activations."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return stem == FEATURES_KEY or stem.endswith("." + FEATURES_KEY)


def list_shards(directory: Path) -> list[Path]:
    """The activation shards of a directory: regular files of a known kind. What else the directory holds is
    never named (on a shared URL that would list any folder of the server)."""
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise DatasetError(f"{brief(directory)}: cannot be read ({exc.strerror or exc})") from None
    shards = [p for p in entries if _is_shard(p)]
    if not shards:
        raise DatasetError(
            f"{brief(directory)}: directory holds no activation shards; expected files ending in "
            f"{' or '.join(ACTIVATION_SUFFIXES)}"
        )
    return shards


def _is_shard(path: Path) -> bool:
    if path.name.startswith(".") or path.suffix.lower() not in ACTIVATION_SUFFIXES or is_features_file(path):
        return False
    return is_regular_file(path)


def is_regular_file(path: Path) -> bool:
    """A regular file (after symlinks): never a FIFO, socket or device, which would block or mislead a reader."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False
