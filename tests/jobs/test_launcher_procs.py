"""The launcher with real processes: daemon, torchrun (gloo on the CPU), cancel, failures, recovery, resume.

Every test ends by checking with psutil that no process of its jobs is left.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from sae_core import db
from sae_core.cli import jobs as cli_jobs
from sae_core.config import ExtractConfig, TrainConfig
from sae_core.db.tables import ACTIVE_STATUSES, FINAL_STATUSES
from sae_core.engine import saelens
from sae_core.gpu import history
from sae_core.gpu.processes import PID_START_TOLERANCE_S
from sae_core.jobs import daemon_control, lifecycle, metrics, store, submission
from sae_core.jobs.placement import Submission
from tests.conftest import racing_scripts, subprocess_env, tiny_config

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


def write_cfg(directory: Path, toy_path: Path, name: str = "cfg.json", **overrides) -> Path:
    cfg = tiny_config(toy_path, **overrides)
    path = directory / name
    path.write_text(json.dumps(cfg))
    return path


def wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_status(job_id: int, statuses, timeout: float = 120):
    statuses = (statuses,) if isinstance(statuses, str) else tuple(statuses)

    def reached():
        job = store.get_job(job_id)
        return job if job.status in statuses else None

    return wait_for(reached, timeout, f"job {job_id} to be {'/'.join(statuses)}")


def home_processes(home: Path) -> list[psutil.Process]:
    """Live processes started for this lab home (jobs and daemons), found by their environment."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            env = proc.environ()
            if env.get("SAE_LAB_HOME") == str(home) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def job_processes_left(job_id: int, home: Path) -> list[psutil.Process]:
    return [p for p in home_processes(home) if _env(p).get("SAE_LAB_JOB_ID") == str(job_id)]


def _env(proc: psutil.Process) -> dict:
    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return {}


def rank_process(job_id: int, home: Path, local_rank: int) -> psutil.Process:
    for proc in job_processes_left(job_id, home):
        env = _env(proc)
        if env.get("LOCAL_RANK") == str(local_rank) and "sae_core.train" in " ".join(proc.cmdline()):
            return proc
    raise AssertionError(f"no rank {local_rank} process of job {job_id}")


class Daemon:
    """`python -m sae_core serve` as a child of the test, in a session of its own like the real one."""

    def __init__(self, home: Path, env: dict, args: list[str]):
        self.home, self.env, self.args = home, env, args
        self.proc: subprocess.Popen | None = None
        self.log = home / "test_daemon.log"

    def start(self) -> Daemon:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sae_core", "serve", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # up when its status file names it (a --once daemon may already be done by then)
        wait_for(
            lambda: daemon_control.daemon_status(self.home).pid == self.proc.pid or self.proc.poll() is not None,
            60,
            "the daemon to start",
        )
        return self

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def lab(lab_home):
    """The lab home plus a way to start daemons; anything left of the home is killed afterwards."""
    daemons: list[Daemon] = []

    def start_daemon(*extra: str, env: dict | None = None) -> Daemon:
        args = ["--interval", "0.2", "--grace", "3", *extra]
        if "--sample-interval" not in extra:
            args += ["--sample-interval", "0"]
        daemon = Daemon(lab_home, env or subprocess_env(SAE_LAB_HOME=str(lab_home)), args).start()
        daemons.append(daemon)
        return daemon

    yield lab_home, start_daemon
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
    leftovers = home_processes(lab_home)
    for proc in leftovers:
        proc.kill()
    psutil.wait_procs(leftovers, timeout=10)


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sae_core", *args],
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit_cpu(cfg: Path, procs: int, *extra: str) -> int:
    """`submit` in this process (the CLI's own code; a subprocess would only add start-up time)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_jobs.cli_submit(["--config", str(cfg), "--cpu-procs", str(procs), "--json", "--no-daemon", *extra])
    assert code == 0
    return json.loads(out.getvalue())["id"]


def load_weights(out_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out_dir) / "sae_weights.safetensors"))


# --------------------------------------------------------------------------- tests


def test_two_rank_job_completes_with_metrics_and_a_loadable_sae(lab, toy_path, tmp_path):
    home, _ = lab
    cfg = write_cfg(tmp_path, toy_path, total_steps=30, log_every=10)
    # no --no-daemon: submit starts the launcher itself (ensure_daemon)
    result = cli("submit", "--config", str(cfg), "--cpu-procs", "2", "--name", "two ranks")
    assert result.returncode == 0, result.stderr
    assert "queued job 1" in result.stdout and "starting one" in result.stderr
    status = daemon_control.daemon_status(home)
    assert status.running

    job = wait_status(1, FINAL_STATUSES)
    assert job.status == "completed", job.error
    assert job.exit_code == 0 and job.started_at <= job.finished_at and job.pid_start_time >= job.created_at - 1
    frame = metrics.metrics_frame(job.id)
    assert frame["step"].tolist() == [10, 20, 30]  # one row per log_every
    assert len(frame["peak_mem"].iloc[-1]) == 2  # one figure per rank
    assert job.last_step == 30 and job.tokens_per_s > 0

    model = saelens.load(job.out_dir)
    assert (model.d_in, model.d_sae) == (32, 64)
    logs = cli("logs", str(job.id))
    assert logs.returncode == 0 and "step 30/30" in logs.stdout
    assert job_processes_left(job.id, home) == []

    # the detached daemon stops cleanly on SIGTERM
    os.kill(status.pid, signal.SIGTERM)
    wait_for(lambda: not daemon_control.daemon_status(home).running, 30, "the daemon to stop")


def test_kill_9_of_one_rank_fails_the_job_fast_with_the_cause(lab, toy_path, tmp_path):
    home, start_daemon = lab
    start_daemon()
    cfg = write_cfg(tmp_path, toy_path, total_steps=100_000, log_every=20, checkpoint_every=100_000)
    job_id = submit_cpu(cfg, 2)
    wait_for(lambda: store.get_job(job_id).last_step > 0, 120, "training to start")

    rank_process(job_id, home, 1).kill()
    killed_at = time.time()
    job = wait_status(job_id, ("failed", "completed", "cancelled"), timeout=30)
    detect_s = job.finished_at - killed_at
    print(f"\nkill -9 of rank 1 -> failed in {detect_s:.2f} s")
    assert job.status == "failed"
    assert detect_s < 10
    assert "rank 1" in job.error and "SIGKILL" in job.error, job.error
    assert job_processes_left(job_id, home) == []
    assert store.list_jobs(ACTIVE_STATUSES) == []  # nothing holds a GPU or a CPU slot


def test_a_job_listens_on_loopback_only_and_carries_no_secret(lab, toy_path, tmp_path):
    home, start_daemon = lab
    start_daemon(env=subprocess_env(SAE_LAB_HOME=str(home), SAE_LAB_PASSWORD="s3cret"))  # as the app's daemon
    cfg = write_cfg(tmp_path, toy_path, total_steps=100_000, log_every=20, checkpoint_every=100_000)
    job_id = submit_cpu(cfg, 2)
    wait_for(lambda: store.get_job(job_id).last_step > 0, 120, "training to start")
    procs = job_processes_left(job_id, home)
    listening = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            listening += [
                (proc.pid, c.laddr.ip, c.laddr.port) for c in proc.net_connections("inet") if c.status == "LISTEN"
            ]
    # torchrun's agent hosts two stores, and each gloo rank a listener: all of them, only on loopback
    assert len(listening) >= 4, listening
    assert {ip for _, ip, _ in listening} <= {"127.0.0.1", "::1"}, listening
    assert all("SAE_LAB_PASSWORD" not in _env(p) for p in procs)
    store.request_cancel(job_id)
    assert wait_status(job_id, FINAL_STATUSES, timeout=60).status == "cancelled"


def test_errors_in_the_worker_become_the_failure_message(lab, toy_path, tmp_path):
    home, start_daemon = lab
    start_daemon()
    # (a) a config the worker refuses (submitted past the CLI's checks, as a stale or hand-written row would be)
    bad = TrainConfig.from_json_file(write_cfg(tmp_path, toy_path, device="cuda"))
    refused = store.submit_job(bad, Submission(None, 1))
    # (b) an exception inside training: resuming from a checkpoint whose tensors are garbage
    base = store.submit_job(
        TrainConfig.from_json_file(write_cfg(tmp_path, toy_path, name="ok.json")), Submission(None, 1)
    )
    store.request_cancel(base.id)
    ckpt = Path(base.out_dir) / "checkpoints" / "step_000000010"
    ckpt.mkdir(parents=True)
    (ckpt / "state.safetensors").write_bytes(b"\x00garbage")
    (ckpt / "state.json").write_text("{}")
    (ckpt / "COMPLETE").write_text("10")
    crashing, _ = submission.resume(base.id)

    refused = wait_status(refused.id, ("failed", "completed"))
    assert refused.status == "failed"
    assert "device: 'cuda' was asked for but no CUDA device is visible" in refused.error
    crashing = wait_status(crashing.id, ("failed", "completed"))
    assert crashing.status == "failed"
    assert crashing.error.startswith("rank 0: ") and "Error" in crashing.error.splitlines()[0], crashing.error
    for job_id in (refused.id, crashing.id):
        assert job_processes_left(job_id, home) == []


def test_out_of_memory_in_the_worker_fails_the_job_with_the_allocator_message(lab, tmp_path):
    """A real allocation failure: a decoder larger than RAM + swap is refused at once (no thrashing)."""
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("vm.overcommit_memory=1 would grant the allocation and let the OOM killer act instead")
    home, start_daemon = lab
    start_daemon()
    memory = psutil.virtual_memory().total + psutil.swap_memory().total
    d_in = -(-2 * memory // (4 * 2**24))  # W_dec [2^24, d_in] float32 is twice RAM + swap
    data = tmp_path / "wide.npy"
    np.save(data, np.random.default_rng(0).standard_normal((1536, d_in), dtype=np.float32))
    cfg = TrainConfig.from_json_file(write_cfg(tmp_path, data, name="oom.json", d_sae=2**24))
    job = store.submit_job(
        cfg, Submission(None, 1)
    )  # past the CLI's memory check, as a too-optimistic estimate would be
    job = wait_status(job.id, ("failed", "completed"))
    assert job.status == "failed"
    assert job.error.startswith("rank 0: ") and "can't allocate memory" in job.error, job.error
    assert job_processes_left(job.id, home) == []


def test_cancel_with_no_daemon_running_stops_the_job_from_the_cli(lab, toy_path, tmp_path):
    home, start_daemon = lab
    cfg = write_cfg(tmp_path, toy_path, total_steps=100_000, log_every=20, checkpoint_every=50)
    job_id = submit_cpu(cfg, 2)
    daemon = start_daemon("--once")  # starts the job and exits: nobody watches it now
    assert daemon.proc.wait(30) == 0
    assert not daemon_control.daemon_status(home).running
    wait_for(lambda: store.get_job(job_id).last_step >= 50, 120, "a checkpoint")

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_jobs.cli_cancel([str(job_id), "--grace", "3"]) == 0
    assert "no launcher running: stopped job" in out.getvalue()
    job = store.get_job(job_id)
    assert job.status == "cancelled" and job.error == "cancelled on request"
    assert job_processes_left(job_id, home) == []
    assert (Path(job.out_dir) / "checkpoints").is_dir() and list(
        (Path(job.out_dir) / "checkpoints").glob("step_*/COMPLETE")
    )


def test_daemon_kill_9_then_restart_readopts_a_live_job_and_fails_a_lost_one(lab, toy_path, tmp_path):
    home, start_daemon = lab
    first = start_daemon()
    # Long enough (tens of seconds of training) that it cannot end between its first metric and the freeze.
    live_id = submit_cpu(write_cfg(tmp_path, toy_path, total_steps=4000, log_every=20, checkpoint_every=10_000), 1)
    lost_id = submit_cpu(write_cfg(tmp_path, toy_path, "long.json", total_steps=100_000, log_every=20), 1)
    for job_id in (live_id, lost_id):  # both run at once (CPU budget = 2 cores)
        wait_for(lambda job_id=job_id: store.get_job(job_id).last_step > 0, 120, f"job {job_id} to train")
    # Freeze the live job while no launcher runs, so it cannot finish before the next daemon is up.
    frozen = job_processes_left(live_id, home)
    for proc in frozen:
        proc.suspend()
    first.kill9()
    # The other job loses every process too (its wrapper included: no exit code is ever recorded).
    victims = job_processes_left(lost_id, home)
    for proc in victims:
        proc.kill()
    psutil.wait_procs(victims, timeout=10)

    restarted = time.time()
    second = start_daemon()
    wait_for(lambda: f"job {live_id}: re-adopted" in second.log_text(), 30, "re-adoption")
    lost = wait_status(lost_id, FINAL_STATUSES, timeout=30)
    print(f"\ndaemon restart -> lost job failed {lost.finished_at - restarted:.2f} s after the new daemon was started")
    assert (lost.status, lost.error) == ("failed", lifecycle.LOST_MESSAGE)
    assert store.get_job(live_id).status == "running"
    for proc in frozen:
        proc.resume()
    job = wait_status(live_id, FINAL_STATUSES)
    assert job.status == "completed", job.error
    assert job.exit_code == 0 and metrics.metrics_frame(live_id)["step"].iloc[-1] == 4000
    for job_id in (live_id, lost_id):
        assert job_processes_left(job_id, home) == []


def test_resume_of_a_cancelled_job_ends_with_the_weights_of_an_uninterrupted_run(lab, toy_path, tmp_path):
    home, start_daemon = lab
    start_daemon()
    cfg = write_cfg(tmp_path, toy_path, total_steps=400, log_every=50, checkpoint_every=50)
    reference_id = submit_cpu(cfg, 1, "--name", "reference")
    cancelled_id = submit_cpu(cfg, 1, "--name", "to cancel")  # the CPU budget (2 cores) runs both at once
    checkpoints = Path(store.get_job(cancelled_id).out_dir) / "checkpoints"
    wait_for(lambda: list(checkpoints.glob("step_*/COMPLETE")), 120, "the first checkpoint", poll=0.01)
    asked = time.time()
    cancelled, message = lifecycle.cancel_job(cancelled_id, wait_s=30)  # in-process: no CLI start-up delay
    assert cancelled.status == "cancelled", message
    print(f"\ncancel -> cancelled (daemon, SIGTERM) in {cancelled.finished_at - asked:.2f} s")
    assert cancelled.last_step < 400, "the job finished before the cancel: nothing to resume"
    assert job_processes_left(cancelled_id, home) == []

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_jobs.cli_resume([str(cancelled_id), "--json", "--no-daemon"]) == 0
    resumed_id = json.loads(out.getvalue())["id"]
    resumed = wait_status(resumed_id, ("completed", "failed"))
    reference = wait_status(reference_id, ("completed", "failed"))
    assert (resumed.status, reference.status) == ("completed", "completed"), (resumed.error, reference.error)
    assert resumed.resumed_from == cancelled_id
    stdout_log = (Path(resumed.out_dir) / "logs" / "stdout.log").read_text()
    assert "step 50/400" not in stdout_log  # it continued, it did not start over
    assert "resume: from checkpoints/step_" in stdout_log  # the job log says which checkpoint it continued from

    got, want = load_weights(resumed.out_dir), load_weights(reference.out_dir)
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] == want[name]).all(), f"{name} differs after resume"


# Four processes race to submit (store.submit_job: the CLI's checks are tested on their own and would
# only add a torch import per process); each job is tiny (2 steps). Pattern per process, rotated by
# its number: 16 one-GPU jobs and 4 two-GPU jobs onto the 2 fake GPUs.
SUBMITTER = r"""
import json, sys
from sae_core.config import TrainConfig
from sae_core.jobs import store
from sae_core.jobs.placement import Submission
me, cfg = int(sys.argv[1]), TrainConfig.from_json_file(sys.argv[2])
pattern = ["0", "1", "0,1", "1", "0"]
ids = [store.submit_job(cfg, Submission(pattern[(i + me) % 5], None, name=f"p{me}-{i}")).id for i in range(5)]
print(json.dumps(ids))
"""


def test_twenty_racing_submissions_on_two_fake_gpus_run_once_each_without_sharing(lab, toy_path, tmp_path):
    from tests.fakes import fake_pynvml as fake
    from tests.jobs.test_store_concurrency import held_intervals_overlap

    home, start_daemon = lab
    scenario = fake.write_scenario(tmp_path / "gpus.json", n_gpus=2)
    env = subprocess_env(SAE_LAB_HOME=str(home), **fake.env_for(scenario))
    cfg = write_cfg(tmp_path, toy_path, total_steps=2, log_every=1, checkpoint_every=2)
    start_daemon("--sample-interval", "1", env=env)  # the GPU sampler runs in the daemon too
    submitted = racing_scripts(SUBMITTER, [[str(n), str(cfg)] for n in range(4)], env)
    assert sorted(submitted) == list(range(1, 21))

    def all_final():
        jobs = store.list_jobs()
        return jobs if all(j.status in FINAL_STATUSES for j in jobs) else None

    jobs = wait_for(all_final, 240, "all 20 jobs to end", poll=0.5)
    assert [j.status for j in jobs] == ["completed"] * 20, [(j.id, j.status, j.error) for j in jobs]
    assert sorted(len(j.gpu_list) for j in jobs) == [1] * 16 + [2] * 4
    assert held_intervals_overlap(jobs) == []
    span = max(j.finished_at for j in jobs) - min(j.created_at for j in jobs)
    mean_run = sum(j.finished_at - j.started_at for j in jobs) / len(jobs)
    print(f"\n20 jobs on 2 fake GPUs: {span:.1f} s from first submission to last finish, {mean_run:.1f} s per job")
    for job in jobs:
        # ran exactly once: one start, one training run, its process started inside its reservation
        stdout_log = (Path(job.out_dir) / "logs" / "stdout.log").read_text()
        assert stdout_log.count("done: ") == 1
        assert len((Path(job.out_dir) / "metrics.jsonl").read_text().splitlines()) == 3  # steps 1, 2 + done
        # psutil derives start times from the kernel's boot time in whole seconds (and 10 ms ticks): a start
        # time can read up to the tolerance early, which is why processes are matched with it
        assert job.started_at - PID_START_TOLERANCE_S - 0.01 <= job.pid_start_time <= job.finished_at
        assert job_processes_left(job.id, home) == []
    assert history.row_counts(db.get_engine(home))["gpu_sample"] > 0


# --------------------------------------------------------------------------- extraction jobs (issue 13)


def test_an_extraction_then_its_training_then_its_evaluation_run_in_the_queue(lab, hf, tmp_path):
    home, start_daemon = lab
    extract = tmp_path / "extract.json"
    extract.write_text(json.dumps({"model": str(hf["gpt2"]), "hook": "transformer.h.1", "dataset": str(hf["corpus"]),
                                   "n_tokens": 3000, "context_size": 32, "shard_rows": 800}))  # fmt: skip
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"d_sae": 64, "k": 4, "batch_size": 256, "total_steps": 20, "holdout_tokens": 256,
                                 "b_dec_init": "mean"}))  # fmt: skip
    result = cli("extract", "--config", str(extract), "--cpu-procs", "2", "--then-train", str(train),
                 "--then-evaluate", "5", "--no-daemon", env=subprocess_env(SAE_LAB_HOME=str(home)))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "queued evaluation job 3" in result.stdout and "starts when job 2 completes" in result.stdout
    start_daemon()
    extraction = wait_status(1, FINAL_STATUSES, timeout=180)
    assert extraction.status == "completed", extraction.error
    assert extraction.last_step == 3000 and metrics.metrics_frame(1)["disk_bytes"].iloc[-1] > 0
    training = wait_status(2, FINAL_STATUSES, timeout=180)
    assert training.status == "completed", training.error
    assert training.started_at >= extraction.finished_at  # it waited
    model = saelens.load(training.out_dir)
    assert (model.d_in, model.d_sae) == (32, 64)
    evaluation = wait_status(3, FINAL_STATUSES, timeout=180)
    assert evaluation.status == "completed", evaluation.error
    assert evaluation.kind == "evaluate" and evaluation.last_step == evaluation.total_steps == 5
    figures = json.loads((Path(training.out_dir) / "eval.json").read_text())
    assert figures["eval_contexts"] == 5 and figures["ce_clean"] > 0 and "ce_loss_score" in figures
    assert all(job_processes_left(job, home) == [] for job in (1, 2, 3))


def test_a_failed_extraction_cancels_the_training_waiting_for_it_with_the_reason(lab, hf, tmp_path):
    home, start_daemon = lab
    cfg = ExtractConfig(model=str(hf["gpt2"]), hook="transformer.h.1", dataset=str(hf["corpus"]),
                                   n_tokens=10**6, context_size=32)  # fmt: skip  # more rows than the corpus holds
    train = TrainConfig(activation_source="(the extraction)", d_sae=64, k=4, batch_size=256, total_steps=20)
    extraction, training, _ = submission.submit_extract(cfg, Submission(None, 1), then_train=train)  # 10⁶ rows planned
    start_daemon()
    assert wait_status(extraction.id, FINAL_STATUSES).status == "failed"
    failed = store.get_job(extraction.id)
    assert "n_tokens: 1,000,000 asked for, but the dataset gives only" in failed.error
    cancelled = wait_status(training.id, FINAL_STATUSES)
    assert cancelled.status == "cancelled"
    assert cancelled.error.startswith(f"job {extraction.id} (extract) it depends on failed: ")
    assert not Path(training.out_dir).exists()  # it never started
