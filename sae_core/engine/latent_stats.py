"""Per-latent statistics of an SAE over a stream of rows, in bounded memory: what the Explore page shows.

`LatentStats.update` takes one chunk of rows at a time (their latents [n, d_sae], dense for the chunk only)
and keeps, per latent: how often it fired, the sum and maximum of its activations, a histogram of log10
activations over fixed edges, the `top_k` largest activations with their rows (exact: the chunk's best
merged with the best so far), and a few rows per activation band (bands group the histogram's bins; in each
the rows with the largest hash of their row number are kept, a deterministic uniform sample). For rows
that come with their contexts (an extraction), each top example also keeps the latent's activation on the
rows around it in the same context (`window` rows), taken from the same chunk (chunks hold whole contexts).
Nothing here is O(rows × d_sae) beyond one chunk. `merge` combines the states of ranks that saw disjoint
rows, so N ranks give the statistics of one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..latents import WINDOW_AFTER, WINDOW_BEFORE

NO_ROW = -1


class Active:
    """The positive latents of a chunk of `n` rows as (row, latent, value) triplets in row-major order (rows
    ascending, latents ascending within a row): what an SAE's sparse encode gives, without a dense
    [n, d_sae] tensor."""

    def __init__(self, n: int, d_sae: int, rows: torch.Tensor, latents: torch.Tensor, values: torch.Tensor):
        self.n, self.d_sae = n, d_sae
        self.rows, self.latents, self.values = rows.long(), latents.long(), values
        self._keys = self.rows * d_sae + self.latents  # ascending: the triplets' order

    @classmethod
    def of_dense(cls, z: torch.Tensor) -> Active:
        where = (z > 0).nonzero()  # row-major
        return cls(z.shape[0], z.shape[1], where[:, 0], where[:, 1], z[where[:, 0], where[:, 1]])

    def value_at(self, rows: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The activation of latent `latents` on chunk row `rows` (0 where it did not fire), elementwise."""
        query = rows * self.d_sae + latents
        if not len(self.values):
            return torch.zeros(query.shape, dtype=torch.float32, device=query.device)
        at = torch.searchsorted(self._keys, query).clamp(max=len(self._keys) - 1)
        return torch.where(self._keys[at] == query, self.values[at].float(), torch.zeros((), device=query.device))


@torch.no_grad()
def encode_active(sae, x: torch.Tensor) -> Active:
    """The SAE's positive latents on `x` as triplets; a TopK SAE's straight from its row top-k (the kernel
    its training uses), never a dense [n, d_sae] latent tensor; others through their dense encode."""
    selection = sae.inference_selection(x)
    if selection is not None:
        idx, order = torch.sort(selection.idx, dim=1)  # latents ascending within each row
        values = selection.values.gather(1, order)
        positive = values > 0
        rows = torch.arange(len(x), device=x.device)[:, None].expand_as(idx)
        return Active(len(x), sae.d_sae, rows[positive], idx[positive], values[positive])
    return Active.of_dense(sae.encode(x))


@dataclass(frozen=True)
class StatsShape:
    d_sae: int
    top_k: int = 20
    bins: int = 40
    bands: int = 4
    band_examples: int = 3
    before: int = WINDOW_BEFORE  # rows of a top example's window before its peak
    after: int = WINDOW_AFTER  # and after

    @property
    def window(self) -> int:
        return self.before + 1 + self.after


def log_edges(max_activation: float, bins: int, decades: float = 4.0) -> torch.Tensor:
    """`bins + 1` log10 edges from `decades` below the largest activation to a little above it."""
    top = torch.log10(torch.tensor(max(max_activation, 1e-12), dtype=torch.float64)) + 0.1
    return torch.linspace(float(top) - decades, float(top), bins + 1, dtype=torch.float64)


def row_priority(rows: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random priority in [0, 1) per row number (splitmix64's finaliser, 53 bits: distinct for
    distinct rows in practice): which rows a band keeps."""
    x = rows.to(torch.int64) * -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
    x = (x ^ ((x >> 30) & 0x3FFFFFFFF)) * -4658895280553007687
    x = (x ^ ((x >> 27) & 0x1FFFFFFFFF)) * -7723592293110705685
    x = x ^ ((x >> 31) & 0x1FFFFFFFF)
    return ((x >> 11) & 0x1FFFFFFFFFFFFF).double() / float(1 << 53)


class LatentStats:
    def __init__(self, shape: StatsShape, edges: torch.Tensor, device: torch.device | str = "cpu"):
        d, k = shape.d_sae, shape.top_k
        self.shape, self.edges = shape, edges.to(device)
        self.rows_seen = 0
        self.fired = torch.zeros(d, dtype=torch.int64, device=device)
        self.total = torch.zeros(d, dtype=torch.float64, device=device)
        self.maximum = torch.zeros(d, dtype=torch.float32, device=device)
        self.histogram = torch.zeros(d, shape.bins, dtype=torch.int64, device=device)
        self.top_values = torch.zeros(k, d, dtype=torch.float32, device=device)
        self.top_rows = torch.full((k, d), NO_ROW, dtype=torch.int64, device=device)
        self.top_window = torch.zeros(k, d, shape.window, dtype=torch.float32, device=device)
        self.top_window_rows = torch.full((k, d, shape.window), NO_ROW, dtype=torch.int64, device=device)
        m = shape.bands * shape.band_examples
        self.band_rows = torch.full((d, m), NO_ROW, dtype=torch.int64, device=device)
        self.band_values = torch.zeros(d, m, dtype=torch.float32, device=device)
        self.band_priority = torch.full((d, m), -1.0, dtype=torch.float64, device=device)

    # -- one chunk
    @torch.no_grad()
    def update(self, active: Active, first_row: int, contexts: torch.Tensor | None = None) -> None:
        """The positive latents `active` of rows first_row .. first_row + active.n; `contexts` [n]: each
        row's context id (windows stay inside a context), None for rows without contexts."""
        rows, latents, values = active.rows, active.latents, active.values
        self.rows_seen += active.n
        self.fired += torch.bincount(latents, minlength=self.shape.d_sae)
        self.total.index_add_(0, latents, values.double())
        self.maximum.scatter_reduce_(0, latents, values.float(), "amax")
        bins = self._bins(values.double())
        self.histogram.view(-1).index_add_(0, latents * self.shape.bins + bins, torch.ones_like(bins))
        self._merge_top(active, first_row, contexts)
        self._merge_bands(latents, rows + first_row, values.float(), bins)

    def _bins(self, values: torch.Tensor) -> torch.Tensor:
        low, high = float(self.edges[0]), float(self.edges[-1])
        width = (high - low) / self.shape.bins
        return ((values.log10() - low) / width).floor().clamp(0, self.shape.bins - 1).to(torch.int64)

    def _merge_top(self, active: Active, first_row: int, contexts: torch.Tensor | None) -> None:
        """The chunk's best `top_k` per latent (largest value, then lowest row), with their windows, merged.
        Only activations above a latent's k-th best so far can enter (a rank's rows arrive in ascending
        order, so an equal value loses to the earlier row): after the first chunks, few are looked at."""
        k, w = self.shape.top_k, self.shape.window
        kth = torch.where(self.top_rows[-1] != NO_ROW, self.top_values[-1], torch.zeros_like(self.top_values[-1]))
        enters = torch.nonzero(active.values.float() > kth[active.latents]).flatten()
        if not len(enters):
            return
        latents, values, rows = active.latents[enters], active.values[enters].float(), active.rows[enters]
        by_value = torch.sort(values, descending=True, stable=True).indices  # rows ascending among ties
        order = by_value[torch.sort(latents[by_value], stable=True).indices]
        ranked = latents[order]
        rank = torch.arange(len(order), device=latents.device) - torch.searchsorted(ranked, ranked)
        keep, slot = order[rank < k], rank[rank < k]
        cols = torch.unique(latents[keep])
        col = torch.searchsorted(cols, latents[keep])
        shape = (k, len(cols))
        new_values = torch.zeros(shape, dtype=torch.float32, device=latents.device)
        new_rows = torch.full(shape, NO_ROW, dtype=torch.int64, device=latents.device)
        new_window = torch.zeros((*shape, w), dtype=torch.float32, device=latents.device)
        new_window_rows = torch.full((*shape, w), NO_ROW, dtype=torch.int64, device=latents.device)
        new_values[slot, col], new_rows[slot, col] = values[keep], rows[keep] + first_row
        window, window_rows = self._windows(active, rows[keep], latents[keep], contexts)
        new_window[slot, col] = window
        new_window_rows[slot, col] = torch.where(window_rows == NO_ROW, window_rows, window_rows + first_row)
        self._keep_best(new_values, new_rows, new_window, new_window_rows, cols)

    def _keep_best(self, values, rows, window, window_rows, cols: torch.Tensor | None = None) -> None:
        """The top_k of the kept and the new examples of latents `cols` (all: None), largest value first and,
        among equal values, lowest row first: the same examples however the rows were split into chunks or
        ranks."""
        at = slice(None) if cols is None else cols
        all_values = torch.cat([self.top_values[:, at], values])
        all_rows = torch.cat([self.top_rows[:, at], rows])
        by_row = torch.sort(torch.where(all_rows == NO_ROW, all_rows.max() + 1, all_rows), dim=0, stable=True).indices
        by_value = torch.sort(all_values.gather(0, by_row), dim=0, descending=True, stable=True).indices
        pick = by_row.gather(0, by_value)[: self.shape.top_k]  # [top_k, len(cols)]
        spread = pick[..., None].expand(-1, -1, self.shape.window)
        self.top_window[:, at] = torch.cat([self.top_window[:, at], window]).gather(0, spread)
        self.top_window_rows[:, at] = torch.cat([self.top_window_rows[:, at], window_rows]).gather(0, spread)
        self.top_values[:, at] = all_values.gather(0, pick)
        self.top_rows[:, at] = all_rows.gather(0, pick)

    def _windows(self, active: Active, rows: torch.Tensor, latents: torch.Tensor, contexts: torch.Tensor | None):
        """The latent's activation on the chunk's rows around each (row, latent) example (same context only)
        and those rows (chunk-local; NO_ROW outside): [examples, window] each."""
        offsets = torch.arange(-self.shape.before, self.shape.after + 1, device=rows.device)
        around = rows[:, None] + offsets
        valid = (around >= 0) & (around < active.n)
        clamped = around.clamp(0, active.n - 1)
        if contexts is None:
            valid &= offsets == 0
        else:
            valid &= contexts[clamped] == contexts[rows][:, None]
        acts = active.value_at(clamped, latents[:, None].expand_as(clamped))
        window = torch.where(valid, acts, torch.zeros((), device=rows.device))
        return window.float(), torch.where(valid, clamped, torch.full_like(clamped, NO_ROW))

    def _merge_bands(self, latents, rows, values, bins) -> None:
        """Keep, per (latent, band), the `band_examples` rows of largest priority among the kept and the new.
        Only a row above the lowest priority of a full group can enter it, and only groups something
        enters are re-sorted."""
        s = self.shape
        m = s.band_examples
        band = bins * s.bands // s.bins
        priority = row_priority(rows)
        kept_priority = self.band_priority.view(s.d_sae, s.bands, m)
        lowest = kept_priority.min(-1).values  # -1 while a group has a free slot
        enters = torch.nonzero(priority > lowest[latents, band]).flatten()
        if not len(enters):
            return
        group = latents[enters] * s.bands + band[enters]
        touched = torch.unique(group)
        t_latent, t_band = touched // s.bands, touched % s.bands
        old_rows = self.band_rows.view(s.d_sae, s.bands, m)[t_latent, t_band]  # [touched, m]
        old_values = self.band_values.view(s.d_sae, s.bands, m)[t_latent, t_band]
        old_priority = kept_priority[t_latent, t_band]
        filled = old_rows != NO_ROW
        all_group = torch.cat([touched[:, None].expand_as(old_rows)[filled], group])
        all_rows = torch.cat([old_rows[filled], rows[enters]])
        all_values = torch.cat([old_values[filled], values[enters]])
        all_priority = torch.cat([old_priority[filled], priority[enters]])
        # order by group, then priority descending; the first m of each group are kept
        by_priority = torch.sort(all_priority, descending=True, stable=True).indices
        order = by_priority[torch.sort(all_group[by_priority], stable=True).indices]
        sorted_group = all_group[order]
        rank = torch.arange(len(order), device=order.device) - torch.searchsorted(sorted_group, sorted_group)
        keep, slot = order[rank < m], rank[rank < m]
        where = torch.searchsorted(touched, all_group[keep])
        new_rows = torch.full_like(old_rows, NO_ROW)
        new_values = torch.zeros_like(old_values)
        new_priority = torch.full_like(old_priority, -1.0)
        new_rows[where, slot], new_values[where, slot] = all_rows[keep], all_values[keep]
        new_priority[where, slot] = all_priority[keep]
        self.band_rows.view(s.d_sae, s.bands, m)[t_latent, t_band] = new_rows
        self.band_values.view(s.d_sae, s.bands, m)[t_latent, t_band] = new_values
        kept_priority[t_latent, t_band] = new_priority

    # -- ranks
    def merge(self, other: LatentStats) -> None:
        """Add the statistics of rows another rank saw (disjoint from these)."""
        self.rows_seen += other.rows_seen
        self.fired += other.fired
        self.total += other.total
        self.maximum = torch.maximum(self.maximum, other.maximum)
        self.histogram += other.histogram
        self._keep_best(other.top_values, other.top_rows, other.top_window, other.top_window_rows)
        kept = other.band_rows != NO_ROW
        s = self.shape
        device = other.band_rows.device
        band = torch.arange(s.bands, device=device).repeat_interleave(s.band_examples)[None, :]
        band = band.expand_as(other.band_rows)
        latent = torch.arange(s.d_sae, device=device)[:, None].expand_as(other.band_rows)
        bins = (band[kept] * s.bins + s.bands - 1) // s.bands  # a bin of the band: `_merge_bands` maps it back
        self._merge_bands(latent[kept], other.band_rows[kept], other.band_values[kept], bins)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in STATE_TENSORS} | {
            "rows_seen": torch.tensor([self.rows_seen]),
            "edges": self.edges,
        }

    @classmethod
    def from_state(cls, shape: StatsShape, state: dict[str, torch.Tensor]) -> LatentStats:
        stats = cls(shape, state["edges"])
        for name in STATE_TENSORS:
            setattr(stats, name, state[name].clone())
        stats.rows_seen = int(state["rows_seen"][0])
        return stats


STATE_TENSORS = (
    "fired", "total", "maximum", "histogram", "top_values", "top_rows", "top_window", "top_window_rows",
    "band_rows", "band_values", "band_priority",
)  # fmt: skip


def nearest_latents(W_dec: torch.Tensor, count: int = 5, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Each latent's `count` nearest others by decoder cosine: (indices, cosines) [d_sae, count]."""
    unit = torch.nn.functional.normalize(W_dec.float(), dim=1)
    count = min(count, unit.shape[0] - 1)
    indices, cosines = [], []
    for start in range(0, unit.shape[0], chunk):
        sims = unit[start : start + chunk] @ unit.T
        sims[torch.arange(sims.shape[0]), torch.arange(start, start + sims.shape[0])] = -2.0  # not itself
        best = sims.topk(count, dim=1)
        indices.append(best.indices)
        cosines.append(best.values)
    return torch.cat(indices).to(torch.int32), torch.cat(cosines)


def best_true_features(W_dec: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each latent's best-matching ground-truth feature by decoder cosine: (index, cosine) [d_sae]."""
    sims = (
        torch.nn.functional.normalize(W_dec.float(), dim=1) @ torch.nn.functional.normalize(features.float(), dim=1).T
    )
    best = sims.max(dim=1)
    return best.indices.to(torch.int32), best.values


def logit_effects(W_dec: torch.Tensor, unembedding: torch.Tensor, count: int = 10):
    """Each latent's direct effect on the logits (its decoder row through the unembedding [vocab, d_in]):
    the `count` most raised and most lowered tokens, as (top ids, top values, bottom ids, bottom values)."""
    effects = W_dec.float() @ unembedding.float().T  # [d_sae, vocab]
    top, bottom = effects.topk(count, dim=1), (-effects).topk(count, dim=1)
    return top.indices.to(torch.int32), top.values, bottom.indices.to(torch.int32), -bottom.values
