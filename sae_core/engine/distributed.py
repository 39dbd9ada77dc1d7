"""torchrun's environment, read once at the entry, and the collectives that are no-ops on one process.

Library code asks `dist.is_initialized()`, never the environment: the same loop runs in pytest on one
CPU process and under torchrun on eight GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..config import ConfigError, JobConfig


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def read_dist_env(cfg: JobConfig) -> DistEnv:
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
