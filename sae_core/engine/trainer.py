"""The training loop: one Trainer per rank reads its slice of each global batch, steps, logs, checkpoints.

Only rank 0 prints and writes files. The global batch is split evenly across ranks and DDP averages
gradients, so 1 rank and N ranks train the same SAE (up to float rounding). The loop reads as phases:
schedule → step → log → checkpoint; the maths lives in small functions (schedule.py, sae.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from ..config import TrainConfig
from ..data.loader import DeviceFeed, Loader
from ..data.order import BlockOrder, blocks_for
from ..files import EVAL_FILE, METRICS_FILE, SPARSITY_FILE, TRAIN_CONFIG_FILE
from ..text import format_duration
from . import checkpoint
from .distributed import DistEnv, all_reduce_
from .evaluation import evaluate
from .saelens import save
from .saes import SparseAutoencoder, StepContext, StepOutput, sae_from_config
from .schedule import init_from_data, learning_rate
from .sinks import JsonlSink, MetricsSink, report_done

DEAD_CHECK_EVERY = 16  # steps between host reads of the oldest dead-latent counter


def merge_outputs(outputs: list[StepOutput]) -> StepOutput:
    """One StepOutput for equal-sized micro-batches (means averaged, counts summed; for logging)."""

    def mean(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.as_tensor(v).detach().float() for v in values]).mean()

    first = outputs[0]
    return StepOutput(
        x_hat=torch.cat([o.x_hat.detach() for o in outputs]),
        losses={name: mean([o.losses[name] for o in outputs]) for name in first.losses},
        l0=mean([o.l0 for o in outputs]),
        fired_counts=torch.stack([o.fired_counts for o in outputs]).sum(0),
        stats={name: mean([o.stats[name] for o in outputs]) for name in first.stats},
    )


class _TrainForward(torch.nn.Module):
    """Routes DDP's forward to the SAE's training step (DDP hooks need forward to be called)."""

    def __init__(self, sae: SparseAutoencoder):
        super().__init__()
        self.sae = sae

    def forward(self, x, ctx: StepContext, target=None):
        return self.sae.training_step(x, ctx, target=target)


class Trainer:
    """One SAE's training: its module, optimizer, firing counters, checkpoints and metrics, and (for a single run)
    the loop. A sweep (sweep_trainer.py) runs several on one shared feed: it passes `feed` (the order and the
    reader every member steps on), `first` (the first global batch, read once), `collective` (False when this
    rank trains the member on whole batches alone: no DDP, no all-reduce), `writes` (this rank writes the member's
    files) and `name` (carried by its metric records)."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: Path,
        env: DistEnv,
        data,
        resume_from: Path | None = None,
        extra_sinks: Callable[[], list[MetricsSink]] | None = None,
        *,
        feed: tuple[BlockOrder, DeviceFeed] | None = None,
        first: torch.Tensor | None = None,
        collective: bool = True,
        writes: bool | None = None,
        name: str | None = None,
        stream=None,
        target_data=None,
    ):
        """`extra_sinks()` is asked on the writing rank only, for sinks besides metrics.jsonl (the job store's).
        `stream` (model/stream.py's Stream): the activations come from a model as training reads them; `data` is
        then unused (the held-out rows are the stream's). A transcoder (cfg.transcoder) reads its module's input
        and predicts its output: `target_data`, the held-out rows of the output (a sweep's member is given them;
        a single run takes them from the stream)."""
        self.input_key = cfg.input_key if cfg.streamed else None
        self.target_key = cfg.target_key if cfg.streamed else None  # None: the SAE reconstructs its input
        if stream is not None and feed is None:  # a single run from a model
            feed, first = (stream.order, stream.feed), stream.feed.first_batch()
            data, target_data = stream.holdout[self.input_key], stream.holdout.get(self.target_key)
        self.cfg, self.out_dir, self.env, self.data, self.target_data = cfg, out_dir, env, data, target_data
        self.collective = collective and env.world_size > 1
        self.writes = env.is_main if writes is None else writes
        self.name = name
        self.per_rank_batch = cfg.per_rank_batch(env.world_size if collective else 1)
        torch.manual_seed(cfg.effective_init_seed)
        d_out = target_data.d_in if target_data is not None else None
        self.sae = sae_from_config(cfg, data.d_in, device=env.device, d_out=d_out)
        self.order = feed[0] if feed is not None else data_order(cfg, data)
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
        else:  # every rank initialises from the whole first global batch, so all start alike
            if first is None:
                first = torch.from_numpy(self.data.read(self.order.global_rows(self.order.key))).to(env.device)
            target = pick(first, self.target_key) if self.target_key else None
            init_from_data(self.sae, pick(first, self.input_key), cfg.b_dec_init, target)
        self.reader = feed[1] if feed is not None else self._own_reader()
        self._waited_at_log = 0.0  # the reader's wait_seconds at the last metric record
        self.forward: torch.nn.Module = _TrainForward(self.sae)
        if self.collective and dist.is_initialized():
            self.forward = data_parallel(self.forward, env.device)
        self.sinks: list[MetricsSink] = []
        if self.writes:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.sinks = [JsonlSink(out_dir / METRICS_FILE), *(extra_sinks() if extra_sinks else [])]

    def _own_reader(self) -> DeviceFeed:
        """Reads the coming batches' blocks while this one trains; its state is what the loop has consumed."""
        return open_feed(self.cfg, self.data, self.order, self.env, self.env.rank, self.env.world_size)

    # -- one optimizer step
    def train_step(self) -> tuple[torch.Tensor, StepOutput]:
        """One optimizer step on the reader's next batch; returns this rank's (scaled) batch and the step's
        output, for logging."""
        return self.step_on(self.reader.next())

    def step_on(self, batch: torch.Tensor) -> tuple[torch.Tensor, StepOutput]:
        """One optimizer step on `batch` as read (this rank's share, or the whole batch); returns what the step
        reconstructed, scaled: the member's rows, or a transcoder's target rows."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, cfg)
        x = pick(batch, self.input_key) * self.sae.input_scale
        y = pick(batch, self.target_key) * self.sae.output_scale if self.target_key else None
        ctx = StepContext(self.step, cfg.total_steps, self.dead_mask_for_step())
        self.optimizer.zero_grad(set_to_none=True)
        out = self.forward_backward(x, ctx, y)
        self.sae.project_decoder_grad()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.sae.normalize_decoder()
        self.sae.after_optimizer_step(out, ctx)
        self._track_firing(out.fired_counts)
        self.step += 1
        self.tokens += cfg.batch_size
        return (x if y is None else y), out

    def forward_backward(self, x: torch.Tensor, ctx: StepContext, target: torch.Tensor | None = None) -> StepOutput:
        """Loss and gradients of the per-rank batch (and a transcoder's target rows), in micro-batches when
        asked: gradients accumulate locally (DDP's no_sync) and are all-reduced once, with the last chunk's
        backward."""
        micro = self.cfg.micro_batch_size or len(x)
        chunks = x.split(micro)
        targets = target.split(micro) if target is not None else [None] * len(chunks)
        outputs = []
        for i, (chunk, chunk_target) in enumerate(zip(chunks, targets, strict=True)):
            last = i == len(chunks) - 1
            no_sync = getattr(self.forward, "no_sync", None)  # DDP's; a single process has none
            sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cfg.autocast == "bf16" and x.is_cuda)
            with sync:
                with autocast:
                    out = self.forward(chunk, ctx, chunk_target)
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

    def _reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Summed over the ranks that share this SAE's batches (none but this one when it is not collective)."""
        return all_reduce_(tensor) if self.collective else tensor

    @torch.no_grad()
    def _track_firing(self, counts: torch.Tensor) -> None:
        counts = self._reduce(counts.to(torch.int64))
        self.fire_counts += counts
        self.tokens_since_fired += self.cfg.batch_size
        self.tokens_since_fired.masked_fill_(counts > 0, 0)

    # -- metrics
    @torch.no_grad()
    def batch_metrics(self, x: torch.Tensor, out: StepOutput) -> dict:
        """Global-batch metrics, the architecture's named loss terms and stats among them; one all-reduce of a
        packed float64 vector (host sync on log steps only). Every rank's step returns the same names. `x` is
        what the step reconstructed (a transcoder's target), scaled."""
        x64, x_hat64 = x.double(), out.x_hat.detach().double()
        n_local = x.shape[0]
        named = {**{f"losses.{k}": v for k, v in out.losses.items()}, **{f"stats.{k}": v for k, v in out.stats.items()}}
        names = sorted(named)
        per_token = [out.l0, out.loss, *(named[name] for name in names)]  # means over this rank's tokens
        packed = torch.cat(
            [
                torch.stack(
                    [
                        (x64 - x_hat64).pow(2).sum(),
                        x64.pow(2).sum(),
                        torch.tensor(float(n_local), dtype=torch.float64, device=x.device),
                        *(torch.as_tensor(v, device=x.device).detach().double() * n_local for v in per_token),
                    ]
                ),
                x64.sum(0),
            ]
        )
        self._reduce(packed)
        head = 3 + len(per_token)
        err, sq, n, l0_sum, loss_sum, *named_sums = packed[:head].tolist()
        mean = packed[head:] / n
        total_var = sq - n * float(mean.pow(2).sum())
        scale2 = float(self.sae.output_scale) ** 2
        record = {
            "loss": loss_sum / n,
            "mse": err / (n * self.sae.d_out) / scale2,  # per element, in the data's own units
            "fvu": err / total_var if total_var > 0 else float("nan"),
            "l0": l0_sum / n,
            "dead_fraction": self.dead_fraction(),
            "losses": {},
            "stats": {},
        }
        for name, total in zip(names, named_sums, strict=True):
            group, _, key = name.partition(".")
            record[group][key] = total / n
        return record

    def peak_memory_per_rank(self) -> list[int]:
        if self.env.device.type == "cuda":
            mine = torch.cuda.max_memory_allocated(self.env.device)
        else:
            mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        local = torch.tensor([mine], dtype=torch.int64, device=self.env.device)
        if not (self.collective and dist.is_initialized()):
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

    def save_checkpoint(self, elapsed: float, keep: int | None = None) -> None:
        if not self.writes:
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
        checkpoint.save_checkpoint(self.out_dir, self.step, tensors, state, keep or self.cfg.keep_checkpoints)

    def load_state(self, run_dir: Path) -> None:
        """The newest valid checkpoint of `run_dir` (a folder, or one checkpoint a sweep chose for its members)."""
        if checkpoint.is_checkpoint(run_dir):
            tensors, state = checkpoint.load_checkpoint(run_dir)
        else:
            # Every rank reads the same files and so picks the same checkpoint; rank 0 says what it skipped.
            say = (lambda line: print(line, file=sys.stderr, flush=True)) if self.env.is_main else (lambda _: None)
            path, tensors, state = checkpoint.load_newest_valid(run_dir, say)
            if self.env.is_main:
                print(f"resume: from {path.parent.name}/{path.name} (step {state['step']})", flush=True)
        model_sd = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
        self.sae.load_state_dict(model_sd)
        self.optimizer.load_state_dict(checkpoint.optimizer_from_flat(tensors, state["optimizer"]))
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        self.fire_counts.copy_(tensors["fire_counts"])
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and self.env.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.env.device)
        self.order.load_state_dict(state["data"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state.get("elapsed", 0.0)

    # -- the loop: schedule → step → log → checkpoint
    def run(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        last_log_time, last_log_step = start, self.step
        x = out = None  # a resume from the final checkpoint has no step left to run
        try:
            while self.step < cfg.total_steps:
                x, out = self.train_step()
                is_last = self.step == cfg.total_steps
                if self.step % cfg.log_every == 0 or is_last:
                    now = time.perf_counter()
                    seconds = max(now - last_log_time, 1e-9)
                    tokens_per_s = (self.step - last_log_step) * cfg.batch_size / seconds
                    eta_s = (cfg.total_steps - self.step) * cfg.batch_size / max(tokens_per_s, 1e-9)
                    self.log(x, out, tokens_per_s, eta_s, self.data_wait(seconds))
                    last_log_time, last_log_step = now, self.step
                if self.step % cfg.checkpoint_every == 0 or is_last:
                    self.save_checkpoint(self.elapsed + time.perf_counter() - start)
        finally:
            self.reader.close()
        train_seconds = self.elapsed + time.perf_counter() - start
        del x, out  # the last batch and its outputs
        return self.finish(train_seconds)

    def data_wait(self, seconds: float) -> float:
        """The fraction of the last `seconds` this rank spent waiting for data (1 = reading is the limit)."""
        waited = self.reader.wait_seconds - self._waited_at_log
        self._waited_at_log = self.reader.wait_seconds
        return min(waited / seconds, 1.0)

    def log(self, x, out, tokens_per_s: float, eta_s: float, data_wait: float = 0.0) -> dict:
        """Every rank computes the record (its figures are reduced over the ranks); the writing rank writes it."""
        record = {"step": self.step, "tokens": self.tokens, **self.batch_metrics(x, out)}
        if self.name is not None:
            record["member"] = self.name
        record.update(
            lr=self.optimizer.param_groups[0]["lr"],
            tokens_per_s=tokens_per_s,
            data_wait=data_wait,
            peak_mem=self.peak_memory_per_rank(),
            time=time.time(),
            total_steps=self.cfg.total_steps,
        )
        if self.writes:
            for sink in self.sinks:
                sink.write(record)
            print(progress_line(record, eta_s), flush=True)
        return record

    def finish(self, train_seconds: float, barrier: bool = True) -> dict:
        """The writing rank evaluates on the holdout and writes the SAE; every rank returns the eval figures."""
        figures = {}
        # The final checkpoint holds the optimizer; freeing gradients and Adam state here keeps the
        # evaluation below the training step's memory peak.
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        if self.writes:
            figures = evaluate(
                self.sae,
                self.data,
                self.order.holdout_rows(),
                self.env.device,
                chunk=min(4096, self.per_rank_batch),
                targets=self.target_data,
            )
            figures.update(
                dead_fraction=self.dead_fraction(),
                tokens_per_s=self.tokens / max(train_seconds, 1e-9),
                steps=self.step,
                tokens=self.tokens,
                world_size=self.env.world_size,
                holdout_kind=self.order.holdout_kind,  # "tail": whole contexts the model evaluation may rerun
            )
            write_outputs(self.sae, self.cfg, self.out_dir, self.fire_counts, self.tokens, figures)
            report_done(self.sinks, figures)
        if barrier and dist.is_initialized():
            dist.barrier()
        return figures


def data_parallel(forward: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """The training forward under DDP, as every multi-rank run wraps it (the process group is up)."""
    return DistributedDataParallel(
        forward,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,  # the gradients are the all-reduce buckets: no second copy (gpu/memory.py)
        broadcast_buffers=False,  # buffers stay identical by construction (all-reduced statistics)
    )


def pick(batch, key: str | None) -> torch.Tensor:
    """A member's rows of a batch: the batch itself (activation files), or its hook's rows (a model's stream)."""
    return batch if key is None else batch[key]


def open_feed(cfg: TrainConfig, data, order: BlockOrder, env: DistEnv, rank: int, ranks: int) -> DeviceFeed:
    """The reader of `order` for `rank` of `ranks` (its share of each global batch), on env's device."""
    loader = Loader(
        data,
        order,
        rank,
        ranks,
        threads=cfg.reader_threads,
        cache_bytes=cfg.read_ahead_bytes(ranks),
        host_float32=env.device.type != "cuda",
        pin_memory=env.device.type == "cuda",
    )
    return DeviceFeed(loader, env.device)


def data_order(cfg: TrainConfig, data) -> BlockOrder:
    """The block-shuffled order of `data` for `cfg` (see data/order.py)."""
    block_rows, window_blocks = blocks_for(data.row_bytes, cfg.shuffle_block_bytes, cfg.shuffle_buffer_bytes)
    return BlockOrder(
        data.n_rows, cfg.holdout_tokens, cfg.batch_size, cfg.seed, block_rows, window_blocks,
        contiguous_holdout=data.from_model, shuffle=cfg.shuffle,
    )  # fmt: skip


def progress_line(record: dict, eta_s: float) -> str:
    eta = format_duration(eta_s) if math.isfinite(eta_s) else "?"
    return (
        f"step {record['step']}/{record['total_steps']} | {record['tokens_per_s']:,.0f} tok/s | "
        f"loss {record['loss']:.4g} | fvu {record['fvu']:.4f} | l0 {record['l0']:.1f} | "
        f"data wait {record.get('data_wait', 0.0):.0%} | ETA {eta}"
    )


def write_outputs(sae, cfg: TrainConfig, out_dir: Path, fire_counts, tokens: int, figures: dict) -> None:
    """The SAE in SAELens format, its firing frequencies, the figures (eval.json last: "finished")."""
    out_dir.mkdir(parents=True, exist_ok=True)
    source: dict[str, object] = {"dataset_path": cfg.activation_source}
    if cfg.streamed:
        source = {
            "model_name": cfg.model,
            "hook_name": cfg.hook,
            "dataset_path": cfg.dataset,
            "context_size": cfg.context_size,
        }
    save(sae, out_dir, dtype=cfg.dtype, extra_meta=source)
    frequency = fire_counts.double().cpu() / max(tokens, 1)
    log_freq = torch.log10(frequency.clamp_min(1e-10)).float()
    save_file({"sparsity": log_freq}, str(out_dir / SPARSITY_FILE))
    (out_dir / TRAIN_CONFIG_FILE).write_text(cfg.to_json())
    (out_dir / EVAL_FILE).write_text(json.dumps(figures, indent=2))
