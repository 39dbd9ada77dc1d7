"""Streaming per-latent statistics against brute force on random data: top-k with their windows, histograms,
band samples, frequencies; chunk sizes and rank splits do not change them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_core.engine.latent_stats import (
    NO_ROW,
    Active,
    LatentStats,
    StatsShape,
    best_true_features,
    log_edges,
    nearest_latents,
    row_priority,
)  # fmt: skip

N, D = 3000, 48
SHAPE = StatsShape(D, top_k=7, bins=20, bands=4, band_examples=3, before=3, after=2)


@pytest.fixture(scope="module")
def data():
    """Sparse non-negative latents (a ReLU of shifted Gaussians) and contexts of 1-40 rows each."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(N, D, generator=g) * torch.rand(D, generator=g) * 3 - 1.5).relu()
    lengths = torch.randint(1, 40, (N,), generator=g)
    contexts = torch.repeat_interleave(torch.arange(N), lengths)[:N]
    return z, contexts


def stream(z, contexts, cuts, edges) -> LatentStats:
    stats = LatentStats(SHAPE, edges)
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        stats.update(Active.of_dense(z[lo:hi]), lo, contexts[lo:hi])
    return stats


def context_cuts(contexts, every: int) -> list[int]:
    """Chunk boundaries about `every` rows apart, each at the start of a context (chunks hold whole contexts)."""
    cuts = [0]
    while cuts[-1] < N:
        cut = min(cuts[-1] + every, N)
        while cut < N and contexts[cut] == contexts[cut - 1]:
            cut += 1
        cuts.append(cut)
    return cuts


def test_top_k_histogram_and_frequencies_equal_brute_force(data):
    z, contexts = data
    edges = log_edges(float(z.max()), SHAPE.bins)
    stats = stream(z, contexts, context_cuts(contexts, 256), edges)
    values, rows = z.topk(SHAPE.top_k, dim=0)
    assert torch.equal(stats.top_values, values)
    filled = values > 0
    assert torch.equal(stats.top_rows[filled], rows[filled])
    assert torch.equal(stats.fired, (z > 0).sum(0)) and stats.rows_seen == N
    assert torch.allclose(stats.total, z.double().sum(0)) and torch.equal(stats.maximum, z.max(0).values)
    width = float(edges[-1] - edges[0]) / SHAPE.bins
    for j in range(D):
        active = z[:, j][z[:, j] > 0].double()
        bins = ((active.log10() - float(edges[0])) / width).floor().clamp(0, SHAPE.bins - 1).long()
        assert torch.equal(stats.histogram[j], torch.bincount(bins, minlength=SHAPE.bins)), j


def test_each_top_example_keeps_its_window_inside_its_context(data):
    z, contexts = data
    stats = stream(z, contexts, context_cuts(contexts, 300), log_edges(float(z.max()), SHAPE.bins))
    offsets = range(-SHAPE.before, SHAPE.after + 1)
    for j in range(0, D, 5):
        for slot in range(SHAPE.top_k):
            row = int(stats.top_rows[slot, j])
            if row == NO_ROW:
                continue
            for w, offset in enumerate(offsets):
                other = row + offset
                inside = 0 <= other < N and contexts[other] == contexts[row]
                assert int(stats.top_window_rows[slot, j, w]) == (other if inside else NO_ROW)
                assert float(stats.top_window[slot, j, w]) == (float(z[other, j]) if inside else 0.0)


def test_band_examples_are_the_highest_priority_rows_of_each_band(data):
    z, contexts = data
    edges = log_edges(float(z.max()), SHAPE.bins)
    stats = stream(z, contexts, context_cuts(contexts, 200), edges)
    width = float(edges[-1] - edges[0]) / SHAPE.bins
    priority = row_priority(torch.arange(N))
    m = SHAPE.band_examples
    for j in range(D):
        rows = torch.nonzero(z[:, j] > 0).flatten()
        bins = ((z[rows, j].double().log10() - float(edges[0])) / width).floor().clamp(0, SHAPE.bins - 1).long()
        band = bins * SHAPE.bands // SHAPE.bins
        for b in range(SHAPE.bands):
            members = rows[band == b]
            expected = members[priority[members].argsort(descending=True)][:m]
            got = stats.band_rows[j, b * m : (b + 1) * m]
            assert set(got[got != NO_ROW].tolist()) == set(expected.tolist()), (j, b)
            for r in got[got != NO_ROW].tolist():
                assert float(stats.band_values[j, b * m + got.tolist().index(r)]) == float(z[r, j])


def test_chunking_and_rank_splits_give_the_same_statistics(data):
    z, contexts = data
    edges = log_edges(float(z.max()), SHAPE.bins)
    one = stream(z, contexts, context_cuts(contexts, 256), edges)
    cuts = context_cuts(contexts, 97)
    ranks = [LatentStats(SHAPE, edges) for _ in range(3)]
    for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        ranks[i % 3].update(Active.of_dense(z[lo:hi]), lo, contexts[lo:hi])
    merged = LatentStats.from_state(SHAPE, ranks[0].state())
    for other in ranks[1:]:
        merged.merge(other)
    for name in ("fired", "maximum", "histogram", "top_values", "top_window", "band_values"):
        assert torch.allclose(getattr(merged, name).double(), getattr(one, name).double()), name
    filled = one.top_values > 0
    assert torch.equal(merged.top_rows[filled], one.top_rows[filled])
    assert torch.equal(merged.band_rows.sort(1).values, one.band_rows.sort(1).values)


def test_neighbours_and_ground_truth_matches():
    g = torch.Generator().manual_seed(1)
    W = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    W[7] = W[3] * 2  # latent 7 points where latent 3 does
    idx, cos = nearest_latents(W, count=3, chunk=7)
    assert idx.shape == (30, 3) and int(idx[3, 0]) == 7 and float(cos[3, 0]) == pytest.approx(1.0)
    assert all(int(i) != row for row in range(30) for i in idx[row])
    unit = torch.nn.functional.normalize(W, dim=1)
    sims = (unit @ unit.T).fill_diagonal_(-2)
    assert torch.allclose(cos, sims.topk(3, dim=1).values, atol=1e-6)
    features = W[[3, 10]] * 5
    feature, cosine = best_true_features(W, features)
    assert int(feature[10]) == 1 and float(cosine[10]) == pytest.approx(1.0) and int(feature[7]) == 0


def test_row_priority_is_fixed_and_spread():
    p = row_priority(torch.arange(10_000))
    assert torch.equal(p, row_priority(torch.arange(10_000))) and float(p.min()) >= 0 and float(p.max()) < 1
    assert abs(float(p.mean()) - 0.5) < 0.02 and len(np.unique(p.numpy())) > 9_900
