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
    """A fixed pseudo-random priority in [0, 1) per row number (splitmix64's finaliser): which rows a band keeps."""
    x = rows.to(torch.int64) * -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64
    x = (x ^ ((x >> 30) & 0x3FFFFFFFF)) * -4658895280553007687
    x = (x ^ ((x >> 27) & 0x1FFFFFFFFF)) * -7723592293110705685
    x = x ^ ((x >> 31) & 0x1FFFFFFFF)
    return (x & 0xFFFFFF).double() / float(1 << 24)


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
    def update(self, z: torch.Tensor, first_row: int, contexts: torch.Tensor | None = None) -> None:
        """Latents `z` [n, d_sae] of rows first_row .. first_row + n; `contexts` [n]: each row's context id
        (windows stay inside a context), None for rows without contexts."""
        n = z.shape[0]
        rows = torch.arange(first_row, first_row + n, device=z.device)
        self.rows_seen += n
        active = z > 0
        self.fired += active.sum(0)
        self.total += z.double().sum(0)
        self.maximum = torch.maximum(self.maximum, z.max(0).values.float())
        where = active.nonzero()  # (row, latent) of every activation
        values = z[where[:, 0], where[:, 1]].double()
        bins = self._bins(values)
        flat = self.histogram.view(-1)
        flat.index_add_(0, where[:, 1] * self.shape.bins + bins, torch.ones_like(bins))
        self._merge_top(z, rows, contexts)
        self._merge_bands(where[:, 1], rows[where[:, 0]], values.float(), bins)

    def _bins(self, values: torch.Tensor) -> torch.Tensor:
        low, high = float(self.edges[0]), float(self.edges[-1])
        width = (high - low) / self.shape.bins
        return ((values.log10() - low) / width).floor().clamp(0, self.shape.bins - 1).to(torch.int64)

    def _merge_top(self, z: torch.Tensor, rows: torch.Tensor, contexts: torch.Tensor | None) -> None:
        k = min(self.shape.top_k, z.shape[0])
        values, local = z.topk(k, dim=0)  # [k, d_sae]
        window, window_rows = self._windows(z, local, rows, contexts)
        self._keep_best(values.float(), rows[local], window, window_rows)

    def _keep_best(self, values, rows, window, window_rows) -> None:
        """The top_k of the kept and the new examples, largest value first and, among equal values, lowest
        row first: the same examples whichever way the rows were split into chunks or ranks."""
        all_values = torch.cat([self.top_values, values])
        all_rows = torch.cat([self.top_rows, rows])
        by_row = torch.sort(torch.where(all_rows == NO_ROW, all_rows.max() + 1, all_rows), dim=0, stable=True).indices
        by_value = torch.sort(all_values.gather(0, by_row), dim=0, descending=True, stable=True).indices
        pick = by_row.gather(0, by_value)[: self.shape.top_k]  # [top_k, d_sae]
        self.top_values = all_values.gather(0, pick)
        self.top_rows = all_rows.gather(0, pick)
        spread = pick[..., None].expand(-1, -1, self.shape.window)
        self.top_window = torch.cat([self.top_window, window]).gather(0, spread)
        self.top_window_rows = torch.cat([self.top_window_rows, window_rows]).gather(0, spread)

    def _windows(self, z, local, rows, contexts):
        """Each candidate's latent activation on the rows around it (same context only), and those rows."""
        n, d = z.shape
        offsets = torch.arange(-self.shape.before, self.shape.after + 1, device=z.device)
        around = local[..., None] + offsets  # [k, d_sae, window] chunk-local rows
        valid = (around >= 0) & (around < n)
        clamped = around.clamp(0, n - 1)
        if contexts is None:
            valid &= offsets == 0
        else:
            valid &= contexts[clamped] == contexts[local][..., None]
        latent = torch.arange(d, device=z.device)[None, :, None].expand_as(clamped)
        window = torch.where(valid, z[clamped, latent], torch.zeros((), device=z.device)).float()
        return window, torch.where(valid, rows[clamped], torch.full_like(clamped, NO_ROW))

    def _merge_bands(self, latents, rows, values, bins) -> None:
        """Keep, per (latent, band), the `band_examples` rows of largest priority among the kept and the new."""
        s = self.shape
        band = bins * s.bands // s.bins
        kept = self.band_rows != NO_ROW
        slot_latent = torch.arange(s.d_sae, device=rows.device)[:, None].expand_as(self.band_rows)
        slot_band = torch.arange(s.bands, device=rows.device).repeat_interleave(s.band_examples)[None, :]
        all_latent = torch.cat([slot_latent[kept], latents])
        all_band = torch.cat([slot_band.expand_as(self.band_rows)[kept], band])
        all_rows = torch.cat([self.band_rows[kept], rows])
        all_values = torch.cat([self.band_values[kept], values])
        all_priority = torch.cat([self.band_priority[kept], row_priority(rows)])
        group = all_latent * s.bands + all_band
        # order by group, then priority descending; the first band_examples of each group are kept
        order = torch.argsort(group.double() * 2 - all_priority, stable=True)
        group = group[order]
        starts = torch.searchsorted(group, group, right=False)
        rank = torch.arange(len(group), device=group.device) - starts
        keep = order[rank < s.band_examples]
        slots = (all_band[keep] * s.band_examples + rank[rank < s.band_examples]).long()
        self.band_rows.fill_(NO_ROW)
        self.band_priority.fill_(-1.0)
        self.band_rows[all_latent[keep], slots] = all_rows[keep]
        self.band_values[all_latent[keep], slots] = all_values[keep]
        self.band_priority[all_latent[keep], slots] = all_priority[keep]

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
