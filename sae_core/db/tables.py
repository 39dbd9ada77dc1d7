"""The SQLModel tables of lab.db and the job statuses. Operations on them live in jobs/ (jobs, metrics)
and gpu/history.py (GPU and host samples); the engine in db/engine.py; upgrades in db/migrations.py.

Times are Unix seconds (float, UTC) so every process agrees without time zones.
"""

from __future__ import annotations

from sqlalchemy import Index
from sqlmodel import Field, SQLModel

JOB_STATUSES = ("queued", "starting", "running", "completed", "failed", "cancelled")
LIVE_STATUSES = ("queued", "starting", "running")  # a job in these holds (or will hold) its GPUs
ACTIVE_STATUSES = ("starting", "running")  # processes exist (or are being created)
FINAL_STATUSES = ("completed", "failed", "cancelled")


class SchemaInfo(SQLModel, table=True):
    """One row: the schema version this file was last upgraded to."""

    __tablename__ = "schema_info"
    id: int = Field(default=1, primary_key=True)
    version: int


class Job(SQLModel, table=True):
    """One run: a training or an extraction. Lifecycle: queued -> starting (GPUs reserved by the launcher)
    -> running (processes exist) -> completed | failed | cancelled. Only the launcher moves a job out of
    starting/running; a queued job may be cancelled by anyone. A job that depends on another waits
    queued until that one completes, and is cancelled if it fails or is cancelled."""

    __tablename__ = "job"
    # Assigned by SQLite on insert; every row read back has one, so it is typed as set.
    id: int = Field(default=None, primary_key=True)
    name: str = ""
    submitted_by: str = ""
    config_json: str  # TrainConfig (or ExtractConfig, by kind) as JSON, exactly as submitted
    gpu_ids: str = ""  # "0,1" (NVML / PCI-bus indices); "" for a CPU job
    cpu_procs: int | None = None  # number of gloo processes for a CPU job
    status: str = Field(default="queued", index=True)
    # The job's process-group leader: a small wrapper (sae_core.jobwrap) whose child is torchrun.
    # Its exit code lands in <out_dir>/logs/exit_code, so a re-adopted job's outcome is known.
    pid: int | None = None
    pid_start_time: float | None = None  # psutil create_time of that pid: pid alone can be reused
    exit_code: int | None = None
    error: str | None = None  # root-cause summary for failed jobs
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    out_dir: str = ""
    resumed_from: int | None = Field(default=None, foreign_key="job.id")
    total_steps: int = 0
    last_step: int = 0  # progress, updated by the metrics sink
    tokens_per_s: float | None = None
    cancel_requested: bool = False  # set by the app/CLI, acted on by the daemon
    # v2: when SIGTERM was sent for a cancel, so the grace period survives a launcher restart
    term_sent_at: float | None = None
    # v2: time of the last metrics flush (a stalled job shows as a growing gap)
    last_metric_at: float | None = None
    # v4: what the job runs, and the job it waits for (an extraction before its training)
    kind: str = "train"
    depends_on: int | None = Field(default=None, foreign_key="job.id")

    @property
    def gpu_list(self) -> list[int]:
        return [int(g) for g in self.gpu_ids.split(",") if g.strip()]

    @property
    def world_size(self) -> int:
        """Processes the job runs: one per GPU, or cpu_procs gloo processes."""
        return len(self.gpu_list) or (self.cpu_procs or 1)

    @property
    def is_cpu_job(self) -> bool:
        return not self.gpu_list


class MetricPoint(SQLModel, table=True):
    """One metrics record of a job (written by rank 0 every log_every steps)."""

    __tablename__ = "metric_point"
    # v2: (job_id, step) serves both "rows of a job" and "rows of a job in step order".
    __table_args__ = (Index("ix_metric_point_job_step", "job_id", "step"),)
    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id")
    member: str | None = None  # v6: the sweep member the record is of (None: a single run's)
    step: int
    tokens: int
    loss: float | None = None
    mse: float | None = None
    fvu: float | None = None
    l0: float | None = None
    dead_fraction: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    aux_loss: float | None = None
    data_wait: float | None = None  # v3: fraction of the interval rank 0 waited for data
    disk_bytes: float | None = None  # v4: bytes an extraction has written so far
    peak_mem_json: str = "[]"  # per-rank peak memory in bytes, index = rank
    losses_json: str | None = None  # v5: the architecture's loss terms by name ({"mse": ..., "aux": ...})
    stats_json: str | None = None  # v5: its other figures by name ({"sparsity_coefficient": ...})
    time: float


class GpuSample(SQLModel, table=True):
    """Full-resolution sample of one GPU (kept for the last hour)."""

    __tablename__ = "gpu_sample"
    id: int | None = Field(default=None, primary_key=True)
    t: float = Field(index=True)
    gpu_index: int
    util_gpu: float | None = None
    util_mem: float | None = None
    mem_used: int | None = None
    mem_total: int | None = None
    temperature: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None


class GpuMinute(SQLModel, table=True):
    """Per-minute mean and max of one GPU (kept for 7 days)."""

    __tablename__ = "gpu_minute"
    id: int | None = Field(default=None, primary_key=True)
    t: float = Field(index=True)  # start of the minute
    gpu_index: int
    util_gpu_mean: float | None = None
    util_gpu_max: float | None = None
    mem_used_mean: float | None = None
    mem_used_max: float | None = None
    mem_total: int | None = None
    temperature_mean: float | None = None
    temperature_max: float | None = None
    power_w_mean: float | None = None
    power_w_max: float | None = None


class HostSample(SQLModel, table=True):
    """Host CPU and RAM; `resolution` is 'raw' (last hour) or 'minute' (7 days)."""

    __tablename__ = "host_sample"
    id: int | None = Field(default=None, primary_key=True)
    t: float = Field(index=True)
    resolution: str = "raw"
    cpu_percent: float | None = None
    cpu_percent_max: float | None = None
    ram_used: int | None = None
    ram_total: int | None = None


class Snapshot(SQLModel, table=True):
    """The latest full probe (GPUs, processes, host) as JSON, replaced by the sampler each tick,
    so pages show current details without calling NVML per viewer."""

    __tablename__ = "snapshot"
    key: str = Field(primary_key=True)
    t: float
    payload: str
