"""An activation set: one [n_rows, d_in] matrix over shard files, read by ranges or by rows (no torch).

Sources are a `.safetensors` file, a `.npy` file, or a directory of shards of either kind (with a
`manifest.json`, or scanned). Nothing here reads a whole set into RAM: `read_range` reads a contiguous
run of rows in their stored dtype with one large pread per shard (what training reads, block by block),
and `read` gathers scattered rows as float32 from the memory maps (evaluation, the first batch).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import ACTIVATION_SUFFIXES, CONTEXT_IDS_KEY, FEATURES_KEY, MANIFEST_FILE
from ..text import brief
from .formats import (
    STORAGE,
    STORAGE_ITEMSIZE,
    DatasetError,
    is_features_file,
    is_regular_file,
    list_shards,
    map_file,
    map_npy,
    map_safetensors,
    read_safetensors_header,
    read_shard_tensor,
    to_float32,
)
from .manifest import Manifest, read_manifest


@dataclass
class Shard:
    """One file of a set: rows [start, start + rows) of the whole, memory-mapped when first used.

    A shard listed in a manifest is not opened until a row of it is read; its file must then match the
    manifest's rows, width and dtype.
    """

    path: Path
    key: str
    start: int
    rows: int
    d_in: int
    dtype: str  # logical dtype, one of ALLOWED_DTYPES
    _array: np.ndarray | None = None

    @classmethod
    def mapped(cls, path: Path, key: str, start: int) -> Shard:
        array, dtype = map_file(path, key)
        if array.ndim != 2:
            what = f"tensor {key!r}" if path.suffix.lower() == ".safetensors" else "array"
            raise DatasetError(
                f"{path}: {what} has shape {list(array.shape)} ({array.ndim}-D); activations must be 2-D [tokens, d_in]"
            )
        return cls(path, key, start, int(array.shape[0]), int(array.shape[1]), dtype, array)

    @property
    def stop(self) -> int:
        return self.start + self.rows

    @property
    def nbytes(self) -> int:
        return self.rows * self.d_in * STORAGE_ITEMSIZE[self.dtype]

    @property
    def array(self) -> np.ndarray:
        """[rows, d_in] in the stored dtype (bfloat16 as raw uint16), memory-mapped."""
        if self._array is None:
            array, dtype = map_file(self.path, self.key)
            if array.shape != (self.rows, self.d_in) or dtype != self.dtype:
                raise DatasetError(
                    f"{self.path}: holds {list(array.shape)} {dtype} but the manifest says "
                    f"[{self.rows}, {self.d_in}] {self.dtype}"
                )
            self._array = array
        return self._array

    def read_range(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of this shard in the stored dtype, C-contiguous and native-endian: one large read
        straight into a new buffer where the file's layout allows, else a copy out of the memory map."""
        array = self.array
        if isinstance(array, np.memmap) and array.flags.c_contiguous and array.dtype.isnative:
            out = np.empty((hi - lo, self.d_in), dtype=array.dtype)
            _pread_exactly(self.path, out, array.offset + lo * self.d_in * array.dtype.itemsize)
            return out
        return np.ascontiguousarray(array[lo:hi], dtype=array.dtype.newbyteorder("="))


def _pread_exactly(path: Path, out: np.ndarray, offset: int) -> None:
    """Fill `out` with the file's bytes from `offset` (pread releases the GIL: reader threads overlap)."""
    view = memoryview(out.reshape(-1).view(np.uint8).data)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise DatasetError(f"{brief(path)}: cannot be read ({exc.strerror or exc})") from None
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise DatasetError(f"{brief(path)}: ends early (was it truncated while in use?)")
            done += n
    except OSError as exc:
        raise DatasetError(f"{brief(path)}: cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


class ActivationSet:
    """A [n_rows, d_in] activation matrix over shard files, read by rows or by contiguous ranges."""

    def __init__(self, source: Path, shards: list[Shard], features: np.ndarray | None = None, manifest=None):
        self.source = source
        self.shards = shards
        self.features = features  # [n_features, d_in] float32 ground truth, when the data carries it
        self.manifest = manifest  # the folder's Manifest (provenance included), when it has one
        self.n_rows = shards[-1].stop
        self.d_in = shards[0].d_in
        dtypes = sorted({s.dtype for s in shards})
        self.dtype = dtypes[0] if len(dtypes) == 1 else "+".join(dtypes)
        # What read_range returns: the stored dtype when every shard shares one we train from directly,
        # else float32 (float64 is rounded, mixed shards are made alike).
        self.storage = self.dtype if self.dtype in ("float32", "float16", "bfloat16") else "float32"
        self._starts = np.array([s.start for s in shards] + [self.n_rows], dtype=np.int64)

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return f"ActivationSet({self.describe()})"

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row as read_range returns it."""
        return self.d_in * STORAGE_ITEMSIZE[self.storage]

    def describe(self) -> str:
        """One line for people: where, how many rows, how wide, which dtype."""
        files = f"{len(self.shards)} shards" if len(self.shards) > 1 else "1 file"
        truth = f", {self.features.shape[0]} ground-truth features" if self.features is not None else ""
        return f"{self.source}: {self.n_rows:,} rows x {self.d_in} {self.dtype} ({files}{truth})"

    @property
    def from_model(self) -> bool:
        """Rows an extraction wrote from a model (their contexts are in the folder): the holdout is then
        the tail of whole contexts (order.tail_holdout), which the model evaluation runs again."""
        return self.manifest is not None and "context_size" in self.manifest.provenance

    def context_ids(self, lo: int, hi: int) -> np.ndarray:
        """The context index (into contexts.safetensors) of rows [lo, hi), from the shards' `context_ids`."""
        return self.row_index(CONTEXT_IDS_KEY, lo, hi)

    def row_index(self, key: str, lo: int, hi: int) -> np.ndarray:
        """Index tensor `key` (context_ids, positions, token_ids) of rows [lo, hi) as int64, from the shards."""
        if not 0 <= lo <= hi <= self.n_rows:
            raise IndexError(f"rows [{lo}, {hi}) are out of range for {self.source} ({self.n_rows} rows)")
        pieces = []
        for shard, start, stop in self._pieces(lo, hi):
            piece = read_shard_tensor(shard.path, key)
            if piece is None or len(piece) != shard.rows:
                raise DatasetError(f"{shard.path}: has no {key} for its {shard.rows} rows")
            pieces.append(piece[start:stop])
        return np.concatenate(pieces).astype(np.int64) if pieces else np.empty(0, np.int64)

    def _pieces(self, lo: int, hi: int):
        """(shard, first, stop) of the shards holding rows [lo, hi), in shard-local rows."""
        first = int(np.searchsorted(self._starts, lo, side="right")) - 1
        for shard in self.shards[max(first, 0) :]:
            if shard.start >= hi:
                break
            yield shard, max(lo, shard.start) - shard.start, min(hi, shard.stop) - shard.start

    def shard_of(self, row: int) -> tuple[Shard, int]:
        """The shard holding global row `row`, and the row's index within it."""
        shard = self.shards[int(np.searchsorted(self._starts, row, side="right")) - 1]
        return shard, row - shard.start

    def where(self, row: int) -> str:
        """`row N` (with its shard and local index when the set has several shards), for messages."""
        if len(self.shards) == 1:
            return f"row {row}"
        shard, local = self.shard_of(row)
        return f"row {row} (row {local} of shard {shard.path.name})"

    def read_range(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) as [hi - lo, d_in] in `storage` dtype (bfloat16 as raw uint16), read in large pieces."""
        if not 0 <= lo <= hi <= self.n_rows:
            raise IndexError(f"rows [{lo}, {hi}) are out of range for {self.source} ({self.n_rows} rows)")
        pieces = []
        for shard, start, stop in self._pieces(lo, hi):
            piece = shard.read_range(start, stop)
            pieces.append(piece if shard.dtype == self.storage else to_float32(piece, shard.dtype))
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty((0, self.d_in), STORAGE[self.storage])

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (any order, repeats allowed) as float32 [len(rows), d_in], in the order given."""
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise TypeError(f"rows must be a 1-D array of integers, got shape {rows.shape} dtype {rows.dtype}")
        rows = rows.astype(np.int64, copy=False)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            bad = rows[(rows < 0) | (rows >= self.n_rows)][0]
            raise IndexError(f"row {bad} is out of range for {self.source} ({self.n_rows} rows)")
        # Read in ascending order, in runs of nearby rows, then scatter back to the caller's order.
        order = np.argsort(rows, kind="stable")
        ascending = rows[order]
        cuts = np.searchsorted(ascending, self._starts)  # cuts[i]:cuts[i+1] fall in shard i
        out = np.empty((rows.size, self.d_in), dtype=np.float32)
        for i, shard in enumerate(self.shards):
            lo, hi = cuts[i], cuts[i + 1]
            if hi > lo:
                out[order[lo:hi]] = to_float32(_gather(shard, ascending[lo:hi] - shard.start), shard.dtype)
        return out


_MERGE_GAP_BYTES = 64 * 2**10  # rows closer than this are read in one piece, gap included


def _gather(shard: Shard, local: np.ndarray) -> np.ndarray:
    """Rows `local` (ascending) of a shard in its stored dtype: one pread per run of nearby rows. Scattered
    rows of a huge set would otherwise fault in (and read around) a page range of the memory map each."""
    row_bytes = max(1, shard.nbytes // max(1, shard.rows))
    breaks = np.flatnonzero(np.diff(local) * row_bytes > _MERGE_GAP_BYTES) + 1
    starts, stops = np.r_[0, breaks], np.r_[breaks, len(local)]
    pieces = []
    for first, stop in zip(starts.tolist(), stops.tolist(), strict=True):
        lo = int(local[first])
        run = shard.read_range(lo, int(local[stop - 1]) + 1)
        pieces.append(run[local[first:stop] - lo])
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def open_activations(source: str | Path, key: str = "activations") -> ActivationSet:
    """Memory-map an activation source: a .safetensors file (tensor `key`), a .npy file, or a directory of shards.

    Raises DatasetError for anything that cannot be read as a 2-D float matrix: a missing path, an unsupported
    suffix, an empty directory, a missing tensor key, a shape that is not 2-D, a non-float dtype, shards of
    differing width. A directory with a `manifest.json` is opened from it alone (see manifest.py). Values are
    not scanned here (see `check_dataset`).
    """
    path = Path(source).expanduser()
    shown = brief(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DatasetError(
            f"activation source not found: {shown} (expected a .safetensors file, a .npy file or a directory of them)"
        ) from None
    except (OSError, ValueError) as exc:  # a name too long, a permission refused, a loop of links, a NUL byte
        raise DatasetError(f"{shown}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_ISDIR(mode):
        manifest = read_manifest(path)
        if manifest is not None:
            shards = _manifest_shards(path, manifest, key)
            return ActivationSet(path, shards, _load_features(path, shards, key, manifest.d_in), manifest)
        paths = list_shards(path)
        _check_own_files(path, paths)
    elif not stat.S_ISREG(mode):
        raise DatasetError(f"{shown}: not a regular file or a directory of them")
    elif path.suffix.lower() in ACTIVATION_SUFFIXES:
        paths = [path]
    else:
        raise DatasetError(
            f"{shown}: unsupported file type {brief(path.suffix or '(no suffix)', 20)!r}; "
            f"allowed: {', '.join(ACTIVATION_SUFFIXES)}, or a directory of such shards"
        )
    shards = _map_shards(paths, key, path)
    features = _load_features(path, shards, key, shards[0].d_in)
    return ActivationSet(path, shards, features)


def _map_shards(paths: list[Path], key: str, source: Path) -> list[Shard]:
    shards: list[Shard] = []
    for p in paths:
        shard = Shard.mapped(p, key, shards[-1].stop if shards else 0)
        if shards and shard.d_in != shards[0].d_in:
            first = shards[0]
            raise DatasetError(
                f"shards differ in width: {first.path.name} has d_in {first.d_in} but {p.name} has "
                f"{shard.d_in}; all shards in {source} must have the same width"
            )
        shards.append(shard)
    return shards


def _manifest_shards(directory: Path, manifest: Manifest, key: str) -> list[Shard]:
    """Shards as the manifest lists them, none opened yet (each is checked against it on first read)."""
    shards, start = [], 0
    for entry in manifest.shards:
        path = directory / entry.file
        if not is_regular_file(path):
            raise DatasetError(f"{brief(path)}: listed in {MANIFEST_FILE} but not a regular file in the folder")
        shards.append(Shard(path, key, start, entry.rows, manifest.d_in, manifest.dtype))
        start += entry.rows
    _check_own_files(directory, [s.path for s in shards])
    return shards


def _check_own_files(directory: Path, paths: list[Path]) -> None:
    """Each shard of a folder is a file of that folder, read once: a link leading out of it (to where the
    lab's roots may not reach) and a second name for a file already listed are refused."""
    real_dir = Path(os.path.realpath(directory))
    seen: dict[tuple[int, int], Path] = {}
    for path in paths:
        if not _in_folder(path, real_dir):
            raise DatasetError(f"{brief(path)}: a link to a file outside its folder; a set's shards must lie in it")
        try:
            info = path.stat()
        except OSError as exc:
            raise DatasetError(f"{brief(path)}: cannot be read ({exc.strerror or exc})") from None
        first = seen.setdefault((info.st_dev, info.st_ino), path)
        if first is not path:
            raise DatasetError(f"{brief(path)}: the same file as {first.name}; a set holds each shard once")


def _in_folder(path: Path, real_dir: Path) -> bool:
    """Whether `path` (a name in the folder) is the folder's own file: not a link, or one resolving inside it."""
    return not path.is_symlink() or Path(os.path.realpath(path)).is_relative_to(real_dir)


def _features_candidates(source: Path, shards: list[Shard]) -> list[Path]:
    """Where ground-truth features may live, in order of preference."""
    if source.is_dir():
        return [source / f"{FEATURES_KEY}{s}" for s in ACTIVATION_SUFFIXES] + [shards[0].path]
    return [source, source.with_name(f"{source.stem}.{FEATURES_KEY}.npy")]


def _load_features(source: Path, shards: list[Shard], key: str, d_in: int) -> np.ndarray | None:
    """The `features` tensor [M, d_in] from the file itself, the first shard, or a sibling file; else None."""
    if key == FEATURES_KEY:
        return None
    for candidate in _features_candidates(source, shards):
        if not is_regular_file(candidate) or not _may_hold_features(candidate):
            continue
        if source.is_dir() and not _in_folder(candidate, Path(os.path.realpath(source))):
            raise DatasetError(f"{brief(candidate)}: a link to a file outside its folder; features must lie in it")
        safetensors = candidate.suffix.lower() == ".safetensors"
        array, dtype = map_safetensors(candidate, FEATURES_KEY) if safetensors else map_npy(candidate)
        if array.ndim != 2 or array.shape[1] != d_in:
            raise DatasetError(
                f"{candidate}: ground-truth features have shape {list(array.shape)}; expected [n_features, {d_in}]"
            )
        return to_float32(np.asarray(array), dtype)
    return None


def _may_hold_features(candidate: Path) -> bool:
    """A features file holds them (or is an error); an activation file may carry a `features` tensor."""
    if is_features_file(candidate):
        return True
    return candidate.suffix.lower() == ".safetensors" and FEATURES_KEY in read_safetensors_header(candidate)
