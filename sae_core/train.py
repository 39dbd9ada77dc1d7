"""`python -m sae_core.train --config CFG.json --out DIR [--resume DIR]` — one process or under torchrun.

torchrun's environment is read once, here at the entry (RANK / LOCAL_RANK / WORLD_SIZE); the
rest of the code asks `dist.is_initialized()`. Only rank 0 prints and writes files. The global
batch is split evenly across ranks and DDP averages gradients, so 1 rank and N ranks train the
same SAE (up to float rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint
from . import sae as sae_mod
from .config import ConfigError, TrainConfig
from .data import DatasetError, Prefetcher, RankBatches, check_dataset
from .evaluation import evaluate
from .metrics import MetricsSink, default_sinks
from .sae import SparseAutoencoder, StepOutput

DEAD_CHECK_EVERY = 16  # steps between host reads of the oldest dead-latent counter

# ---------------------------------------------------------------------------------------------
# Distributed environment


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_dist_env(cfg: TrainConfig) -> DistEnv:
    """Read torchrun's variables once and pick the device; the process group starts later."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is visible to this process")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistEnv(rank, local_rank, world_size, device)


def init_process_group(env: DistEnv) -> None:
    if env.world_size > 1 and not dist.is_initialized():
        if env.device.type == "cuda":
            torch.cuda.set_device(env.device)
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo")


def all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default); a no-op on one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


# ---------------------------------------------------------------------------------------------
# Schedules (pure)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last lr_decay_steps."""
    base = cfg.effective_lr
    warmup, decay = cfg.effective_lr_warmup_steps, cfg.effective_lr_decay_steps
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    decay_start = cfg.total_steps - decay
    if decay and step >= decay_start:
        return base * (cfg.total_steps - step) / decay
    return base


def sparsity_coefficient(step: int, cfg: TrainConfig) -> float:
    warmup = cfg.effective_l1_warmup_steps
    return cfg.l1_coefficient * min(1.0, (step + 1) / warmup) if warmup else cfg.l1_coefficient


# ---------------------------------------------------------------------------------------------
# Initialisation from data


def geometric_median(points: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed distance to `points` [N, D]."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        median = (weights[:, None] * points).sum(0) / weights.sum()
    return median


@torch.no_grad()
def init_from_data(model: SparseAutoencoder, first_batch: torch.Tensor, method: str) -> None:
    """Scale inputs so E‖x‖² = d_in, and start b_dec at the data's centre (same on every rank)."""
    x = first_batch.double()
    scale = math.sqrt(model.d_in) / x.norm(dim=1).mean().clamp_min(1e-12)
    model.input_scale.fill_(float(scale))
    x = x * scale
    if method == "mean":
        model.b_dec.copy_(x.mean(0))
    elif method == "geometric_median":
        model.b_dec.copy_(geometric_median(x))


def merge_outputs(outputs: list[StepOutput]) -> StepOutput:
    """One StepOutput for equal-sized micro-batches (means averaged, counts summed; for logging)."""

    def mean(name: str) -> torch.Tensor:
        return torch.stack([getattr(o, name).detach().float() for o in outputs]).mean()

    return StepOutput(
        loss=mean("loss"),
        x_hat=torch.cat([o.x_hat.detach() for o in outputs]),
        recon_loss=mean("recon_loss"),
        sparsity_loss=mean("sparsity_loss"),
        aux_loss=mean("aux_loss"),
        l0=mean("l0"),
        fired_counts=torch.stack([o.fired_counts for o in outputs]).sum(0),
    )


# ---------------------------------------------------------------------------------------------
# Trainer


class _TrainForward(torch.nn.Module):
    """Routes DDP's forward to the SAE's training step (DDP hooks need forward to be called)."""

    def __init__(self, sae: SparseAutoencoder):
        super().__init__()
        self.sae = sae

    def forward(self, x, **kwargs):
        return self.sae.training_step(x, **kwargs)


class Trainer:
    def __init__(self, cfg: TrainConfig, out_dir: Path, env: DistEnv, data, resume_from: Path | None = None):
        self.cfg, self.out_dir, self.env, self.data = cfg, out_dir, env, data
        self.per_rank_batch = cfg.per_rank_batch(env.world_size)
        torch.manual_seed(cfg.seed)
        sae_mod.use_compiled_kernels(cfg.torch_compile)
        self.sae = SparseAutoencoder.from_config(cfg, data.d_in, device=env.device)
        self.batches = RankBatches(data.n_rows, cfg.holdout_tokens, cfg.batch_size, env.rank, env.world_size, cfg.seed)
        # fused: one kernel for all parameters (CPU and CUDA), 0.7 → 0.1 ms per step on the CPU bench
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=cfg.effective_lr, betas=(0.9, 0.999), fused=True)
        d_sae = cfg.d_sae
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64, device=env.device)
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64, device=env.device)
        self.step = 0
        self._aux_from_step = 0  # before this step no latent can be dead (see dead_mask_for_step)
        self.tokens = 0
        self.elapsed = 0.0  # training seconds before this process (for tokens/s after resume)
        if resume_from is not None:
            self.load_state(resume_from)
        else:
            first = self.data.read(self.batches.peek_global_rows()).to(env.device)
            init_from_data(self.sae, first, cfg.b_dec_init)
        # Reads batch n+1 from disk while batch n trains; its state is what the loop has consumed.
        self.reader = Prefetcher(data, self.batches, pin_memory=env.device.type == "cuda")
        self.forward = _TrainForward(self.sae)
        if dist.is_initialized() and env.world_size > 1:
            # Buffers are kept identical by construction (all-reduced statistics), so no re-broadcast.
            self.forward = DistributedDataParallel(
                self.forward,
                device_ids=[env.device.index] if env.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
                broadcast_buffers=False,
            )
        self.sinks: list[MetricsSink] = default_sinks(out_dir) if env.is_main else []

    # -- one optimizer step
    def next_batch(self) -> torch.Tensor:
        x = self.reader.next().to(self.env.device, non_blocking=True)
        return x * self.sae.input_scale

    def train_step(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, cfg)
        x = self.next_batch()
        dead = self.dead_mask_for_step()
        step_kwargs = {
            "sparsity_coefficient": sparsity_coefficient(self.step, cfg),
            "dead_mask": dead,
            "aux_k": cfg.effective_aux_k(self.sae.d_in),
            "aux_coefficient": cfg.aux_k_coefficient,
        }
        self.optimizer.zero_grad(set_to_none=True)
        out = self.forward_backward(x, step_kwargs)
        self.sae.project_decoder_grad()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.sae.normalize_decoder()
        self._track_firing(out.fired_counts)
        self.step += 1
        self.tokens += cfg.batch_size
        return {"x": x, "out": out}

    def forward_backward(self, x: torch.Tensor, step_kwargs: dict) -> StepOutput:
        """Loss and gradients of the per-rank batch, in micro-batches when asked: gradients accumulate
        locally (DDP's no_sync) and are all-reduced once, with the last chunk's backward."""
        micro = self.cfg.micro_batch_size or len(x)
        chunks = x.split(micro)
        outputs = []
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.forward, "no_sync") else self.forward.no_sync()
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cfg.autocast == "bf16" and x.is_cuda)
            with sync:
                with autocast:
                    out = self.forward(chunk, **step_kwargs)
                (out.loss * (len(chunk) / len(x))).backward()  # mean over the whole per-rank batch
            outputs.append(out)
        return outputs[0] if len(outputs) == 1 else merge_outputs(outputs)

    def dead_mask_for_step(self) -> torch.Tensor | None:
        """The dead-latent mask, or None while no latent can be dead yet (AuxK is then skipped).

        A latent is dead once `tokens_since_fired` reaches the window, which takes at least
        (window − oldest counter) / batch more steps. Reading the oldest counter is a host sync,
        so it is done at most every DEAD_CHECK_EVERY steps; the result never depends on when it
        is done (AuxK itself multiplies by "any dead" on the device)."""
        if self.step < self._aux_from_step:
            return None
        if self.step % DEAD_CHECK_EVERY == 0 or self._aux_from_step == 0:
            oldest = int(self.tokens_since_fired.max())
            safe_steps = -(-(self.cfg.dead_tokens_window - oldest) // self.cfg.batch_size)
            if safe_steps > 0:
                self._aux_from_step = self.step + safe_steps
                return None
        return self.tokens_since_fired >= self.cfg.dead_tokens_window

    def dead_fraction(self) -> float:
        """Share of latents silent for at least dead_tokens_window tokens (a host sync)."""
        return float((self.tokens_since_fired >= self.cfg.dead_tokens_window).float().mean())

    @torch.no_grad()
    def _track_firing(self, counts: torch.Tensor) -> None:
        counts = all_reduce_(counts.to(torch.int64))
        self.fire_counts += counts
        self.tokens_since_fired += self.cfg.batch_size
        self.tokens_since_fired.masked_fill_(counts > 0, 0)

    # -- metrics
    @torch.no_grad()
    def batch_metrics(self, x: torch.Tensor, out) -> dict:
        """Global-batch metrics; one all-reduce of a packed float64 vector (host sync on log steps only)."""
        x64, x_hat64 = x.double(), out.x_hat.detach().double()
        packed = torch.cat(
            [
                torch.stack(
                    [
                        (x64 - x_hat64).pow(2).sum(),
                        x64.pow(2).sum(),
                        torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
                        out.l0.double() * x.shape[0],
                        out.loss.detach().double() * x.shape[0],
                        out.aux_loss.detach().double() * x.shape[0],
                    ]
                ),
                x64.sum(0),
            ]
        )
        all_reduce_(packed)
        err, sq, n, l0_sum, loss_sum, aux_sum = packed[:6].tolist()
        mean = packed[6:] / n
        total_var = sq - n * float(mean.pow(2).sum())
        scale2 = float(self.sae.input_scale) ** 2
        return {
            "loss": loss_sum / n,
            "mse": err / (n * self.sae.d_in) / scale2,  # per element, in the data's own units
            "fvu": err / total_var if total_var > 0 else float("nan"),
            "l0": l0_sum / n,
            "dead_fraction": self.dead_fraction(),
            "aux_loss": aux_sum / n if self.cfg.architecture in ("topk", "batchtopk") else None,
        }

    def peak_memory_per_rank(self) -> list[int]:
        if self.env.device.type == "cuda":
            mine = torch.cuda.max_memory_allocated(self.env.device)
        else:
            mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        local = torch.tensor([mine], dtype=torch.int64, device=self.env.device)
        if not dist.is_initialized():
            return [int(mine)]
        gathered = [torch.zeros_like(local) for _ in range(self.env.world_size)]
        dist.all_gather(gathered, local)
        return [int(t.item()) for t in gathered]

    # -- checkpoints
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v for k, v in self.sae.state_dict().items()}
        optim_tensors, self._optim_meta = checkpoint.optimizer_to_flat(self.optimizer)
        tensors.update(optim_tensors)
        tensors["tokens_since_fired"] = self.tokens_since_fired
        tensors["fire_counts"] = self.fire_counts
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.env.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.env.device)
        return tensors

    def save_checkpoint(self, elapsed: float) -> None:
        if not self.env.is_main:
            return
        tensors = self.state_tensors()
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed": elapsed,
            "data": self.reader.state_dict(),
            "optimizer": self._optim_meta,
            "config": json.loads(self.cfg.to_json()),
        }
        checkpoint.save_checkpoint(self.out_dir, self.step, tensors, state, self.cfg.keep_checkpoints)

    def load_state(self, run_dir: Path) -> None:
        path = checkpoint.latest_checkpoint(run_dir)
        if path is None:
            raise ConfigError(f"--resume: no complete checkpoint under {run_dir / checkpoint.CHECKPOINTS}")
        tensors, state = checkpoint.load_checkpoint(path)
        model_sd = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        self.sae.load_state_dict(model_sd)
        self.optimizer.load_state_dict(checkpoint.optimizer_from_flat(tensors, state["optimizer"]))
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        self.fire_counts.copy_(tensors["fire_counts"])
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.env.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.env.device)
        self.batches.load_state_dict(state["data"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state.get("elapsed", 0.0)

    # -- the loop: schedule → step → log → checkpoint
    def run(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        last_log_time, last_log_step = start, self.step
        while self.step < cfg.total_steps:
            result = self.train_step()
            is_last = self.step == cfg.total_steps
            if self.step % cfg.log_every == 0 or is_last:
                now = time.perf_counter()
                tokens_per_s = (self.step - last_log_step) * cfg.batch_size / max(now - last_log_time, 1e-9)
                eta_s = (cfg.total_steps - self.step) * cfg.batch_size / max(tokens_per_s, 1e-9)
                self.log(result["x"], result["out"], tokens_per_s, eta_s)
                last_log_time, last_log_step = now, self.step
            if self.step % cfg.checkpoint_every == 0 or is_last:
                self.save_checkpoint(self.elapsed + time.perf_counter() - start)
        train_seconds = self.elapsed + time.perf_counter() - start
        self.reader.close()
        del result  # the last batch and its outputs
        return self.finish(train_seconds)

    def log(self, x, out, tokens_per_s: float, eta_s: float) -> None:
        record = {"step": self.step, "tokens": self.tokens, **self.batch_metrics(x, out)}
        record.update(
            lr=self.optimizer.param_groups[0]["lr"],
            tokens_per_s=tokens_per_s,
            peak_mem=self.peak_memory_per_rank(),
            time=time.time(),
            total_steps=self.cfg.total_steps,
        )
        if not self.env.is_main:
            return
        for sink in self.sinks:
            sink.write(record)
        print(progress_line(record, eta_s), flush=True)

    def finish(self, train_seconds: float) -> dict:
        """Rank 0 evaluates on the holdout and writes the SAE; every rank returns the eval figures."""
        figures = {}
        # The final checkpoint holds the optimizer; freeing gradients and Adam state here keeps the
        # evaluation below the training step's memory peak.
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        if self.env.is_main:
            figures = evaluate(
                self.sae, self.data, self.batches.holdout_rows(), self.env.device, chunk=min(4096, self.per_rank_batch)
            )
            figures.update(
                dead_fraction=self.dead_fraction(),
                tokens_per_s=self.tokens / max(train_seconds, 1e-9),
                steps=self.step,
                tokens=self.tokens,
                world_size=self.env.world_size,
            )
            write_outputs(self.sae, self.cfg, self.out_dir, self.fire_counts, self.tokens, figures)
            for sink in self.sinks:
                sink.write({"event": "done", **figures})
                sink.close()
            print(f"done: {json.dumps(figures)}", flush=True)
        if dist.is_initialized():
            dist.barrier()
        return figures


def progress_line(record: dict, eta_s: float) -> str:
    eta = time.strftime("%H:%M:%S", time.gmtime(max(eta_s, 0))) if math.isfinite(eta_s) else "?"
    return (
        f"step {record['step']}/{record['total_steps']} | {record['tokens_per_s']:,.0f} tok/s | "
        f"loss {record['loss']:.4g} | fvu {record['fvu']:.4f} | l0 {record['l0']:.1f} | ETA {eta}"
    )


# ---------------------------------------------------------------------------------------------
# Evaluation and outputs


def write_outputs(sae, cfg: TrainConfig, out_dir: Path, fire_counts, tokens: int, figures: dict) -> None:
    from safetensors.torch import save_file

    sae_mod.save(sae, out_dir, dtype=cfg.dtype, extra_meta={"dataset_path": cfg.activation_source})
    frequency = fire_counts.double().cpu() / max(tokens, 1)
    log_freq = torch.log10(frequency.clamp_min(1e-10)).float()
    save_file({"sparsity": log_freq}, str(out_dir / sae_mod.SPARSITY_FILE))
    (out_dir / "eval.json").write_text(json.dumps(figures, indent=2))
    (out_dir / "train_config.json").write_text(cfg.to_json())


# ---------------------------------------------------------------------------------------------
# Entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sae_core.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="TrainConfig JSON file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--resume", help="a run directory whose latest complete checkpoint to continue from")
    return parser.parse_args(argv)


def fail_before_training(out_dir: Path, env_rank: int, message: str) -> int:
    """Bad config or data: only the error is written to the output dir, nothing else."""
    if env_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "error.txt").write_text(message + "\n")
        print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


@record
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg = TrainConfig.from_json_file(args.config)
        env = read_dist_env(cfg)
        cfg.per_rank_batch(env.world_size)
        data = check_dataset(cfg, env.world_size)
    except (ConfigError, DatasetError) as exc:
        return fail_before_training(out_dir, rank, str(exc))
    init_process_group(env)
    try:
        if env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(cfg, out_dir, env, data, Path(args.resume) if args.resume else None)
        trainer.run()
        del trainer  # DDP's reducer and gloo's threads go before the process group, not at teardown
        gc.collect()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def exit_now(code: int) -> None:
    """Leave without interpreter teardown under torchrun: a C++ thread of the collective stack that is
    destroyed while joinable aborts the rank ("terminate called without an active exception") after
    its work is done. Every file and sink is already closed; flush what was printed, then go."""
    sys.stdout.flush()
    sys.stderr.flush()
    if "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", 1)) > 1:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_now(main())
