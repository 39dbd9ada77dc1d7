"""BatchTopK SAE: the k × B largest pre-activations of a whole batch (each token keeps its own number). At
inference a learned threshold replaces the batch rule, so it is saved as a JumpReLU (Bussmann et al. 2024)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ...architectures.batchtopk import ARCHITECTURE
from ...architectures.groups import TopKFamilyOptions
from .. import cpu_kernels
from ..sparse import Selection
from .topk import TopKSAE

BATCHTOPK_THRESHOLD_DECAY = 0.99  # EMA of the smallest selected activation per batch


class BatchTopKSAE(TopKSAE):
    spec = ARCHITECTURE
    batch_threshold: torch.Tensor

    def __init__(self, d_in: int, d_sae: int, options: TopKFamilyOptions | None = None, **base):
        super().__init__(d_in, d_sae, options, **base)
        # Learned during training as an EMA; used at inference (and saved as jumprelu threshold).
        self.register_buffer("batch_threshold", torch.zeros((), dtype=self.W_enc.dtype, device=self.W_enc.device))

    @property
    def threshold(self) -> torch.Tensor:
        return self.batch_threshold.expand(self.d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold)

    def inference_selection(self, x: torch.Tensor) -> Selection | None:  # noqa: ARG002
        return None  # the inference rule is the threshold's, not a per-row top-k

    def extra_export_tensors(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.threshold.detach().clone()}

    def saved_config(self) -> dict:
        return {}  # saved as a JumpReLU: no k

    def dense_latents(self, pre: torch.Tensor) -> torch.Tensor:
        z = batch_topk(pre.relu(), self.k)
        self.after_selection(z, z > 0)
        return z

    @torch.no_grad()
    def select(self, pre: torch.Tensor) -> Selection:
        """BatchTopK's k × B largest relu'd pre-activations of the GLOBAL batch, as this rank's flat list of
        pairs (row-major), so that 1 and N ranks select alike.

        A lower bound for the batch threshold comes cheaply (each rank's (k·B_rank)-th largest of its rows' 2k
        best; the smallest over ranks) and is raised by bisection while at least k·B entries of all ranks stay
        at or above it; every positive entry at or above it is a candidate (early in training a few rows hold
        hundreds, most rows none), and the selection is the k·B largest candidates of all ranks. Exact; a few
        host syncs (and on several ranks a few small collectives) a step."""
        world = _world_size()
        selected = self.k * len(pre) * world  # ranks hold equal shares of the global batch
        best = cpu_kernels.row_topk(pre, min(2 * self.k, self.d_sae))[0].flatten()
        low = float(best.kthvalue(max(best.numel() - self.k * len(pre) + 1, 1)).values)
        low = _over_ranks(low, dist.ReduceOp.MIN, pre.device)
        high = _over_ranks(float(best.max()), dist.ReduceOp.MAX, pre.device)
        low, holds = _raise_lower_bound(pre, low, high, selected)
        found = cpu_kernels.collect_positive_at_least(pre, low, holds)
        if found is None:  # torch: CUDA, other dtypes, no C compiler
            rows, latents = ((pre >= low) & (pre > 0)).nonzero(as_tuple=True)
            found = pre[rows, latents], latents, rows
        values, latents, rows = found
        chosen = (
            _largest(values, selected) if world > 1 else values.topk(min(selected, len(values)), sorted=False).indices
        )
        chosen = chosen.sort().values
        return Selection(values[chosen], latents[chosen], rows[chosen])

    @torch.no_grad()
    def after_selection(self, vals: torch.Tensor, active: torch.Tensor) -> None:
        z = vals
        smallest = (
            torch.where(active, z, torch.full_like(z, torch.inf)).amin() if z.numel() else z.new_full((), torch.inf)
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
        # Branch-free on the device (no host sync): a batch with nothing active leaves the threshold as is.
        first = self.batch_threshold == 0
        blended = BATCHTOPK_THRESHOLD_DECAY * self.batch_threshold + (1 - BATCHTOPK_THRESHOLD_DECAY) * smallest
        updated = torch.where(first, smallest, blended)
        self.batch_threshold.copy_(torch.where(torch.isfinite(smallest), updated, self.batch_threshold))


def _raise_lower_bound(pre: torch.Tensor, low: float, high: float, selected: int) -> tuple[float, torch.Tensor]:
    """(bound, this rank's per-row counts of the positive entries >= bound): `low` raised by bisection towards
    `high` while at least `selected` positive entries of all ranks stay at or above it (then the selected-th
    largest relu'd value is still >= the bound), until at most twice `selected` do. One counting pass per
    step; every rank takes the same decisions (the counts are summed over the ranks)."""
    holds = cpu_kernels.count_positive_at_least(pre, low)
    low = max(low, 0.0)
    for _ in range(8):
        if _over_ranks(int(holds.sum()), device=pre.device) <= 2 * selected or high <= low:
            break
        middle = (low + high) / 2
        counts = cpu_kernels.count_positive_at_least(pre, middle)
        if _over_ranks(int(counts.sum()), device=pre.device) >= selected:
            low, holds = middle, counts
        else:
            high = middle
    return low, holds


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _over_ranks(value, op=None, device: torch.device | None = None):
    """A host number combined over the ranks (summed by default), through `device` (NCCL's are CUDA
    tensors); itself on one process."""
    if _world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return type(value)(tensor.item())


def _largest(values: torch.Tensor, selected: int) -> torch.Tensor:
    """Indices of this rank's `values` among the `selected` largest of every rank's (ties at the boundary go
    to the lower ranks first, then in local order: the same split on every rank)."""
    longest = _over_ranks(len(values), dist.ReduceOp.MAX, values.device)
    padded = values.new_full((longest,), -torch.inf)
    padded[: len(values)] = values
    gathered = [torch.empty_like(padded) for _ in range(_world_size())]
    dist.all_gather(gathered, padded)
    everyone = torch.cat(gathered)
    if int(torch.isfinite(everyone).sum()) <= selected:
        return torch.arange(len(values), device=values.device)
    boundary = everyone.topk(selected, sorted=False).values.min()
    ties_before = sum(int((g == boundary).sum()) for g in gathered[: dist.get_rank()])
    quota = selected - int((everyone > boundary).sum()) - ties_before
    ties = values == boundary
    keep = (values > boundary) | (ties & (ties.cumsum(0) <= quota))
    return keep.nonzero().squeeze(1)


def batch_topk(acts: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k × B largest entries of acts [B, d_sae] across the whole batch."""
    flat = acts.flatten()
    vals, idx = flat.topk(k * acts.shape[0], sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(acts)
