"""GPU memory per rank for a training config, with a named breakdown (no torch: pure arithmetic).

The target is what `nvidia-smi` will show for one rank at its worst moment: the CUDA context plus
the caching allocator's peak reservation (`torch.cuda.max_memory_reserved()`). Terms, in bytes:

Exact (same formulas as the tensors engine/saes/ and engine/trainer.py create; tests/gpu/test_memory.py
checks them against a real SparseAutoencoder and torch.optim.Adam after one step, for every architecture):
- parameters: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_dec [d_in], and the architecture's parameters per
  latent (b_enc; jumprelu's threshold, gated's r_mag and b_mag), in `cfg.dtype`.
- gradients: one per parameter, same dtype. They exist during the forward pass too: train.py frees
  them (zero_grad(set_to_none)) only after the forward.
- ddp_buckets: 0. train.py builds DDP with gradient_as_bucket_view=True, so the gradients ARE views
  into DDP's buckets; without that flag this would be another copy of the gradients.
- adam_states: exp_avg and exp_avg_sq per parameter, same dtype (Adam's `step` counters live on
  the CPU unless Adam is fused or capturable, which train.py does not ask for).
- latent_statistics: the trainer's tokens_since_fired and fire_counts (int64 [d_sae]).

Modelled (counted from the code of sae.py/train.py/evaluation.py; to be confirmed by
bench/memory_accuracy.py on a CUDA GPU — see bench/RESULTS.md):
- The peak is the largest of four moments, each on top of the persistent terms above:
  * the training step (forward or backward, whichever holds more): per-rank batch tensors
    [B, d_sae] (pre-activations, latents, masks, AuxK's masked copy, gradients), [B, d_in]
    (input, centred input, reconstruction, residuals, and the previous step's batch and
    reconstruction, which the loop keeps for logging until the next step returns), top-k values
    and int64 indices [B, k] and [B, aux_k], and under bf16 autocast the bf16 copies of W_enc /
    W_dec and of matmul inputs;
  * the optimizer step: foreach Adam allocates one temporary the size of the parameters;
  * b_dec initialisation: the first GLOBAL batch in float64 (x, x·scale, Weiszfeld temporaries),
    about 20 bytes per element of [batch_size, d_in] on every rank, before Adam states exist;
  * evaluation on rank 0 (after gradients and Adam state are freed): an fp32 copy of the SAE plus a
    4096-token chunk through it.
- allocator_headroom: the caching allocator reserves more than it hands out (block rounding,
  cached segments of other sizes): a fraction of the peak, ALLOCATOR_HEADROOM.
- cuda_context: CUDA context, kernels and libraries outside PyTorch's allocator, CUDA_CONTEXT_BYTES.
- nccl_buffers: NCCL communicator buffers when world_size > 1, NCCL_BYTES.
These three are provisional until measured: a constants file (memory_constants.py; bench/gpu_check.sh
writes one on a GPU) replaces whichever of them it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..architectures import MemoryTerms
from ..config import ConfigError, TrainConfig
from ..sweep import Sweep
from .memory_constants import (  # noqa: F401  (the constants in force, as memory.X for the estimate's readers)
    ALLOCATOR_HEADROOM,
    BUILT_IN_CONSTANTS,
    CUDA_CONTEXT_BYTES,
    NCCL_BYTES,
    CudaConstants,
    cuda_constants,
)
from .model_memory import StreamSource

MiB = 1024**2
GiB = 1024**3

EVAL_CHUNK_TOKENS = 4096  # evaluation.evaluate's default chunk
INIT_BYTES_PER_ELEMENT = 20  # fp32 batch (4) + fp64 copy (8) + fp64 scaled copy or Weiszfeld temporary (8)


# What differs between architectures (bytes per element of [B, d_sae] in the forward and backward passes,
# autocast copies, parameters per latent, selected pairs) is each architecture's `memory` (architectures/).
# [B, d_in] tensors: input before and after scaling (fp32), the previous step's x and x̂ kept by
# the loop, and model-dtype intermediates (centred x, x̂, residuals, squared errors).
_BD_FP32 = 3
_BD_MODEL = 8


@dataclass
class MemoryEstimate:
    total_bytes: int
    breakdown: dict[str, int]  # named terms; they sum to total_bytes
    per_rank_batch: int
    peak_phase: str = "training step"  # which moment sets the peak
    phases: dict[str, int] = field(default_factory=dict)  # allocator bytes at each candidate moment
    d_in: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Exact terms
# ---------------------------------------------------------------------------------------------
def dtype_bytes(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else 4


def memory_terms(cfg: TrainConfig, d_in: int) -> MemoryTerms:
    """What `cfg`'s architecture holds beyond the weights (architectures/<name>.py)."""
    return cfg.arch.memory(cfg.options, d_in)


def parameter_count(cfg: TrainConfig, d_in: int) -> int:
    """Elements of the trainable parameters of the architecture's SparseAutoencoder."""
    terms = memory_terms(cfg, d_in)
    per_latent = terms.parameters_per_latent + terms.float32_parameters_per_latent
    return 2 * d_in * cfg.d_sae + per_latent * cfg.d_sae + d_in  # W_enc, W_dec, b_dec


def parameter_bytes(cfg: TrainConfig, d_in: int) -> int:
    float32_parameters = memory_terms(cfg, d_in).float32_parameters_per_latent * cfg.d_sae
    return (parameter_count(cfg, d_in) - float32_parameters) * dtype_bytes(cfg.dtype) + 4 * float32_parameters


def adam_state_bytes(cfg: TrainConfig, d_in: int) -> int:
    return 2 * parameter_bytes(cfg, d_in)


def latent_statistics_bytes(cfg: TrainConfig) -> int:
    return 2 * 8 * cfg.d_sae  # tokens_since_fired, fire_counts: int64 [d_sae]


# ---------------------------------------------------------------------------------------------
# Modelled moments
# ---------------------------------------------------------------------------------------------
def _k_terms(terms: MemoryTerms, f: int, batch: int) -> int:
    """Selected pairs' values (model dtype) and int64 indices, for the main selection and AuxK's."""
    return batch * ((2 * f + 8) * terms.selected_per_token + (4 * f + 8) * terms.aux_per_token)


def step_activation_terms(cfg: TrainConfig, d_in: int, batch: int) -> dict[str, int]:
    """Batch tensors alive at the training step's peak (forward or backward, the larger)."""
    terms = memory_terms(cfg, d_in)
    f = dtype_bytes(cfg.dtype)
    bm = batch * cfg.d_sae
    autocast = cfg.autocast == "bf16" and cfg.dtype == "float32"
    copies = 0
    if autocast:
        # bf16 copies of W_enc (always a matmul) and of W_dec (when decoding is a matmul), held by
        # autograd until their matmul's backward; plus the bf16 copy of the latents.
        weight_copies = 2 if terms.autocast_latent_copies else 1
        copies = weight_copies * d_in * cfg.d_sae * 2 + terms.autocast_latent_copies * bm + 2 * batch * d_in
    forward = (terms.forward_per_latent[0] * f + terms.forward_per_latent[1]) * bm
    backward = (terms.backward_per_latent[0] * f + terms.backward_per_latent[1]) * bm
    inputs = 4 * _BD_FP32 + f * (_BD_MODEL + terms.extra_inputs_per_token)
    return {
        "activations_inputs_and_reconstruction": batch * d_in * inputs,
        "activations_latents": forward,
        "activations_gradients": max(0, backward - forward),
        "activations_topk": _k_terms(terms, f, batch),
        "autocast_copies": copies,
    }


def _eval_extra(cfg: TrainConfig, d_in: int, batch: int) -> int:
    if cfg.holdout_tokens <= 0:
        return 0
    chunk = min(EVAL_CHUNK_TOKENS, cfg.holdout_tokens, batch)  # the trainer never evaluates more than a batch
    fp32_copy = parameter_count(cfg, d_in) * 4 + 4 * cfg.d_sae
    return fp32_copy + memory_terms(cfg, d_in).eval_per_latent * chunk * cfg.d_sae + 3 * 4 * chunk * d_in


def _init_extra(cfg: TrainConfig, d_in: int) -> int:
    return INIT_BYTES_PER_ELEMENT * cfg.batch_size * d_in


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Share:
    """One SAE's part of a rank's memory at the per-rank batch `batch`."""

    persistent: dict[str, int]  # parameters, gradients, DDP buckets, Adam states, dead-latent counters
    activations: dict[str, int]  # the batch tensors of its training step (the feed included)
    kept: int  # its last batch (scaled) and reconstruction, which the loop keeps for logging
    params: int
    init_extra: int
    eval_extra: int

    @property
    def held(self) -> int:
        return sum(self.persistent.values())


def _share(cfg: TrainConfig, d_in: int, batch: int) -> _Share:
    params = parameter_bytes(cfg, d_in)
    persistent = {
        "parameters": params,
        "gradients": params,
        "ddp_buckets": 0,  # gradient_as_bucket_view=True: the buckets are the gradients
        "adam_states": adam_state_bytes(cfg, d_in),
        "latent_statistics": latent_statistics_bytes(cfg),
    }
    # activations live for one forward/backward: a micro-batch when gradients are accumulated
    activations = step_activation_terms(cfg, d_in, cfg.micro_batch_size or batch)
    kept = batch * d_in * (4 + dtype_bytes(cfg.dtype))  # x and x̂ kept by the loop
    return _Share(persistent, activations, kept, params, _init_extra(cfg, d_in), _eval_extra(cfg, d_in, batch))


def _group_phases(shares: list[_Share]) -> tuple[dict[str, int], int]:
    """Allocator bytes at each candidate moment of a rank that trains `shares` one after another on each batch,
    and which SAE's training step is the largest. The SAEs' persistent terms add up; one SAE steps at a time, so
    only its step's batch tensors are alive then, beside the others' kept batch and reconstruction; the batch
    as read (the feed) is one tensor for all. One SAE's phases are exactly a single run's."""
    held = sum(s.held for s in shares)
    kept = sum(s.kept for s in shares)
    steps = [held + kept - s.kept + sum(s.activations.values()) for s in shares]
    stepping = max(range(len(shares)), key=lambda i: steps[i])
    # Evaluation: the SAEs evaluate in order, each after freeing its gradients and Adam state (and the kept
    # batches are dropped before the first); the ones not yet evaluated still hold theirs.
    light = [s.params + s.persistent["latent_statistics"] for s in shares]
    evaluations = [
        sum(light[: i + 1]) + s.eval_extra + sum(t.held for t in shares[i + 1 :]) for i, s in enumerate(shares)
    ]
    phases = {
        "training step": steps[stepping],
        "optimizer step": held + kept + max(s.params for s in shares),  # foreach Adam's sqrt(exp_avg_sq) temporary
        # b_dec init runs before any gradient or Adam state exists; the first global batch is read once
        "b_dec initialisation": sum(light) + max(s.init_extra for s in shares),
        # the trainer frees gradients and Adam state before evaluating
        "evaluation (rank 0)": max(evaluations),
    }
    return phases, stepping


def group_estimate(
    cfgs: Sequence[TrainConfig], batch_ranks: int, d_in: int, world_size: int, stream: StreamSource | None = None
) -> MemoryEstimate:
    """Peak GPU memory of one rank that trains every config of `cfgs` on one feed, each batch split over
    `batch_ranks` ranks (1: whole batches), in a job of `world_size` ranks (NCCL's buffers when above 1). A feed
    streamed from a model (`stream`) adds the model's weights, its forward batch and the mixing windows, alive
    through every moment.

    Raises ConfigError when a batch does not divide by batch_ranks (or by a micro-batch)."""
    d_in = int(d_in)
    if d_in < 1:
        raise ConfigError(f"d_in must be at least 1, got {d_in}")
    if not cfgs:
        raise ConfigError("a rank needs at least one SAE to train")
    batch = cfgs[0].per_rank_batch(batch_ranks)
    shares = [_share(cfg, d_in, cfg.per_rank_batch(batch_ranks)) for cfg in cfgs]
    phases, stepping = _group_phases(shares)
    peak_phase = max(phases, key=lambda name: phases[name])
    gpu = cuda_constants()
    breakdown = {"cuda_context": gpu.cuda_context_bytes, "nccl_buffers": gpu.nccl_bytes if world_size > 1 else 0}
    for share in shares:
        for name, value in share.persistent.items():
            breakdown[name] = breakdown.get(name, 0) + value
    breakdown.update(shares[stepping].activations)
    if len(shares) > 1:
        breakdown["other_members_kept_batches"] = sum(s.kept for s in shares) - shares[stepping].kept
    # When another moment beats the training step, the difference is named after it.
    breakdown["other_peak_excess"] = phases[peak_phase] - phases["training step"]
    streamed = stream.terms() if stream is not None else {}
    breakdown.update(streamed)
    breakdown["allocator_headroom"] = int(gpu.allocator_headroom * (phases[peak_phase] + sum(streamed.values())))
    return MemoryEstimate(
        total_bytes=sum(breakdown.values()),
        breakdown=breakdown,
        per_rank_batch=batch,
        peak_phase=peak_phase,
        phases=phases,
        d_in=d_in,
    )


def estimate(cfg: TrainConfig, world_size: int, d_in: int, stream: StreamSource | None = None) -> MemoryEstimate:
    """Peak GPU memory of one rank when `cfg` trains on `world_size` GPUs, for activations `d_in` wide (streamed
    from a model: `stream`).

    Raises ConfigError when batch_size does not divide by world_size."""
    return group_estimate([cfg], world_size, d_in, world_size, stream)


# ---------------------------------------------------------------------------------------------
# A sweep: its members on each rank, in either layout
# ---------------------------------------------------------------------------------------------
@dataclass
class SweepEstimate:
    """A sweep's memory per rank in one layout: "batch" (every rank trains every member on its share of each
    batch) or "members" (member i on rank i % ranks, on whole batches). The per-GPU figure is the fullest rank's."""

    placement: str
    n_ranks: int
    ranks: list[MemoryEstimate]  # one per rank ("batch": one, every rank alike)
    members: list[list[str]]  # the members each rank trains, by name

    @property
    def worst(self) -> MemoryEstimate:
        return max(self.ranks, key=lambda est: est.total_bytes)

    @property
    def total_bytes(self) -> int:
        return self.worst.total_bytes

    def to_dict(self) -> dict:
        return {
            "placement": self.placement,
            "n_ranks": self.n_ranks,
            "total_bytes": self.total_bytes,
            "ranks": [{"members": names, **est.to_dict()} for names, est in zip(self.members, self.ranks, strict=True)],
        }


def members_on_ranks(n_members: int, n_ranks: int) -> list[list[int]]:
    """Placement "members": the member indices each rank trains (member i on rank i % n_ranks)."""
    return [list(range(rank, n_members, n_ranks)) for rank in range(n_ranks)]


def sweep_estimate(
    sweep: Sweep, n_ranks: int, d_in: int, placement: str, stream: StreamSource | None = None
) -> SweepEstimate:
    """Peak GPU memory of each rank when `sweep` trains on `n_ranks` GPUs in `placement` ("batch" or
    "members"); every rank runs the model of a streamed sweep (`stream`). ConfigError when the layout cannot run
    there: a batch that does not split over the ranks ("batch"), more ranks than members ("members")."""
    members = list(sweep.members)
    if placement == "batch":
        configs = [m.config for m in members]
        return SweepEstimate(
            "batch", n_ranks, [group_estimate(configs, n_ranks, d_in, n_ranks, stream)], [[m.name for m in members]]
        )
    if placement != "members":
        raise ConfigError(f"placement: {placement!r} is not a layout; allowed: batch, members")
    if n_ranks > len(members):
        raise ConfigError(
            f"placement members: {n_ranks} ranks for {len(members)} member(s) would leave "
            f"{n_ranks - len(members)} idle; use at most {len(members)}, or placement batch"
        )
    groups = [[members[i] for i in indices] for indices in members_on_ranks(len(members), n_ranks)]
    ranks = [group_estimate([m.config for m in group], 1, d_in, n_ranks, stream) for group in groups]
    return SweepEstimate("members", n_ranks, ranks, [[m.name for m in group] for group in groups])


# Terms that only exist on a GPU: a CPU rank has no CUDA context and talks over gloo, not NCCL.
GPU_ONLY_TERMS = ("cuda_context", "nccl_buffers")


# Host RAM of one process of a job before its first tensor: the interpreter with torch imported (about 240
# MiB resident, torch 2.13 CPU) and transformers for the model jobs (about 380 MiB), rounded up. torchrun's
# agent is one more such process per job.
PROCESS_BYTES = 400 * MiB
# Terms of a rank's GPU estimate that pass through the host's RAM on their way to the GPU: a model's weights
# (read from disk into RAM, then moved) and an SAE's.
HOST_STAGED_TERMS = ("weights", "sae", "model_weights")


def job_host_bytes(per_rank: int, ranks: int) -> int:
    """Host RAM of a whole job: each rank's own bytes and interpreter, and torchrun's agent."""
    return ranks * (per_rank + PROCESS_BYTES) + PROCESS_BYTES


def host_bytes(
    cfg: TrainConfig, ranks: int, d_in: int, on_gpu: bool = False, stream: StreamSource | None = None
) -> int:
    """Host RAM of a training job, all ranks together: each rank's loader (blocks read ahead, assembled
    float32 batches; a streamed run reads no files) and, on CPU processes, the rank's estimate without the
    GPU-only terms; on GPUs, a streamed run's model weights staged through RAM."""
    per_rank = _feed_bytes(cfg, ranks, d_in, stream, on_gpu)
    if not on_gpu:
        step = estimate(cfg, ranks, d_in, stream)
        per_rank += step.total_bytes - sum(step.breakdown[t] for t in GPU_ONLY_TERMS)
    return job_host_bytes(per_rank, ranks)


def _feed_bytes(cfg: TrainConfig, ranks: int, d_in: int, stream: StreamSource | None, on_gpu: bool) -> int:
    """A rank's feed beyond its estimate: the file loader, or a stream's model weights on their way to the GPU."""
    return cfg.loader_bytes(ranks, d_in) if stream is None else stream.terms()["model_weights"] if on_gpu else 0


def sweep_host_bytes(
    sweep: Sweep, ranks: int, d_in: int, placement: str, on_gpu: bool = False, stream: StreamSource | None = None
) -> int:
    """Host RAM of a sweep job, all ranks together: each rank's one loader (the feed every member reads: a share
    of each batch, or whole batches under "members") and, on CPU processes, its fullest rank's estimate without
    the GPU-only terms."""
    per_rank = _feed_bytes(sweep.shared, ranks if placement == "batch" else 1, d_in, stream, on_gpu)
    if not on_gpu:
        step = sweep_estimate(sweep, ranks, d_in, placement, stream).worst
        per_rank += step.total_bytes - sum(step.breakdown[t] for t in GPU_ONLY_TERMS)
    return job_host_bytes(per_rank, ranks)


def host_bytes_of_terms(terms: dict[str, int], ranks: int, on_gpu: bool) -> int:
    """Host RAM of an extraction, evaluation or inspection from one rank's estimate `terms`: on the GPU only
    what is staged through RAM, on CPU processes every term."""
    if on_gpu:
        per_rank = sum(terms.get(t, 0) for t in HOST_STAGED_TERMS)
    else:
        per_rank = sum(v for t, v in terms.items() if t not in GPU_ONLY_TERMS)
    return job_host_bytes(per_rank, ranks)


# How the estimate's terms are named on the Train page and by `python -m sae_core estimate`.
TERM_LABELS = {
    "cuda_context": "CUDA context + libraries",
    "nccl_buffers": "NCCL buffers (multi-GPU)",
    "parameters": "parameters",
    "gradients": "gradients",
    "ddp_buckets": "DDP buckets (views of the gradients)",
    "adam_states": "Adam states",
    "latent_statistics": "dead-latent counters",
    "activations_inputs_and_reconstruction": "batch: inputs + reconstruction",
    "activations_latents": "batch: pre-activations + latents",
    "activations_gradients": "batch: gradients (backward)",
    "activations_topk": "batch: top-k values + indices",
    "autocast_copies": "bf16 autocast copies",
    "other_members_kept_batches": "sweep: the other members' last batch + reconstruction",
    "other_peak_excess": "init/optimizer/evaluation peak above the step",
    "model_weights": "stream: the model's weights",
    "model_forward_batch": "stream: one forward batch",
    "model_attention_scores": "stream: attention scores",
    "mixing_window": "stream: mixing windows (read + next, per hook)",
    "kept_windows": "stream: windows queued for cache_to's writer",
    "allocator_headroom": "allocator headroom",
}
