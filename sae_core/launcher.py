"""The launcher: builds the torchrun command of a job (pure), starts and watches jobs, and the
daemon `python -m sae_core serve` that runs the queue and the GPU sampler.

How a job runs
  daemon ──Popen(start_new_session)──► jobwrap (process-group leader; Job.pid) ──► torchrun ──► ranks
  jobwrap records torchrun's exit code in jobs/<id>/logs/exit_code, so a daemon restarted later (no
  longer the parent) still learns how an adopted job ended. torchrun starts each rank in a session of
  its own, so "every process of the job" is found by (a) the leader's descendants and (b) a scan for
  processes whose environment carries this job's SAE_LAB_JOB_ID and SAE_LAB_HOME — (b) also finds
  ranks orphaned when torchrun itself was killed.

Daemon loop (every ~0.5 s): look at every starting/running job — adopt it if this daemon does not
know it yet and its leader is alive (pid AND process start time), finalize it if its leader has ended
(exit code → status; root cause from torchrun's error files or the log tail; leftovers SIGKILLed
first), advance a requested cancel (SIGTERM, grace period, SIGKILL) — then start runnable queued
jobs, claimed in one BEGIN IMMEDIATE transaction (store.claim_runnable).

One daemon per SAE_LAB_HOME: it holds SAE_LAB_HOME/launcher.lock (filelock) for its lifetime and
writes SAE_LAB_HOME/daemon.json (pid, process start time, heartbeat) for daemon_status(). SIGTERM
stops it cleanly; jobs keep running (own sessions) and are re-adopted by the next daemon.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from . import db, paths, store
from .models import ACTIVE_STATUSES, FINAL_STATUSES, Job

log = logging.getLogger("sae_core.launcher")

GRACE_S = 10.0  # SIGTERM -> SIGKILL on cancel
POLL_S = 0.5
HEARTBEAT_STALE_S = 15.0
START_TIME_TOLERANCE_S = 1.0
LOST_MESSAGE = "launcher lost the job"
EXIT_FILE = "exit_code"
ERROR_FILE = "error.json"
TORCHRUN_LOG_DIR = "torchrun"
DAEMON_FILE = "daemon.json"
LOCK_FILE = "launcher.lock"
LOG_FILE = "launcher.log"
JOBWRAP = Path(__file__).with_name("jobwrap.py")
REPO_ROOT = Path(__file__).resolve().parent.parent

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


class LauncherError(RuntimeError):
    pass


# =========================================================================== command as data


def log_dir_of(job: Job) -> Path:
    return Path(job.out_dir) / "logs"


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

    - one node, `--nproc-per-node` = number of GPUs (or cpu_procs), c10d rendezvous on localhost:0
      (a free port each time, so two jobs never collide), `--rdzv-id` = job id, no restarts;
    - `--log-dir jobs/<id>/logs/torchrun --tee 3`: per-rank stdout/stderr/error.json files, and the
      same lines on torchrun's console (jobs/<id>/logs/stdout.log, stderr.log);
    - GPU job with CUDA here: CUDA_VISIBLE_DEVICES = its GPUs in PCI bus order. A CPU job — or a GPU
      job on a machine without CUDA (the GPU ids are then only a reservation) — gets
      CUDA_VISIBLE_DEVICES="" so it never touches a GPU, and train falls back to gloo on the CPU.
    - OMP_NUM_THREADS = cores // ranks (at most the value already in the environment, if any).
    """
    home = Path(home)
    env = dict(os.environ if base_env is None else base_env)
    cpu_count = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    nproc = job.world_size
    out_dir = Path(job.out_dir) if job.out_dir else paths.job_dir(job.id, home)
    logs = out_dir / "logs"

    argv = [
        python,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",
        "--rdzv-id",
        str(job.id),
        "--max-restarts",
        "0",
        "--log-dir",
        str(logs / TORCHRUN_LOG_DIR),
        "--tee",
        "3",
        "-m",
        "sae_core.train",
        "--config",
        str(out_dir / "train_request.json"),
        "--out",
        str(out_dir),
    ]
    if job.resumed_from is not None:
        argv += ["--resume", str(paths.job_dir(job.resumed_from, home))]

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
            "TORCHELASTIC_ERROR_FILE": str(logs / ERROR_FILE),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            ),
        }
    )
    return argv, env


def write_job_config(job: Job) -> Path:
    """The job's config as the file `--config` names (the row is the source of truth)."""
    path = Path(job.out_dir) / "train_request.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json.loads(job.config_json), indent=2))
    return path


# =========================================================================== subprocess layer


def run_job(argv: list[str], env: Mapping[str, str], log_dir: Path) -> subprocess.Popen:
    """Start `argv` under jobwrap in a new session, output to log_dir/stdout.log and stderr.log."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / EXIT_FILE).unlink(missing_ok=True)
    wrapped = [argv[0], str(JOBWRAP), "--exit-file", str(log_dir / EXIT_FILE), "--", *argv]
    with open(log_dir / "stdout.log", "ab") as out, open(log_dir / "stderr.log", "ab") as err:
        return subprocess.Popen(
            wrapped,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            close_fds=True,
            cwd=str(log_dir.parent),
        )


# =========================================================================== processes of a job


def process_if_same(pid: int | None, start_time: float | None) -> psutil.Process | None:
    """The live process with this pid AND this start time (a reused pid is someone else)."""
    if not pid or start_time is None:
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if abs(proc.create_time() - start_time) > START_TIME_TOLERANCE_S:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _same_home(a: str | None, b: Path) -> bool:
    if not a:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def job_processes(job: Job, home: Path) -> list[psutil.Process]:
    """Every live process of the job: the leader's tree plus any process tagged with its id and home."""
    found: dict[int, psutil.Process] = {}
    leader = process_if_same(job.pid, job.pid_start_time)
    if leader is not None:
        found[leader.pid] = leader
        with contextlib.suppress(psutil.Error):
            for child in leader.children(recursive=True):
                found[child.pid] = child
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid in found or proc.pid == me:
            continue
        try:
            env = proc.environ()
            if env.get("SAE_LAB_JOB_ID") == str(job.id) and _same_home(env.get("SAE_LAB_HOME"), home):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found[proc.pid] = proc
        except (psutil.Error, OSError):
            continue
    return list(found.values())


def signal_processes(procs: list[psutil.Process], sig: int) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)  # psutil refuses if the pid was reused meanwhile


def kill_job_processes(job: Job, home: Path, wait_s: float = 5.0) -> int:
    """SIGKILL every process of the job and wait for them to vanish; returns how many were killed."""
    procs = job_processes(job, home)
    signal_processes(procs, signal.SIGKILL)
    psutil.wait_procs(procs, timeout=wait_s)
    return len(procs)


# =========================================================================== outcome and root cause


def read_exit_code(log_dir: Path) -> int | None:
    """torchrun's exit code as recorded by jobwrap; None if it never got to write it."""
    try:
        return int(json.loads((Path(log_dir) / EXIT_FILE).read_text())["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# Errors a rank raises because ANOTHER rank died first: never the root cause when a better one exists.
_SECONDARY_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "remote worker hanging",
    "SignalException",
    "got signal",
    "KeyboardInterrupt",
    "Broken pipe",
)


def _is_secondary(message: str) -> bool:
    return any(marker in message for marker in _SECONDARY_MARKERS)


def _error_message(data: dict) -> str:
    message = data.get("message", "")
    if isinstance(message, dict):
        message = message.get("message") or message.get("extraInfo", {}).get("py_callstack", "")
    return str(message).strip()


def _rank_error_files(log_dir: Path) -> list[tuple[bool, float, int, str]]:
    """(is_secondary, mtime, rank, message) for every per-rank error.json torchrun collected."""
    found = []
    for path in (Path(log_dir) / TORCHRUN_LOG_DIR).glob("*/attempt_*/*/error.json"):
        try:
            message = _error_message(json.loads(path.read_text()))
            rank = int(path.parent.name)
            mtime = path.stat().st_mtime
        except (OSError, ValueError, AttributeError):
            continue
        if message:
            found.append((_is_secondary(message), mtime, rank, message))
    return sorted(found)


def _tail(path: Path, max_lines: int = 15, max_chars: int = 1500) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64_000))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-max_lines:])[-max_chars:]


@dataclass
class _ReportedFailure:
    rank: str
    exitcode: int
    traceback: str
    is_root: bool


def _torchrun_failures(stderr_text: str) -> list[_ReportedFailure]:
    """The failures listed in torchrun's last ChildFailedError report (its root cause flagged)."""
    _, sep, report = stderr_text.rpartition("ChildFailedError")
    if not sep:
        return []
    _, _, root_part = report.partition("Root Cause (first observed failure):")
    failures = []
    for block in re.split(r"^\s*\[\d+\]:\s*$", report, flags=re.MULTILINE)[1:]:
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, colon, value = line.strip().partition(":")
            if colon and key.strip() in ("rank", "exitcode", "traceback") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
        try:
            code = int(fields.get("exitcode", "").split(" ")[0])
        except ValueError:
            continue
        rank = fields.get("rank", "?").split(" ")[0]
        failures.append(
            _ReportedFailure(rank, code, fields.get("traceback", ""), bool(root_part) and block in root_part)
        )
    return failures


def _describe_reported(failure: _ReportedFailure) -> str:
    if failure.exitcode < 0:
        hint = ""
        if -failure.exitcode == signal.SIGKILL:
            hint = " (SIGKILL comes from a person, or from the host's out-of-memory killer: check `dmesg`)"
        return f"rank {failure.rank} was killed by {_signal_name(-failure.exitcode)}{hint}"
    detail = failure.traceback if "To enable traceback" not in failure.traceback else ""
    return f"rank {failure.rank} exited with code {failure.exitcode}" + (f": {detail}" if detail else "")


def _killed_rank(failures: list[_ReportedFailure]) -> _ReportedFailure | None:
    """A rank that died of a signal other than torchrun's own SIGTERM teardown (root cause first)."""
    killed = [f for f in failures if f.exitcode < 0 and -f.exitcode != signal.SIGTERM]
    return next((f for f in killed if f.is_root), killed[0] if killed else None)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def root_cause(log_dir: Path, exit_code: int | None) -> str:
    """A one-paragraph reason a job failed, best source first:
    1. a rank's own exception (per-rank error files; the first one written, never an error a rank
       raised only because a peer vanished, like gloo's "Connection reset by peer");
    2. a rank killed by a signal (torchrun's failure report: signals leave no error file);
    3. train's error.txt (refused before training: bad config or data);
    4. a peer-vanished error, torchrun's report, how torchrun itself ended, and last the log tail."""
    log_dir = Path(log_dir)
    errors = _rank_error_files(log_dir)
    primary = [e for e in errors if not e[0]]
    if primary:
        _, _, rank, message = primary[0]
        return f"rank {rank}: {message}"[:2000]
    copied = ""
    with contextlib.suppress(OSError, ValueError):
        copied = _error_message(json.loads((log_dir / ERROR_FILE).read_text()))
    if copied and not _is_secondary(copied):
        return copied[:2000]  # torchrun's copy of its root cause, when the per-rank files are gone
    failures = _torchrun_failures(_tail(log_dir / "stderr.log", max_lines=2000, max_chars=200_000))
    killed = _killed_rank(failures)
    if killed is not None:
        return _describe_reported(killed)
    refused = _read_text(log_dir.parent / "error.txt")
    if refused:
        return refused[:2000]
    if errors:
        _, _, rank, message = errors[0]
        return f"rank {rank}: {message}"[:2000]
    if copied:
        return copied[:2000]
    root = next((f for f in failures if f.is_root), failures[0] if failures else None)
    if root is not None:
        return _describe_reported(root)
    if exit_code is not None and exit_code < 0:
        return f"torchrun was killed by {_signal_name(-exit_code)}"
    short_tail = _tail(log_dir / "stderr.log")
    code = f"exit code {exit_code}" if exit_code is not None else "no exit code"
    return f"{code}; last lines of stderr:\n{short_tail}" if short_tail else f"{code}; stderr was empty"


def outcome(job: Job, exit_code: int | None, log_dir: Path) -> tuple[str, str | None]:
    """(final status, error message) of a job whose processes are gone."""
    finished = exit_code == 0 and (Path(job.out_dir) / "eval.json").is_file()
    if finished:
        return "completed", None  # even if a cancel arrived: it came too late to stop anything
    if job.cancel_requested:
        return "cancelled", "cancelled on request"
    if exit_code == 0:
        return "failed", "training exited with code 0 but wrote no eval.json"
    if exit_code is None:
        return "failed", LOST_MESSAGE
    return "failed", root_cause(log_dir, exit_code)


def finalize_job(job: Job, home: Path, popen_returncode: int | None = None, engine=None) -> str:
    """Settle a job whose leader has ended (or vanished): kill leftovers, then record its final status
    (GPUs are free only once no process of the job is left). Returns the status recorded."""
    engine = engine if engine is not None else db.get_engine(home)
    killed = kill_job_processes(job, home)
    if killed:
        log.info("job %s: killed %d leftover process(es)", job.id, killed)
    log_dir = log_dir_of(job)
    exit_code = read_exit_code(log_dir)
    if exit_code is None and popen_returncode is not None:
        # jobwrap itself died (e.g. kill -9) before it could record torchrun's code.
        exit_code = popen_returncode
    status, error = outcome(job, exit_code, log_dir)
    with contextlib.suppress(Exception):
        store.backfill_metrics_from_jsonl(job, engine)
    if store.finish_job(job.id, status, exit_code, error, engine=engine):
        log.info("job %s %s%s", job.id, status, f": {error.splitlines()[0]}" if error else "")
    return status


def terminate_job(job: Job, home: Path, grace_s: float = GRACE_S, engine=None) -> str:
    """Stop a running job without a daemon: SIGTERM its processes, wait up to grace_s for the
    leader, SIGKILL whatever is left, then finalize (status cancelled if it was requested)."""
    engine = engine if engine is not None else db.get_engine(home)
    procs = job_processes(job, home)
    signal_processes(procs, signal.SIGTERM)
    store.mark_term_sent(job.id, time.time(), engine=engine)
    leader = process_if_same(job.pid, job.pid_start_time)
    if leader is not None:
        with contextlib.suppress(psutil.Error):
            leader.wait(grace_s)
    fresh = store.get_job(job.id, engine) or job
    return finalize_job(fresh, home, engine=engine)


def cancel_job(job_id: int, home: Path | None = None, grace_s: float = GRACE_S, wait_s: float = 0.0) -> tuple[Job, str]:
    """Cancel a job from any process (CLI, app). Queued: cancelled at once. Live with a launcher
    running: the launcher is asked (SIGTERM, grace period, SIGKILL); with `wait_s`, wait for it.
    Live with NO launcher: stopped here and now (terminate_job) — otherwise nobody would, and its
    GPUs would stay held. Returns the job and a sentence for the person. Raises store.JobError."""
    home = Path(home) if home is not None else paths.lab_home()
    engine = db.get_engine(home)
    job = store.request_cancel(job_id, engine=engine)
    if job.status == "cancelled":
        return job, f"job {job_id} cancelled (it had not started)"
    if daemon_status(home).running:
        deadline = time.time() + wait_s
        while time.time() < deadline:
            job = store.require_job(job_id, engine)
            if job.status in FINAL_STATUSES:
                return job, f"job {job_id} {job.status}"
            time.sleep(0.2)
        return job, f"cancel requested for job {job_id}; the launcher stops it"
    status = terminate_job(job, home, grace_s, engine)
    return store.require_job(job_id, engine), f"no launcher running: stopped job {job_id} here; it is {status}"


# =========================================================================== the daemon


def torch_build_has_cuda() -> bool | None:
    """Read torch/version.py without importing torch: a CPU-only build says `cuda = None`."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return None
    try:
        text = Path(spec.origin).with_name("version.py").read_text()
    except OSError:
        return None
    match = re.search(r"^cuda\s*(?::[^=]*)?=\s*(.+)$", text, re.MULTILINE)
    return None if match is None else match.group(1).strip() != "None"


def cuda_available(python: str = sys.executable) -> bool:
    """Whether a job can use CUDA here. A CPU-only torch build answers at once; otherwise a child
    process asks torch (so the daemon itself never loads CUDA). SAE_LAB_CUDA=0/1 overrides."""
    forced = os.environ.get("SAE_LAB_CUDA")
    if forced in ("0", "1"):
        return forced == "1"
    if python == sys.executable and torch_build_has_cuda() is False:
        return False
    env = dict(os.environ, PYTORCH_NVML_BASED_CUDA_CHECK="1")
    try:
        result = subprocess.run(
            [python, "-c", "import torch; print(int(torch.cuda.is_available()))"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        return result.stdout.strip().endswith("1")
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass
class Tracked:
    """A job this daemon watches: its own child (proc) or one adopted after a restart (proc None)."""

    job_id: int
    pid: int
    start_time: float
    proc: subprocess.Popen | None = None
    kill_sent: bool = False

    def has_ended(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is not None
        return process_if_same(self.pid, self.start_time) is None


class Launcher:
    """The queue and the job watcher; `tick()` is one pass of the daemon loop."""

    def __init__(
        self,
        home: Path,
        grace_s: float = GRACE_S,
        cpu_budget: int | None = None,
        gpu_available: bool | None = None,
        python: str = sys.executable,
        clock=time.time,
    ):
        self.home = Path(home).resolve()
        self.engine = db.get_engine(self.home)
        self.grace_s = grace_s
        self.cpu_budget = cpu_budget or os.cpu_count() or 1
        self._gpu_available = gpu_available
        self.python = python
        self.clock = clock
        self.tracked: dict[int, Tracked] = {}

    def gpu_available(self) -> bool:
        if self._gpu_available is None:
            self._gpu_available = cuda_available(self.python)
            log.info("CUDA available to jobs: %s", self._gpu_available)
        return self._gpu_available

    # -- one pass
    def tick(self) -> None:
        active = store.list_jobs(ACTIVE_STATUSES, newest_first=False, engine=self.engine)
        for job in active:
            tracked = self.tracked.get(job.id) or self._adopt(job)
            if tracked is None:
                continue
            if tracked.has_ended():
                finalize_job(job, self.home, tracked.proc.returncode if tracked.proc else None, self.engine)
                self.tracked.pop(job.id, None)
            elif job.cancel_requested:
                self._advance_cancel(job, tracked)
        self._forget_settled({job.id for job in active})
        self._start_runnable()

    def _adopt(self, job: Job) -> Tracked | None:
        """A job this daemon does not know: re-adopt it if its leader lives, else settle it now."""
        leader = process_if_same(job.pid, job.pid_start_time) if job.status == "running" else None
        if leader is not None:
            log.info("job %s: re-adopted (pid %s)", job.id, job.pid)
            tracked = Tracked(job.id, job.pid, job.pid_start_time)
            self.tracked[job.id] = tracked
            return tracked
        # Gone while no launcher watched (or lost between claim and start): its exit file, if any, tells.
        finalize_job(job, self.home, engine=self.engine)
        return None

    def _forget_settled(self, active_ids: set[int]) -> None:
        # Jobs settled by someone else (CLI cancel without a daemon): reap our child, stop tracking.
        for job_id in [j for j in self.tracked if j not in active_ids]:
            tracked = self.tracked[job_id]
            if tracked.has_ended():
                del self.tracked[job_id]

    def _advance_cancel(self, job: Job, tracked: Tracked) -> None:
        now = self.clock()
        if job.term_sent_at is None:
            log.info("job %s: cancel requested, SIGTERM", job.id)
            signal_processes(job_processes(job, self.home), signal.SIGTERM)
            store.mark_term_sent(job.id, now, engine=self.engine)
        elif now - job.term_sent_at >= self.grace_s and not tracked.kill_sent:
            log.info("job %s: still alive %.0f s after SIGTERM, SIGKILL", job.id, now - job.term_sent_at)
            signal_processes(job_processes(job, self.home), signal.SIGKILL)
            tracked.kill_sent = True

    def _start_runnable(self) -> None:
        for job in store.claim_runnable(self.cpu_budget, engine=self.engine):
            try:
                self._start(job)
            except Exception as exc:
                log.exception("job %s: could not start", job.id)
                # Popen may have succeeded before the failure (e.g. the database stayed locked):
                # nothing of a job marked failed may keep running and holding its GPUs.
                kill_job_processes(job, self.home)
                self.tracked.pop(job.id, None)
                store.finish_job(job.id, "failed", error=f"could not start: {type(exc).__name__}: {exc}")

    def _start(self, job: Job) -> None:
        write_job_config(job)
        argv, env = build_command(job, self.home, self.python, self.gpu_available() if job.gpu_list else False)
        proc = run_job(argv, env, log_dir_of(job))
        start_time = psutil.Process(proc.pid).create_time()
        store.mark_running(job.id, proc.pid, start_time, engine=self.engine)
        self.tracked[job.id] = Tracked(job.id, proc.pid, start_time, proc)
        log.info("job %s: started %d rank(s), pid %s", job.id, job.world_size, proc.pid)


# --------------------------------------------------------------------------- daemon status file


@dataclass
class DaemonStatus:
    running: bool  # a daemon process holds this home
    healthy: bool  # ... and its loop beat recently
    pid: int | None
    started_at: float | None
    heartbeat_at: float | None
    message: str
    log_path: str

    def to_dict(self) -> dict:
        return asdict(self)


def _daemon_file(home: Path) -> Path:
    return Path(home) / DAEMON_FILE


def _write_daemon_file(home: Path, info: dict) -> None:
    path = _daemon_file(home)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def daemon_status(home: Path | None = None, now: float | None = None) -> DaemonStatus:
    home = Path(home) if home is not None else paths.lab_home()
    now = time.time() if now is None else now
    log_path = str(home / LOG_FILE)
    _reap_spawned()
    try:
        info = json.loads(_daemon_file(home).read_text())
    except (OSError, ValueError):
        return DaemonStatus(False, False, None, None, None, "launcher not running", log_path)
    pid, beat = info.get("pid"), info.get("heartbeat")
    alive = info.get("stopped_at") is None and process_if_same(pid, info.get("create_time")) is not None
    if not alive:
        return DaemonStatus(False, False, None, None, beat, "launcher not running", log_path)
    stale_after = max(HEARTBEAT_STALE_S, 5 * float(info.get("interval") or POLL_S))
    age = now - (beat or 0)
    healthy = age <= stale_after
    message = (
        f"launcher running (pid {pid}, heartbeat {age:.1f} s ago)"
        if healthy
        else f"launcher (pid {pid}) is not responding: last heartbeat {age:.0f} s ago; see {log_path}"
    )
    return DaemonStatus(True, healthy, pid, info.get("started_at"), beat, message, log_path)


_spawned: list[subprocess.Popen] = []


def _reap_spawned() -> None:
    # A daemon started by this (long-lived) process must not linger as a zombie when it exits.
    for proc in list(_spawned):
        if proc.poll() is not None:
            _spawned.remove(proc)


def ensure_daemon(home: Path | None = None, extra_args: list[str] | None = None, timeout_s: float = 20.0) -> bool:
    """Start the daemon for `home`, detached, if none is running. True when one runs afterwards."""
    home = Path(home).resolve() if home is not None else paths.lab_home()
    if daemon_status(home).running:
        return True
    env = dict(os.environ, SAE_LAB_HOME=str(home))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    with open(home / LOG_FILE, "ab") as logfile:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sae_core", "serve", *(extra_args or [])],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=logfile,
            start_new_session=True,
            close_fds=True,
            cwd=str(home),
        )
    _spawned.append(proc)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if daemon_status(home).running:
            return True
        if proc.poll() is not None:  # lost a race to another daemon, or failed: the status file says which
            return daemon_status(home).running
        time.sleep(0.1)
    return daemon_status(home).running


# --------------------------------------------------------------------------- serve


def _start_sampler(engine, stop: threading.Event, interval_s: float) -> threading.Thread | None:
    try:
        from . import history
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.history":
            raise
        log.warning("GPU sampler not available (sae_core.history missing)")
        return None

    def run() -> None:
        try:
            history.Sampler(engine, interval_s=interval_s).run(stop)
        except Exception:
            log.exception("GPU sampler stopped with an error; jobs are unaffected")

    thread = threading.Thread(target=run, name="gpu-sampler", daemon=True)
    thread.start()
    return thread


def serve(
    home: Path | None = None,
    interval_s: float = POLL_S,
    once: bool = False,
    grace_s: float = GRACE_S,
    cpu_budget: int | None = None,
    sampler_interval_s: float | None = 1.0,
    stop: threading.Event | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT (or `stop` is set, or after one pass with `once`)."""
    home = Path(home).resolve() if home is not None else paths.lab_home()
    lock = FileLock(str(home / LOCK_FILE))
    try:
        lock.acquire(timeout=2.0)
    except Timeout:
        print(f"another launcher already serves {home}: {daemon_status(home).message}", file=sys.stderr)
        return 3
    stop = stop or threading.Event()
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
        launcher = Launcher(home, grace_s=grace_s, cpu_budget=cpu_budget)
        me = psutil.Process()
        info = {
            "pid": me.pid,
            "create_time": me.create_time(),
            "started_at": time.time(),
            "interval": interval_s,
            "home": str(home),
        }
        info["heartbeat"] = time.time()
        _write_daemon_file(home, info)
        log.info("launcher serving %s (pid %s)", home, me.pid)
        sampler = None
        if sampler_interval_s and not once:
            sampler = _start_sampler(launcher.engine, stop, sampler_interval_s)
        while True:
            try:
                launcher.tick()
            except Exception:  # a locked database or a full disk must not end the daemon
                log.exception("launcher pass failed; retrying")
            info["heartbeat"] = time.time()
            _write_daemon_file(home, info)
            if once or stop.wait(interval_s):
                break
        if sampler is not None:
            stop.set()
            sampler.join(5)
        info["stopped_at"] = time.time()
        _write_daemon_file(home, info)
        log.info("launcher stopped; running jobs keep running and are re-adopted on the next start")
        return 0
    finally:
        lock.release()


def cli_serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_core serve", description="Run the launcher daemon.")
    parser.add_argument("--interval", type=float, default=POLL_S, help="Seconds between queue passes.")
    parser.add_argument("--once", action="store_true", help="One pass (adopt/settle, start runnable), then exit.")
    parser.add_argument(
        "--grace",
        type=float,
        default=float(os.environ.get("SAE_LAB_CANCEL_GRACE_S", GRACE_S)),
        help="Seconds between SIGTERM and SIGKILL when cancelling.",
    )
    parser.add_argument(
        "--cpu-budget", type=int, default=None, help="Total gloo processes of concurrent CPU jobs (default: CPU cores)."
    )
    parser.add_argument("--sample-interval", type=float, default=1.0, help="GPU sampler period; 0 disables it.")
    args = parser.parse_args(argv)
    if args.interval <= 0 or args.grace < 0:
        parser.error("--interval must be > 0 and --grace >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(
        interval_s=args.interval,
        once=args.once,
        grace_s=args.grace,
        cpu_budget=args.cpu_budget,
        sampler_interval_s=args.sample_interval or None,
    )


__all__ = [
    "DaemonStatus",
    "Launcher",
    "LauncherError",
    "build_command",
    "cancel_job",
    "cli_serve",
    "daemon_status",
    "ensure_daemon",
    "finalize_job",
    "job_processes",
    "kill_job_processes",
    "root_cause",
    "run_job",
    "serve",
    "terminate_job",
    "threads_per_rank",
]
