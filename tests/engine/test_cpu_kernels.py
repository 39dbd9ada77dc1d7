"""The C kernels of the CPU TopK step against torch, and how they are built, cached and bypassed."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from sae_core.engine import cpu_kernels
from sae_core.engine.sparse import LatentLayout, _row_dots_eager

REQUIRED = os.environ.get("SAE_LAB_REQUIRE_CPU_KERNELS") == "1"  # set by .ci/run: CI has a C compiler


@pytest.fixture(scope="module")
def lib():
    built = cpu_kernels.library()
    if built is None:
        if REQUIRED:
            pytest.fail("the CPU kernels did not build (see the RuntimeWarning)")
        pytest.skip("no C compiler here: the CPU kernels are not built")
    return built


def reference_topk(pre, k):
    """The k largest per row, ties to the lower index, as (values, indices) in ascending index order."""
    order = torch.sort(pre, dim=-1, descending=True, stable=True).indices[:, :k]
    indices = order.sort(dim=-1).values
    return pre.gather(1, indices), indices


def kernel_topk(pre, k):
    assert cpu_kernels.topk_applies(pre, k)
    return cpu_kernels.row_topk(pre, k)


@pytest.mark.parametrize(
    ("rows", "width", "k"),
    [(1, 1, 1), (5, 16, 16), (7, 17, 3), (64, 15, 8), (33, 1024, 8), (9, 4096, 64), (3, 100, 64), (40, 130, 17)],
)
def test_topk_selects_what_a_stable_sort_selects(lib, rows, width, k):
    torch.manual_seed(width * 7 + k)
    pre = torch.randn(rows, width)
    values, indices = kernel_topk(pre, k)
    want_values, want_indices = reference_topk(pre, k)
    assert torch.equal(indices, want_indices)
    assert torch.equal(values, want_values)
    torch_values = pre.topk(k, dim=-1).values  # the same set as torch.topk
    assert torch.equal(values.sort(dim=-1).values, torch_values.sort(dim=-1).values)


@pytest.mark.parametrize("levels", [1, 3, 50])
def test_topk_ties_go_to_the_lower_index(lib, levels):
    """Few distinct values: many candidates tie (with levels=1 every entry does, beyond the rank path's
    limit, so the heap path runs too)."""
    torch.manual_seed(levels)
    pre = torch.randint(0, levels, (64, 1024)).float()
    for k in (1, 8, 64):
        assert torch.equal(kernel_topk(pre, k)[1], reference_topk(pre, k)[1])


def test_topk_with_infinities(lib):
    torch.manual_seed(1)
    pre = torch.randn(20, 300)
    pre[0] = -torch.inf
    pre[1, ::3] = torch.inf
    pre[2, :5] = -torch.inf
    assert torch.equal(kernel_topk(pre, 8)[1], reference_topk(pre, 8)[1])


def test_rows_with_nan_are_answered_by_torch_topk(lib):
    torch.manual_seed(2)
    pre = torch.randn(10, 64)
    pre[3, 5] = torch.nan
    pre[4] = torch.nan
    values, indices = cpu_kernels.row_topk(pre, 4)
    want_values, want_indices = pre.topk(4, dim=-1, sorted=False)
    assert torch.equal(indices, want_indices)
    assert_close(values, want_values, equal_nan=True, rtol=0, atol=0)
    assert values[4].isnan().all() and values[3].isnan().any()  # torch.topk's rule: NaN ranks highest


def test_topk_does_not_depend_on_the_thread_count(lib):
    torch.manual_seed(3)
    pre = torch.randn(999, 777)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3, 7):
            torch.set_num_threads(threads)
            results.append(cpu_kernels.row_topk(pre, 12))
    finally:
        torch.set_num_threads(before)
    for values, indices in results[1:]:
        assert torch.equal(indices, results[0][1]) and torch.equal(values, results[0][0])


def test_topk_of_a_non_contiguous_tensor(lib):
    torch.manual_seed(4)
    pre = torch.randn(300, 40).t()  # [40, 300], column-major
    assert torch.equal(cpu_kernels.row_topk(pre, 5)[1], reference_topk(pre.contiguous(), 5)[1])


@pytest.mark.parametrize(
    ("dtype", "width", "k"), [(torch.bfloat16, 64, 4), (torch.float64, 64, 4), (torch.float32, 200, 65)]
)
def test_where_the_kernel_does_not_apply_torch_topk_answers(dtype, width, k):
    torch.manual_seed(5)
    pre = torch.randn(6, width).to(dtype)
    assert not cpu_kernels.topk_applies(pre, k)
    values, indices = cpu_kernels.row_topk(pre, k)
    want_values, want_indices = pre.topk(k, dim=-1, sorted=False)
    assert torch.equal(indices, want_indices) and torch.equal(values, want_values)


def test_latent_layout_is_a_stable_counting_sort(lib):
    torch.manual_seed(6)
    idx = torch.randint(0, 50, (300, 7))
    idx[:, 0] = 3  # a crowded latent; most others sparse, some unused
    order, rows, crow = cpu_kernels.latent_layout(idx, 60)
    flat = idx.flatten()
    assert torch.equal(order, flat.argsort(stable=True))
    assert torch.equal(rows, order // 7)
    assert torch.equal(
        crow, torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(flat, minlength=60).cumsum(0)])
    )


def test_latent_layout_rejects_out_of_range_latents(lib):
    with pytest.raises((RuntimeError, IndexError)):
        cpu_kernels.latent_layout(torch.tensor([[0, 5]]), 5)


def test_weight_grad_and_row_dots_match_torch(lib):
    torch.manual_seed(7)
    batch, d_in, d_sae, k = 257, 37, 90, 6
    idx = cpu_kernels.row_topk(torch.randn(batch, d_sae), k)[1]
    values, dense = torch.randn(batch, k), torch.randn(batch, d_in)
    layout = LatentLayout(idx, d_sae)
    got = cpu_kernels.weight_grad(layout.crow, layout.rows, layout.order, values, dense, d_sae)
    want = torch.zeros(d_sae, d_in).index_add_(
        0, idx.flatten(), (values[:, :, None] * dense[:, None, :]).reshape(-1, d_in)
    )
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    W, g = torch.randn(d_sae, d_in), torch.randn(batch, d_in)
    assert_close(cpu_kernels.row_dots(W, idx, g), _row_dots_eager(W, idx, g), rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match="outside the 90 rows"):
        cpu_kernels.row_dots(W, idx + d_sae, g)
    assert cpu_kernels.row_dots(W.double(), idx, g.double()) is None  # float32 only: the caller uses torch


# -- building -----------------------------------------------------------------------------------------------------


def test_a_build_is_reused_from_the_cache(lib, tmp_path):
    first = cpu_kernels.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial files left behind


def test_racing_builds_leave_one_working_library(lib, tmp_path):
    script = "import sys; from pathlib import Path; from sae_core.engine import cpu_kernels as c; print(c.load(c.build(Path(sys.argv[1]))))"
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert len(list(tmp_path.glob("*.so"))) == 1 and not list(tmp_path.glob("tmp*"))


def test_without_a_compiler_the_build_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no C compiler found"):
        cpu_kernels.build(tmp_path)


def test_a_failing_compiler_is_reported_with_its_commands(tmp_path):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(RuntimeError, match="cannot compile") as info:
        cpu_kernels.build(tmp_path / "cache", compiler=str(broken))
    assert str(info.value).count("broken-cc -O3") == len(cpu_kernels.FLAG_SETS)  # every flag set was tried
    assert not list((tmp_path / "cache").glob("*"))


def test_switched_off_or_unbuildable_torch_answers(monkeypatch, tmp_path):
    """SAE_LAB_CPU_KERNELS=0 (silently) and a missing compiler (with a warning) both leave torch to answer."""
    torch.manual_seed(8)
    pre = torch.randn(50, 200)
    for env, warns in (({"SAE_LAB_CPU_KERNELS": "0"}, False), ({"CC": str(tmp_path / "none")}, True)):
        with monkeypatch.context() as m, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name, value in env.items():
                m.setenv(name, value)
            m.setenv("SAE_LAB_CACHE", str(tmp_path / "cache"))
            cpu_kernels.library.cache_clear()
            try:
                assert cpu_kernels.library() is None
                values, indices = cpu_kernels.row_topk(pre, 6)
            finally:
                cpu_kernels.library.cache_clear()
        messages = [str(w.message) for w in caught]
        assert any("CPU kernels unavailable" in m for m in messages) if warns else messages == []
        assert torch.equal(indices.sort(dim=-1).values, reference_topk(pre, 6)[1])


def test_the_source_compiles_without_warnings(lib, tmp_path):
    """With OpenMP, or (a compiler without it: the build's last flag set) without, ignoring its pragmas."""
    compiler, errors = cpu_kernels.find_compiler(), []
    for flags in (["-fopenmp"], ["-Wno-unknown-pragmas"]):
        command = [compiler, "-O3", *flags, "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", str(cpu_kernels.SOURCE)]
        done = subprocess.run([*command, "-o", str(tmp_path / "k.so")], capture_output=True, text=True)
        if done.returncode == 0:
            return
        errors.append(done.stderr)
    pytest.fail("\n".join(errors))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_LAB_CACHE", str(tmp_path / "c"))
    assert cpu_kernels.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SAE_LAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cpu_kernels.cache_dir() == Path(tmp_path / "x" / "sae_lab")


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.5, 2.0])
def test_count_positive_at_least_matches_torch(lib, threshold):
    torch.manual_seed(9)
    pre = torch.randn(123, 517)
    pre[0, :7] = 0.0
    pre[1, 3] = torch.nan  # never counted
    want = ((pre >= threshold) & (pre > 0)).sum(1)
    assert torch.equal(cpu_kernels.count_positive_at_least(pre, threshold), want)


def test_collect_positive_at_least_lists_exactly_those_entries_in_row_major_order(lib):
    torch.manual_seed(10)
    pre = torch.randn(40, 300)
    pre[5] = -1.0  # a row with nothing to give
    for threshold in (-0.5, 0.0, 1.0):
        counts = cpu_kernels.count_positive_at_least(pre, threshold)
        values, latents, rows = cpu_kernels.collect_positive_at_least(pre, threshold, counts)
        want_rows, want_latents = ((pre >= threshold) & (pre > 0)).nonzero(as_tuple=True)
        assert torch.equal(rows, want_rows) and torch.equal(latents, want_latents)
        assert torch.equal(values, pre[want_rows, want_latents])
    wrong = cpu_kernels.count_positive_at_least(pre, 1.0) + 1  # counts from another threshold: refused
    assert cpu_kernels.collect_positive_at_least(pre, 1.0, wrong) is None


def test_flat_pair_lists_in_layout_and_row_dots(lib):
    """BatchTopK's flat (row, latent) lists: layout rows and row dots follow the given pair rows."""
    torch.manual_seed(13)
    pairs, batch, d_sae, d_in = 500, 60, 80, 19
    rows = torch.randint(0, batch, (pairs,)).sort().values
    latents = torch.randint(0, d_sae, (pairs,))
    order, layout_rows, crow = cpu_kernels.latent_layout(latents, d_sae, rows)
    assert torch.equal(order, latents.argsort(stable=True)) and torch.equal(layout_rows, rows[order])
    assert torch.equal(crow[1:], torch.bincount(latents, minlength=d_sae).cumsum(0))
    W, g = torch.randn(d_sae, d_in), torch.randn(batch, d_in)
    assert_close(cpu_kernels.row_dots(W, latents, g, rows), (W[latents] * g[rows]).sum(-1), rtol=1e-5, atol=1e-5)


def test_a_build_without_openmp_or_native_flags_gives_the_same_results(lib, tmp_path, monkeypatch):
    """The last flag set (plain -O3: compilers without OpenMP) is single-threaded and scalar, same answers."""
    monkeypatch.setattr(cpu_kernels, "FLAG_SETS", (["-O3"],))
    plain = cpu_kernels.load(cpu_kernels.build(tmp_path))
    monkeypatch.setattr(cpu_kernels, "library", lambda: plain)
    torch.manual_seed(12)
    pre = torch.randn(300, 1000)
    assert torch.equal(cpu_kernels.row_topk(pre, 16)[1], reference_topk(pre, 16)[1])
    order, rows, crow = cpu_kernels.latent_layout(cpu_kernels.row_topk(pre, 16)[1], 1000)
    assert torch.equal(crow[-1], torch.tensor(300 * 16))


def test_a_cached_library_others_may_write_is_refused(lib, tmp_path):
    built = cpu_kernels.build(tmp_path / "cache")
    assert built.stat().st_mode & 0o777 == 0o700 and (tmp_path / "cache").stat().st_mode & 0o777 == 0o700
    built.chmod(0o766)  # anyone could have swapped its code
    with pytest.raises(RuntimeError, match="writable by group or others"):
        cpu_kernels.build(tmp_path / "cache")
    built.chmod(0o700)
    (tmp_path / "cache").chmod(0o777)  # or put another file in its place
    with pytest.raises(RuntimeError, match="writable by group or others"):
        cpu_kernels.build(tmp_path / "cache")


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root")
def test_a_cached_library_of_another_user_is_refused(lib, tmp_path):
    built = cpu_kernels.build(tmp_path / "cache")
    os.chown(built, 65534, -1)  # nobody (the tests run as root on CI)
    with pytest.raises(RuntimeError, match="owned by uid 65534"):
        cpu_kernels.build(tmp_path / "cache")
