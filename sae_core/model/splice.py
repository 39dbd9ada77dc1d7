"""An SAE spliced into a causal language model: CE loss and KL when the hook's output is its reconstruction.

For each batch of contexts the model runs clean, with the hooked module's output replaced by zeros (zero
ablation) and by the mean activation (mean ablation), and then once per SAE evaluated with that output
replaced by the SAE's reconstruction: several SAEs of one hook share the first three runs. Only the
positions the SAE was trained on are replaced (special tokens excluded from training keep the model's own
output). A transcoder is spliced in place of its module: the module's output is replaced by the transcoder
applied to the module's input (the clean run's: what runs before the module is the same in every run). The scores are SAELens's, so figures compare across tools:

    ce_loss_score = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)      (SAELens `ce_loss_score`)
    kl_div_score  = (KL_ablated - KL_spliced) / KL_ablated                   (SAELens `kl_div_score`)

with KL = KL(clean ‖ other) of the next-token distributions, averaged over predicted positions, and the
ablation the zero one (SAELens's); the `_mean_ablation` figures use the mean ablation instead. Sums are
float64 and reduced across ranks, so N ranks give the figures of one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..engine.distributed import all_reduce_
from .hooks import CAUSAL_LM_SUFFIXES, HookReader, find_module, first_tensor
from .loading import ModelError

Replacement = Callable[[torch.Tensor], torch.Tensor]  # [batch, tokens, width] -> the same shape


def require_causal_lm(model: torch.nn.Module) -> None:
    """ModelError unless `model` predicts the next token (its class is a ...ForCausalLM or ...LMHeadModel)."""
    if not type(model).__name__.endswith(CAUSAL_LM_SUFFIXES):
        raise ModelError(
            f"model: {type(model).__name__} is not a causal language model; the CE evaluation needs one "
            "(a ...ForCausalLM or ...LMHeadModel)"
        )


class Splicer:
    """Runs a model with one module's output replaced where `mask` is set; remembers that module's output and
    its input (what a transcoder reads)."""

    def __init__(self, model: torch.nn.Module, hook: str):
        require_causal_lm(model)
        self.model = model
        self._replace: Replacement | None = None
        self._mask: torch.Tensor | None = None
        self.captured: torch.Tensor | None = None
        self.captured_input: torch.Tensor | None = None
        self._handle = find_module(model, hook).register_forward_hook(self._hook)

    def _hook(self, _module, inputs, output):
        original = first_tensor(output)
        if original is None:
            raise ModelError(f"hook: the module's output is a {type(output).__name__}, not a tensor")
        self.captured, self.captured_input = original, first_tensor(inputs)
        if self._replace is None:
            return None
        assert self._mask is not None
        new = torch.where(self._mask[..., None], self._replace(original).to(original.dtype), original)
        if isinstance(output, torch.Tensor):
            return new
        if isinstance(output, tuple):
            return (new, *output[1:])
        raise ModelError(f"hook: the module's {type(output).__name__} output cannot be replaced")

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor, replace: Replacement | None = None, mask: torch.Tensor | None = None):
        """Next-token log-probabilities [batch, tokens - 1, vocab] (float32) of the model on `tokens`."""
        self._replace, self._mask = replace, mask
        try:
            logits = self.model(input_ids=tokens).logits
        finally:
            self._replace, self._mask = None, None
        return F.log_softmax(logits[:, :-1].float(), dim=-1)

    def close(self) -> None:
        self._handle.remove()


def cross_entropy_sum(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return -log_probs.gather(-1, tokens[:, 1:, None].long()).double().sum()


def kl_sum(clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Σ over positions of KL(clean ‖ other), from log-probabilities."""
    return (clean.exp() * (clean - other)).double().sum()


class SpliceTotals:
    """The sums one rank gathers; `reduce` adds every rank's, `figures` turns them into the reported numbers."""

    SCALARS = (
        "predicted", "replaced", "ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation",
        "kl_spliced", "kl_zero_ablation", "kl_mean_ablation", "sq_error", "sq_total", "active",
    )  # fmt: skip

    def __init__(self, d_in: int, d_sae: int, device: torch.device):
        self.scalars = torch.zeros(len(self.SCALARS), dtype=torch.float64, device=device)
        self.input_sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.fired = torch.zeros(d_sae, dtype=torch.float64, device=device)

    def add(self, name: str, value) -> None:
        self.scalars[self.SCALARS.index(name)] += value

    def __getitem__(self, name: str) -> float:
        return float(self.scalars[self.SCALARS.index(name)])

    def reduce(self) -> None:
        for tensor in (self.scalars, self.input_sum, self.fired):
            all_reduce_(tensor)

    def figures(self) -> dict:
        n, replaced = max(self["predicted"], 1.0), max(self["replaced"], 1.0)
        ce = {name: self[name] / n for name in ("ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation")}
        kl = {name: self[name] / n for name in ("kl_spliced", "kl_zero_ablation", "kl_mean_ablation")}
        variance = self["sq_total"] - float(self.input_sum.pow(2).sum()) / replaced
        return {
            **ce,
            **kl,
            "ce_loss_score": _score(ce["ce_zero_ablation"] - ce["ce_spliced"], ce["ce_zero_ablation"] - ce["ce_clean"]),
            "ce_loss_score_mean_ablation": _score(
                ce["ce_mean_ablation"] - ce["ce_spliced"], ce["ce_mean_ablation"] - ce["ce_clean"]
            ),
            "kl_div_score": _score(kl["kl_zero_ablation"] - kl["kl_spliced"], kl["kl_zero_ablation"]),
            "kl_div_score_mean_ablation": _score(kl["kl_mean_ablation"] - kl["kl_spliced"], kl["kl_mean_ablation"]),
            "explained_variance": 1 - self["sq_error"] / variance if variance > 0 else None,
            "eval_l0": self["active"] / replaced,
            "eval_dead_fraction": float((self.fired == 0).double().mean()),
            "eval_tokens": int(self["predicted"]),
            "eval_replaced_tokens": int(self["replaced"]),
        }


def _score(gained: float, possible: float) -> float | None:
    return gained / possible if possible != 0 else None


def input_mean(reader: HookReader, batches, d_in: int, device: torch.device) -> torch.Tensor:
    """The hook's mean output over the positions to replace, across every rank's contexts (mean ablation);
    the model runs only up to the hook."""
    total = torch.zeros(d_in + 1, dtype=torch.float64, device=device)
    for tokens, mask in batches():
        kept = reader(tokens)[mask].double()
        total[:d_in] += kept.sum(0)
        total[d_in] += kept.shape[0]
    all_reduce_(total)
    return (total[:d_in] / total[d_in].clamp_min(1)).float()


@torch.inference_mode()
def splice_batch(splicer: Splicer, saes, tokens: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, totals) -> None:
    """Add one batch's clean, spliced and ablated CE and KL to `totals`, for every SAE of `saes` (each encodes
    and decodes raw inputs) into its own entry of `totals`. The clean forward and the two ablations run once
    per batch, shared by all; then one spliced forward per SAE. Each SAE's sums are exactly those it gets
    evaluated alone: the same tensors, added in the same order."""
    clean = splicer.logits(tokens)
    assert splicer.captured is not None  # the hook ran
    original = splicer.captured.float()
    kept = original[mask]
    shared = {
        "zero_ablation": splicer.logits(tokens, torch.zeros_like, mask),
        "mean_ablation": splicer.logits(tokens, lambda h: mean.expand_as(h), mask),
    }
    shared_sums = [(name, cross_entropy_sum(lp, tokens), kl_sum(clean, lp)) for name, lp in shared.items()]
    ce_clean, predicted = cross_entropy_sum(clean, tokens), clean.shape[0] * clean.shape[1]
    del shared
    module_input = splicer.captured_input
    for sae, sums in zip(saes, totals, strict=True):
        reads = kept if not sae.transcoder else _transcoder_input(module_input, mask)
        latents = sae.encode(reads)
        reconstruction = torch.zeros_like(original)
        reconstruction[mask] = sae.decode(latents, reads)
        spliced = splicer.logits(tokens, _constant(reconstruction), mask)
        sums.add("predicted", predicted)
        sums.add("ce_clean", ce_clean)
        sums.add("ce_spliced", cross_entropy_sum(spliced, tokens))
        sums.add("kl_spliced", kl_sum(clean, spliced))
        for name, ce, kl in shared_sums:
            sums.add(f"ce_{name}", ce)
            sums.add(f"kl_{name}", kl)
        _add_reconstruction(sums, kept, reconstruction[mask], latents)


def _transcoder_input(module_input: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    if module_input is None:
        raise ModelError("hook: the module's input is not a tensor; a transcoder cannot read it")
    return module_input.float()[mask]


def _constant(value: torch.Tensor) -> Replacement:
    return lambda _h: value


def _add_reconstruction(totals, kept: torch.Tensor, reconstruction: torch.Tensor, latents: torch.Tensor) -> None:
    """The SAE's own figures on the replaced positions: squared error, variance, L0, which latents fired."""
    kept = kept.double()
    totals.add("replaced", kept.shape[0])
    totals.add("sq_error", (kept - reconstruction.double()).pow(2).sum())
    totals.add("sq_total", kept.pow(2).sum())
    totals.input_sum += kept.sum(0)
    fired = latents > 0
    totals.add("active", fired.sum())
    totals.fired += fired.sum(0).double()
