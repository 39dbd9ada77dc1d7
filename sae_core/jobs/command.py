"""A job's command as data: the torchrun argv and the environment, built by a pure function.

Nothing here starts a process (processes.py does); the same inputs always give the same plan, which the
tests check line by line.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from .. import paths
from ..access import without_secrets
from ..data.catalog import offline_env
from ..db.tables import Job
from ..files import (
    LOGS_DIR,
    TORCHRUN_ERROR_FILE,
    TORCHRUN_LOG_DIR,
)
from .kinds import job_kind

LOOPBACK = "127.0.0.1"
LOOPBACK_INTERFACE = "lo"

# Variables a torchrun context would leave behind; a job must get torchrun's fresh ones.
_INHERITED_DIST_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_ERROR_FILE",
)


def threads_per_rank(cpu_count: int, nproc: int) -> int:
    """Cores shared evenly by the ranks of one job, at least one thread each."""
    return max(1, cpu_count // max(1, nproc))


def build_command(
    job: Job,
    home: Path,
    python: str = sys.executable,
    gpu_available: bool = False,
    *,
    cpu_count: int | None = None,
    base_env: Mapping[str, str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The torchrun argv and the environment of a job. Pure: same inputs, same plan.

    - one node, `--nproc-per-node` = number of GPUs (or cpu_procs), c10d rendezvous on 127.0.0.1:0
      (a free port each time, so two jobs never collide), `--rdzv-id` = job id, no restarts; torchrun
      through `sae_core.engine.torchrun`, whose stores listen on loopback only, and gloo/NCCL on `lo`;
    - `--log-dir jobs/<id>/logs/torchrun --tee 3`: per-rank stdout/stderr/error.json files, and the
      same lines on torchrun's console (jobs/<id>/logs/stdout.log, stderr.log);
    - GPU job with CUDA here: CUDA_VISIBLE_DEVICES = its GPUs in PCI bus order. A CPU job — or a GPU
      job on a machine without CUDA (the GPU ids are then only a reservation) — gets
      CUDA_VISIBLE_DEVICES="" so it never touches a GPU, and train falls back to gloo on the CPU.
    - OMP_NUM_THREADS = cores // ranks (at most the value already in the environment, if any);
    - no secret of the app (SAE_LAB_PASSWORD and the like) travels into the job;
    - the Hugging Face libraries offline (catalog.OFFLINE_ENV): a job reads models and texts from disk only.
    """
    home = Path(home)
    env = offline_env(without_secrets(os.environ if base_env is None else base_env))
    cpu_count = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    nproc = job.world_size
    out_dir = Path(job.out_dir) if job.out_dir else paths.job_dir(job.id, home)
    logs = out_dir / LOGS_DIR

    argv = [
        python,
        "-m",
        "sae_core.engine.torchrun",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"{LOOPBACK}:0",
        "--local-addr",
        LOOPBACK,
        "--rdzv-id",
        str(job.id),
        "--max-restarts",
        "0",
        "--log-dir",
        str(logs / TORCHRUN_LOG_DIR),
        "--tee",
        "3",
        *entry_args(job, out_dir, home),
    ]

    for name in _INHERITED_DIST_VARS:
        env.pop(name, None)
    threads = threads_per_rank(cpu_count, nproc)
    with contextlib.suppress(ValueError):
        threads = min(threads, max(1, int(env.get("OMP_NUM_THREADS", threads))))
    use_gpus = bool(job.gpu_list) and gpu_available
    env.update(
        {
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": job.gpu_ids if use_gpus else "",
            "SAE_LAB_JOB_ID": str(job.id),
            "SAE_LAB_HOME": str(home),
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            # torchrun's own @record copies the first failing rank's error file here.
            "TORCHELASTIC_ERROR_FILE": str(logs / TORCHRUN_ERROR_FILE),
            "PYTHONUNBUFFERED": "1",
            # the ranks' own sockets (gloo pairs, NCCL's bootstrap) on loopback too: this is one node
            "GLOO_SOCKET_IFNAME": LOOPBACK_INTERFACE,
            "NCCL_SOCKET_IFNAME": LOOPBACK_INTERFACE,
        }
    )
    return argv, env


def entry_args(job: Job, out_dir: Path, home: Path) -> list[str]:
    """The kind's entry module and its arguments: where it writes (a resumed extraction continues in the folder
    that holds its shards), and for a training that continues a checkpoint `--resume` with its source's folder."""
    kind = job_kind(job.kind)
    argv = ["-m", kind.entry, "--config", str(out_dir / kind.request_file), "--out", str(kind.writes_into(job))]
    if kind.resume == "checkpoint" and job.resumed_from is not None:
        argv += ["--resume", str(paths.job_dir(job.resumed_from, home))]
    return argv


def finished_marker(job: Job) -> Path:
    """The file whose presence says the job did all its work (its kind's: eval.json of a training, the manifest
    of an extraction, model_eval.json of an evaluation, inspect_done.json of an inspection)."""
    return job_kind(job.kind).finished_marker(job)


def write_job_config(job: Job) -> Path:
    """The job's config as the file `--config` names (the row is the source of truth)."""
    path = Path(job.out_dir) / job_kind(job.kind).request_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json.loads(job.config_json), indent=2))
    return path
