"""The CPU kernels (`sae_core/engine/csrc/cpu_kernels.c`) against the torch operations they replace.

Each line: median time of the kernel and of torch on the same random input, timed interleaved, and the
ratio. Top-k over several widths and k (torch.topk(sorted=False)); the latent layout (argsort + counts);
the sparse weight gradient (torch CSR @ dense) and the decoder's row dots (embedding + bmm).

    .venv/bin/python -m bench.topk_kernel [--threads 2] [--reps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from sae_core.engine import cpu_kernels
from sae_core.engine.sparse import LatentLayout, _row_dots_eager

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def interleaved(kernel, reference, reps: int) -> tuple[float, float]:
    """Median seconds of each, alternating so both see the same machine state."""
    kernel(), reference()
    kernel_times, reference_times = [], []
    for _ in range(reps):
        for fn, times in ((kernel, kernel_times), (reference, reference_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(kernel_times), statistics.median(reference_times)


def report(label: str, kernel_s: float, reference_s: float) -> None:
    print(
        f"{label:<46} kernel {kernel_s * 1e3:8.3f} ms   torch {reference_s * 1e3:8.3f} ms   {reference_s / kernel_s:5.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_kernels.library() is None:
        print("the CPU kernels could not be built here (see the warning): nothing to compare")
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.reps}, interleaved")
    torch.manual_seed(0)
    for rows, width, k in ((4096, 1024, 8), (4096, 4096, 16), (4096, 1024, 32), (2048, 16384, 64), (512, 65536, 64)):
        pre = torch.randn(rows, width)
        kernel_s, torch_s = interleaved(
            lambda pre=pre, k=k: cpu_kernels.row_topk(pre, k),
            lambda pre=pre, k=k: pre.topk(k, -1, sorted=False),
            args.reps,
        )
        report(f"top-k [{rows} x {width}], k {k}", kernel_s, torch_s)
    batch, d_in, d_sae, k = 4096, 128, 1024, 8  # the bench/train_throughput.py configuration
    idx = cpu_kernels.row_topk(torch.randn(batch, d_sae), k)[1]
    report(
        f"latent layout [{batch} x {k}] over {d_sae}",
        *interleaved(
            lambda: cpu_kernels.latent_layout(idx, d_sae),
            lambda: cpu_kernels.torch_latent_layout(idx, d_sae),
            args.reps,
        ),
    )
    layout, values, dense = LatentLayout(idx, d_sae), torch.randn(batch, k), torch.randn(batch, d_in)
    csr = torch.sparse_csr_tensor(layout.crow, layout.rows, values.flatten()[layout.order], (d_sae, batch))
    report(
        f"weight gradient [{d_sae} x {d_in}]",
        *interleaved(
            lambda: cpu_kernels.weight_grad(layout.crow, layout.rows, layout.order, values, dense, d_sae),
            lambda: csr @ dense,
            args.reps,
        ),
    )
    W = torch.randn(d_sae, d_in)
    report(
        f"decoder row dots [{batch} x {k}], d_in {d_in}",
        *interleaved(lambda: cpu_kernels.row_dots(W, idx, dense), lambda: _row_dots_eager(W, idx, dense), args.reps),
    )


if __name__ == "__main__":
    main()
