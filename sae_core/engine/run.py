"""The training entry's body: read the config and torchrun's environment, check the data, train, exit.

`sae_core.train` (what `python -m sae_core.train` and torchrun run) calls `main` here with the sinks a
launcher job adds. A bad config or bad data ends the run with exit code 2 and the reason in error.txt:
before training, or during it when a batch holds a non-finite value.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

from ..config import ConfigError, TrainConfig
from ..data.checks import DatasetError, check_dataset
from ..files import EVAL_FILE, METRICS_FILE, REFUSED_FILE
from ..sweep import Sweep, read_training_config
from .checkpoint import CheckpointError
from .distributed import DistEnv, init_process_group, read_dist_env
from .sinks import JsonlSink, MetricsSink
from .sweep_trainer import SweepTrainer
from .trainer import Trainer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sae_core.train", description="Train an SAE (one process, or each rank under torchrun)."
    )
    parser.add_argument("--config", required=True, help="TrainConfig JSON file, or a sweep of them (sweep.py)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--resume", help="a run directory whose latest complete checkpoint to continue from")
    return parser.parse_args(argv)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_FREED_BYTES = 2**31 - 1  # a C int: keep up to 2 GiB of freed memory at the top of the heap


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and keep them when freed. glibc maps every allocation over
    32 MiB with mmap and unmaps it on free, so each [batch x d_in] temporary of a wide model costs fresh
    page faults: at d_in 2304 and 4096 rows per rank that doubled the CPU step (101 -> 46 ms, bench
    results). Returns False where the C library has no mallopt (then nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))


def report_bad_input(out_dir: Path, exc: Exception) -> int:
    """Bad config or data: the rank that finds it says so itself (before training every rank does), so the
    reason survives whichever rank torchrun stops first. It goes to stderr prefixed with the rank and into this rank's torchrun error file
    (which torchrun's root-cause report and SAE Lab's diagnosis read); rank 0 also writes error.txt. Nothing
    else is written."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    message = str(exc)
    prefix = f"error (rank {rank} of {world})" if world > 1 else "error"
    print(f"{prefix}: {message}", file=sys.stderr, flush=True)
    ErrorHandler().record_exception(exc)  # a no-op outside torchrun (no error file is named)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / REFUSED_FILE).write_text(message + "\n")
    return 2


@record
def main(
    argv: list[str] | None = None,
    extra_sinks: Callable[[], list[MetricsSink]] | None = None,
    open_stream: Callable | None = None,
) -> int:
    """`open_stream(cfg, keys, device, rank, ranks)`: what opens a model's stream for a config that names a model
    (model/stream.py, passed in by `sae_core.train`: the engine does not import the model layer); it raises
    ConfigError or DatasetError naming what is wrong. The stream it returns also writes each SAE's held-out
    contexts (`write_heldout`), completes the kept stream (`finish`) and evaluates the SAEs with its model
    (`evaluate`): the engine calls them, never the model layer."""
    args = parse_args(argv)
    out_dir = Path(args.out)
    try:
        cfg = read_training_config(args.config)
        shared = cfg.shared if isinstance(cfg, Sweep) else cfg
        env = read_dist_env(shared)
        cfg, ranks = placed(cfg, env.world_size)
        data = None if shared.streamed else check_dataset(shared, ranks)
        if shared.streamed and open_stream is None:
            raise ConfigError("model: this entry cannot run a model (use python -m sae_core.train)")
    except (ConfigError, DatasetError) as exc:
        return report_bad_input(out_dir, exc)
    keep_freed_memory()
    init_process_group(env)
    resume = Path(args.resume) if args.resume else None
    try:
        stream = None
        if open_stream is not None and shared.streamed:  # after the group starts: the ranks share each window
            configs = [m.config for m in cfg.members] if isinstance(cfg, Sweep) else [shared]
            keys = sorted({key for c in configs for key in c.stream_keys})  # a transcoder's: in: and out:
            rank = env.rank if ranks > 1 else 0
            stream = open_stream(shared, keys, env.device, rank, ranks)
        if env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            if stream is not None:  # before any eval.json: whoever evaluates the SAE later finds its contexts
                stream.write_heldout([folder for folder, _ in trained_saes(cfg, out_dir)])
        make = SweepTrainer if isinstance(cfg, Sweep) else Trainer
        trainer = make(cfg, out_dir, env, data, resume, extra_sinks, stream=stream)  # type: ignore[arg-type]
        result = trainer.run()
        del trainer  # DDP's reducer and gloo's threads go before the process group, not at teardown
        gc.collect()
        if stream is not None:
            after_stream(stream, cfg, out_dir, env)
        if isinstance(cfg, Sweep) and env.is_main and not any(m["status"] == "completed" for m in result["members"]):
            return report_bad_input(
                out_dir, DatasetError("every member of the sweep failed (see each member's error.txt)")
            )
    except (ConfigError, DatasetError, CheckpointError) as exc:  # bad text or model; a non-finite row; no checkpoint
        return report_bad_input(out_dir, exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def trained_saes(cfg: TrainConfig | Sweep, out_dir: Path) -> list[tuple[Path, str]]:
    """Each SAE folder a run writes, with the hook it reads."""
    if isinstance(cfg, Sweep):
        return [(member.folder(out_dir), str(member.config.hook)) for member in cfg.members]
    return [(out_dir, str(cfg.hook))]


def after_stream(stream, cfg: TrainConfig | Sweep, out_dir: Path, env: DistEnv) -> None:
    """Every rank, once training is done: the kept stream completed (cache_to), then each completed SAE evaluated
    with the model already loaded (evaluate_contexts)."""
    stream.finish()
    shared = cfg.shared if isinstance(cfg, Sweep) else cfg
    if shared.evaluate_contexts:
        if dist.is_initialized():
            dist.barrier()  # every member's eval.json is written
        done = [(folder, hook) for folder, hook in trained_saes(cfg, out_dir) if (folder / EVAL_FILE).is_file()]
        if done:
            stream.evaluate(done, shared.evaluate_contexts, env)
    if dist.is_initialized():
        dist.barrier()


def placed(cfg: TrainConfig | Sweep, world_size: int) -> tuple[TrainConfig | Sweep, int]:
    """The config with its placement settled, and how many ranks share each batch (ConfigError if the batch does
    not split). A sweep run without the gate (`python -m sae_core.train`) splits batches unless told otherwise."""
    if isinstance(cfg, Sweep) and cfg.placement == "auto":
        cfg = cfg.with_placement("batch")
    ranks = 1 if isinstance(cfg, Sweep) and cfg.placement == "members" else world_size
    for member in cfg.members if isinstance(cfg, Sweep) else ():
        member.config.per_rank_batch(ranks)
    if isinstance(cfg, TrainConfig):
        cfg.per_rank_batch(ranks)
    return cfg, ranks


def run_ranks(
    out_dir: Path,
    bad_input: tuple[type[Exception], ...],
    prepare: Callable[[], tuple[DistEnv, object]],
    body: Callable[[DistEnv, object, list[MetricsSink]], None],
    extra_sinks: Callable[[], list[MetricsSink]] | None = None,
) -> int:
    """The frame of the model-side entries (extraction, evaluation, inspection): `prepare` checks the input
    and reads torchrun's environment before any process group exists; then the group starts, rank 0 opens
    the metric sinks (metrics.jsonl in `out_dir`, plus the job's), and `body` runs. Bad input, found before
    or during `body`, ends the rank with exit code 2 and its reason (report_bad_input)."""
    try:
        env, state = prepare()
    except bad_input as exc:
        return report_bad_input(out_dir, exc)
    init_process_group(env)
    try:
        sinks: list[MetricsSink] = []
        if env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            sinks = [JsonlSink(out_dir / METRICS_FILE), *(extra_sinks() if extra_sinks else [])]
        body(env, state, sinks)
        gc.collect()
    except bad_input as exc:
        return report_bad_input(out_dir, exc)
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
