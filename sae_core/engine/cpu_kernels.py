"""C kernels for the TopK/BatchTopK step on the CPU (`csrc/cpu_kernels.c`), compiled on first use.

- `row_topk`: on a CPU, `torch.topk` over the [batch × d_sae] pre-activations costs about as much as the
  encoder matmul (the floor of a TopK step); the kernel is 2-5× faster for k ≤ 64 (`bench/topk_kernel.py`).
  It selects exactly the same elements (ties: the lower index) and returns each row's indices in
  ascending order.
- `latent_layout`: the selected (row, latent) pairs grouped by latent, a counting sort instead of
  `argsort` (the CSR structure of `sae.LatentLayout`); `weight_grad` and `row_dots`: the sparse products
  of the backward pass over those pairs.
- `count_positive_at_least`, `collect_positive_at_least`: BatchTopK's candidate search.

Each is used only where it applies (CPU float32 tensors; top-k for 1 ≤ k ≤ 64); everywhere else (CUDA,
bf16, larger k, rows holding NaNs, no C compiler, `SAE_LAB_CPU_KERNELS=0`) torch answers, with the same
result. The shared library is built once per machine with the system C compiler (`$CC`, else
`cc`/`gcc`/`clang`) into `$SAE_LAB_CACHE` (default `~/.cache/sae_lab`), named by a hash of the source,
compiler, flags and CPU features, and moved into place atomically so that racing ranks are harmless.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.c"
MAX_K = 64  # the top-k kernel's limit; it is slower than torch.topk from k = 128 on
# Tried in order: -march=native for the CPU's vector width, -fopenmp for threads (shared with torch's
# OpenMP runtime); the later sets for compilers or CPUs without one of them (slower, same results).
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-fopenmp"], ["-O3"])


def row_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row of a 2-D tensor, unsorted like
    `torch.topk(sorted=False)`."""
    if topk_applies(pre, k) and (lib := library()) is not None:
        pre = pre.contiguous()
        values = torch.empty(pre.shape[0], k, dtype=pre.dtype)
        indices = torch.empty(pre.shape[0], k, dtype=torch.int64)
        incomplete = lib.topk_rows_f32(
            pre.data_ptr(), *pre.shape, k, values.data_ptr(), indices.data_ptr(), torch.get_num_threads()
        )
        # Rows with NaNs (fewer than k comparable values) go to torch.topk, whose NaN rules callers know.
        if incomplete == 0:
            return values, indices
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return values, indices


def topk_applies(pre: torch.Tensor, k: int) -> bool:
    return (
        pre.device.type == "cpu"
        and pre.dtype == torch.float32
        and pre.dim() == 2
        and 1 <= k <= min(MAX_K, pre.shape[1])
    )


def latent_layout(
    idx: torch.Tensor, d_sae: int, pair_rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the selected latents idx (a [B, k] top-k, or a flat list of pairs whose batch rows are
    `pair_rows`): (order, rows, crow) with order the stable argsort of idx.flatten(), rows the batch row of
    each sorted pair and crow [d_sae + 1] the CSR row starts (latent counts cumulated)."""
    if idx.device.type == "cpu" and (lib := library()) is not None:
        flat = idx.flatten().to(torch.int64).contiguous()
        order, rows = torch.empty_like(flat), torch.empty_like(flat)
        crow = torch.empty(d_sae + 1, dtype=torch.int64)
        given = None if pair_rows is None else pair_rows.to(torch.int64).contiguous()
        pointers = (0 if given is None else given.data_ptr(), d_sae, order.data_ptr(), rows.data_ptr(), crow.data_ptr())
        if lib.latent_layout_i64(flat.data_ptr(), flat.numel(), max(idx.shape[-1], 1), *pointers) == 0:
            return order, rows, crow
    return torch_latent_layout(idx, d_sae, pair_rows)


def torch_latent_layout(idx: torch.Tensor, d_sae: int, pair_rows: torch.Tensor | None = None):
    """`latent_layout` in torch operations (CUDA, no compiler; and the bench's comparison)."""
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    rows = torch.div(order, idx.shape[-1], rounding_mode="floor") if pair_rows is None else pair_rows[order]
    counts = torch.zeros(d_sae + 1, dtype=torch.int64, device=idx.device)
    counts[1:].scatter_add_(0, flat, torch.ones_like(flat))
    return order, rows, counts.cumsum(0)


def weight_grad(
    crow: torch.Tensor, rows: torch.Tensor, order: torch.Tensor, values: torch.Tensor, dense: torch.Tensor, d_sae: int
) -> torch.Tensor | None:
    """[d_sae, d]: row i sums values.flatten()[order[p]] · dense[rows[p]] over its pairs p (crow[i]..crow[i+1]),
    or None where the kernel does not apply (the caller then uses torch's sparse product)."""
    if not _all_cpu_float32(values, dense) or (lib := library()) is None:
        return None
    values, dense = values.contiguous(), dense.contiguous()
    out = torch.empty(d_sae, dense.shape[1], dtype=torch.float32)
    lib.weight_grad_f32(
        crow.data_ptr(), rows.data_ptr(), order.data_ptr(), values.data_ptr(), dense.data_ptr(),
        d_sae, dense.shape[1], out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def row_dots(W: torch.Tensor, idx: torch.Tensor, g: torch.Tensor, pair_rows: torch.Tensor | None = None):
    """W[idx[p]] · g[row of p] for every selected pair p, shaped like idx (rows: b for idx [B, k], else
    `pair_rows`); None where the kernel does not apply."""
    if not _all_cpu_float32(W, g) or idx.device.type != "cpu" or (lib := library()) is None:
        return None
    W, g, flat = W.contiguous(), g.contiguous(), idx.to(torch.int64).contiguous()
    given = None if pair_rows is None else pair_rows.to(torch.int64).contiguous()
    out = torch.empty(idx.shape, dtype=torch.float32)
    shape = (flat.numel(), max(idx.shape[-1], 1), 0 if given is None else given.data_ptr(), g.shape[1])
    if lib.row_dots_f32(
        W.data_ptr(), len(W), flat.data_ptr(), g.data_ptr(), *shape, out.data_ptr(), torch.get_num_threads()
    ):
        raise IndexError(f"row_dots: an index is outside the {len(W)} rows of W")
    return out


def count_positive_at_least(pre: torch.Tensor, threshold: float) -> torch.Tensor:
    """[rows]: how many entries of each row of a 2-D tensor are positive and >= threshold."""
    if _all_cpu_float32(pre) and pre.dim() == 2 and (lib := library()) is not None:
        pre = pre.contiguous()
        counts = torch.empty(pre.shape[0], dtype=torch.int64)
        lib.count_positive_at_least_f32(
            pre.data_ptr(), *pre.shape, threshold, counts.data_ptr(), torch.get_num_threads()
        )
        return counts
    return ((pre >= threshold) & (pre > 0)).sum(1)


def collect_positive_at_least(
    pre: torch.Tensor, threshold: float, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Every entry of pre [B, n] that is positive and >= threshold as flat (values, latents, rows) in
    row-major order, given `counts` from `count_positive_at_least(pre, threshold)`; None where the kernel
    does not apply."""
    if not (_all_cpu_float32(pre) and pre.dim() == 2) or (lib := library()) is None:
        return None
    pre = pre.contiguous()
    starts = torch.zeros(len(pre) + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=starts[1:])
    total = int(starts[-1])
    values = torch.empty(total + pre.shape[1], dtype=torch.float32)  # slack: see the C function
    latents = torch.empty(total + pre.shape[1], dtype=torch.int64)
    rows = torch.empty(total, dtype=torch.int64)
    pointers = (starts.data_ptr(), values.data_ptr(), latents.data_ptr(), rows.data_ptr())
    if lib.collect_positive_at_least_f32(pre.data_ptr(), *pre.shape, threshold, *pointers, torch.get_num_threads()):
        return None
    return values[:total], latents[:total], rows


def _all_cpu_float32(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, built if needed; None (with one warning) where they cannot be had."""
    if os.environ.get("SAE_LAB_CPU_KERNELS", "1") == "0":
        return None
    try:
        return load(build(cache_dir()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"CPU kernels unavailable, using torch: {exc}", RuntimeWarning, stacklevel=2)
        return None


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    pointer, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.topk_rows_f32.argtypes = [pointer, i64, i64, i64, pointer, pointer, i64]
    lib.topk_rows_f32.restype = i64  # ctypes releases the GIL for the call
    lib.latent_layout_i64.argtypes = [pointer, i64, i64, pointer, i64, pointer, pointer, pointer]
    lib.latent_layout_i64.restype = i64
    lib.weight_grad_f32.argtypes = [pointer, pointer, pointer, pointer, pointer, i64, i64, pointer, i64]
    lib.weight_grad_f32.restype = None
    lib.row_dots_f32.argtypes = [pointer, i64, pointer, pointer, i64, i64, pointer, i64, pointer, i64]
    lib.row_dots_f32.restype = i64
    lib.count_positive_at_least_f32.argtypes = [pointer, i64, i64, ctypes.c_float, pointer, i64]
    lib.count_positive_at_least_f32.restype = None
    f32 = ctypes.c_float
    lib.collect_positive_at_least_f32.argtypes = [pointer, i64, i64, f32, pointer, pointer, pointer, pointer, i64]
    lib.collect_positive_at_least_f32.restype = i64
    return lib


def build(directory: Path, compiler: str | None = None) -> Path:
    """Compile the kernels into `directory` unless a build for this source, compiler and CPU is there."""
    compiler = compiler or find_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    errors = []
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    require_private(directory)
    for flags in FLAG_SETS:
        target = directory / f"cpu_kernels-{_build_key(compiler, flags)}.so"
        if target.exists():
            require_private(target)
            return target
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        command = [compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(partial), "-lm"]
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            os.chmod(partial, 0o700)  # ours alone, whatever the umask (require_private checks it on load)
            os.replace(partial, target)  # atomic: another rank building the same file is harmless
            return target
        partial.unlink(missing_ok=True)
        errors.append(f"{' '.join(command)}: {done.stderr.strip()[-500:]}")
    raise RuntimeError("could not compile the CPU kernels: " + " | ".join(errors))


def require_private(path: Path) -> None:
    """Loading a library runs its code: refuse one (or its folder) that someone else owns or may write."""
    info = path.stat()
    if info.st_uid != os.getuid():
        raise RuntimeError(f"refusing {path}: owned by uid {info.st_uid}, not by this user ({os.getuid()})")
    if info.st_mode & 0o022:
        raise RuntimeError(f"refusing {path}: writable by group or others (mode {info.st_mode & 0o777:o})")


def find_compiler() -> str | None:
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def cache_dir() -> Path:
    if os.environ.get("SAE_LAB_CACHE"):
        return Path(os.environ["SAE_LAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sae_lab"


def _build_key(compiler: str, flags: list[str]) -> str:
    """Same source, compiler, flags and CPU → same file; -march=native makes the CPU part matter (a cache
    directory shared by different machines holds one build per CPU type)."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (compiler, *flags, platform.machine(), _cpu_features()):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()
