"""Launcher logic without training: the command plan, root causes, outcomes, jobwrap, status file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sae_core.db.tables import Job
from sae_core.gpu import processes as gpu_processes
from sae_core.jobs import command, daemon, daemon_control, diagnosis, lifecycle, processes

CONFIG = '{"activation_source": "/x", "d_sae": 64, "k": 8, "batch_size": 256, "total_steps": 5}'


def a_job(id_=7, gpus="", cpu=None, resumed_from=None, out_dir="/lab/jobs/7") -> Job:
    return Job(
        id=id_,
        gpu_ids=gpus,
        cpu_procs=cpu,
        config_json=CONFIG,
        created_at=0.0,
        out_dir=out_dir,
        resumed_from=resumed_from,
    )


# --------------------------------------------------------------------------- build_command


def test_gpu_job_command_and_environment():
    base = {
        "PATH": "/bin",
        "PYTHONPATH": "/extra",
        "SAE_LAB_PASSWORD": "s3cret",
        "RANK": "3",
        "MASTER_PORT": "29500",
        "TORCHELASTIC_ERROR_FILE": "/x",
    }
    argv, env = command.build_command(
        a_job(gpus="2,3"), Path("/lab"), python="/py", gpu_available=True, cpu_count=16, base_env=base
    )
    assert argv == [
        "/py", "-m", "sae_core.engine.torchrun", "--nnodes", "1", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1",
        "--rdzv-id", "7", "--max-restarts", "0",
        "--log-dir", "/lab/jobs/7/logs/torchrun", "--tee", "3",
        "-m", "sae_core.train", "--config", "/lab/jobs/7/train_request.json", "--out", "/lab/jobs/7",
    ]  # fmt: skip
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["SAE_LAB_JOB_ID"] == "7" and env["SAE_LAB_HOME"] == "/lab"
    assert env["OMP_NUM_THREADS"] == "8"  # 16 cores / 2 ranks
    assert env["TORCHELASTIC_ERROR_FILE"] == "/lab/jobs/7/logs/error.json"
    assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"] == "/bin"
    assert env["PYTHONPATH"] == "/extra"  # untouched: jobs run the venv's interpreter, with sae_core installed
    assert "RANK" not in env and "MASTER_PORT" not in env  # a torchrun context must not leak into the job
    assert "SAE_LAB_PASSWORD" not in env  # the app's secret stays with the app
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "lo"  # one node: loopback sockets
    assert base["RANK"] == "3"  # the input is not modified: the function is pure


def test_cpu_job_hides_gpus_and_runs_cpu_procs_ranks():
    argv, env = command.build_command(
        a_job(cpu=4), Path("/lab"), python="/py", gpu_available=True, cpu_count=2, base_env={}
    )
    assert argv[argv.index("--nproc-per-node") + 1] == "4"
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["OMP_NUM_THREADS"] == "1"  # never below one thread


def test_gpu_job_without_cuda_runs_on_the_cpu():
    _, env = command.build_command(a_job(gpus="0,1"), Path("/lab"), gpu_available=False, cpu_count=8, base_env={})
    assert env["CUDA_VISIBLE_DEVICES"] == ""


def test_threads_respect_an_explicit_omp_setting_and_resume_points_at_the_old_dir():
    argv, env = command.build_command(
        a_job(cpu=2, resumed_from=3),
        Path("/lab"),
        gpu_available=False,
        cpu_count=16,
        base_env={"OMP_NUM_THREADS": "1"},
    )
    assert env["OMP_NUM_THREADS"] == "1"
    assert argv[-2:] == ["--resume", "/lab/jobs/3"]
    again = command.build_command(
        a_job(cpu=2, resumed_from=3),
        Path("/lab"),
        gpu_available=False,
        cpu_count=16,
        base_env={"OMP_NUM_THREADS": "1"},
    )
    assert again == (argv, env)


@pytest.mark.parametrize(("cores", "ranks", "threads"), [(16, 2, 8), (16, 3, 5), (2, 4, 1), (1, 1, 1)])
def test_threads_per_rank(cores, ranks, threads):
    assert command.threads_per_rank(cores, ranks) == threads


# --------------------------------------------------------------------------- root cause


def rank_error(log_dir: Path, rank: int, message: str, mtime: float) -> None:
    path = log_dir / "torchrun" / "7_abc" / "attempt_0" / str(rank) / "error.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"message": {"message": message, "extraInfo": {"py_callstack": "Traceback...", "timestamp": "1"}}}
    path.write_text(json.dumps(data))
    os.utime(path, (mtime, mtime))


def test_root_cause_prefers_the_first_failing_rank_over_its_victims(tmp_path):
    logs = tmp_path / "logs"
    # rank 0 noticed rank 1's death; even with an earlier mtime it is not the cause
    rank_error(logs, 0, "RuntimeError: Connection closed by peer [127.0.0.1]:1234", mtime=100.0)
    rank_error(logs, 1, "ValueError: d_in mismatch", mtime=101.0)
    assert diagnosis.root_cause(logs, 1) == "rank 1: ValueError: d_in mismatch"
    rank_error(logs, 2, "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", mtime=100.5)
    assert diagnosis.root_cause(logs, 1).startswith("rank 2: OutOfMemoryError: CUDA out of memory")


def test_root_cause_from_torchruns_copy_then_train_refusal(tmp_path):
    logs = tmp_path / "job" / "logs"
    logs.mkdir(parents=True)
    (tmp_path / "job" / "error.txt").write_text("device: 'cuda' was asked for but no CUDA device is visible\n")
    assert diagnosis.root_cause(logs, 2).startswith("device: 'cuda' was asked for")
    (logs / "error.json").write_text(json.dumps({"message": {"message": "KeyError: 'x'", "extraInfo": {}}}))
    assert diagnosis.root_cause(logs, 1) == "KeyError: 'x'"


CHILD_FAILED = """
Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
sae_core.train FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-21_07:21:35
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 7615)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 7615
============================================================
"""


def test_root_cause_of_a_killed_rank_from_torchruns_report(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "stderr.log").write_text("[default0]:step 10/100\n" + CHILD_FAILED)
    message = diagnosis.root_cause(logs, 1)
    assert message.startswith("rank 1 was killed by SIGKILL") and "out-of-memory killer" in message


# Shape of torchrun 2.13's report after `kill -9` of rank 1: rank 0 then died in gloo (and was
# SIGTERMed by torchrun's teardown), torchrun names rank 1 as the root cause.
KILLED_RANK_1_REPORT = """
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
sae_core.train FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-21_07:32:00
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 15511)  (SIGTERM)
  error_file: /lab/jobs/1/logs/torchrun/1_x/attempt_0/0/error.json
  traceback : Traceback (most recent call last):
    File "/work/main/sae_core/train.py", line 194, in train_step
      out.loss.backward()
  RuntimeError: [pair.cc:537] Read error [127.0.0.1]:44953: Connection reset by peer.
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-21_07:32:00
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 15512)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 15512
============================================================
"""


def test_a_killed_rank_outranks_the_peer_errors_it_caused(tmp_path):
    logs = tmp_path / "logs"
    rank_error(logs, 0, "RuntimeError: [pair.cc:537] Read error [127.0.0.1]:44953: Connection reset by peer. "
               "This is typically caused by a remote worker hanging", mtime=100.0)  # fmt: skip
    (logs / "stderr.log").write_text(KILLED_RANK_1_REPORT)
    assert diagnosis.root_cause(logs, 1).startswith("rank 1 was killed by SIGKILL")
    # without torchrun's report, the peer's error is still better than nothing
    (logs / "stderr.log").write_text("")
    assert diagnosis.root_cause(logs, 1).startswith("rank 0: RuntimeError: [pair.cc:537] Read error")


def test_root_cause_of_a_killed_torchrun_and_the_log_tail(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    assert diagnosis.root_cause(logs, -15) == "torchrun was killed by SIGTERM"
    (logs / "stderr.log").write_text("\n".join(f"line {i}" for i in range(40)) + "\nSegmentation fault\n")
    message = diagnosis.root_cause(logs, 139)
    assert message.startswith("exit code 139; last lines of stderr:") and message.endswith("Segmentation fault")
    assert "line 26" in message and "line 25" not in message  # the last 15 lines


def test_outcome_of_ended_jobs(tmp_path):
    job = a_job(cpu=1, out_dir=str(tmp_path))
    logs = tmp_path / "logs"
    logs.mkdir()
    assert lifecycle.outcome(job, 0, logs) == ("failed", "training exited with code 0 but wrote no eval.json")
    (tmp_path / "eval.json").write_text("{}")
    assert lifecycle.outcome(job, 0, logs) == ("completed", None)
    assert lifecycle.outcome(job, None, logs) == ("failed", lifecycle.LOST_MESSAGE)
    job.cancel_requested = True
    assert lifecycle.outcome(job, -15, logs) == ("cancelled", "cancelled on request")
    assert lifecycle.outcome(job, 0, logs) == ("completed", None)  # the cancel came after the end


# --------------------------------------------------------------------------- jobwrap


def run_wrapped(tmp_path, code: str) -> subprocess.Popen:
    exit_file = tmp_path / "exit_code"
    return subprocess.Popen(
        [sys.executable, str(processes.JOBWRAP), "--exit-file", str(exit_file), "--", sys.executable, "-c", code],
        start_new_session=True,
    )


def test_jobwrap_records_the_exit_code(tmp_path):
    proc = run_wrapped(tmp_path, "import sys; sys.exit(3)")
    assert proc.wait(30) == 3
    assert diagnosis.read_exit_code(tmp_path) == 3


def test_jobwrap_forwards_sigterm_and_records_the_signal(tmp_path):
    ready = tmp_path / "ready"
    proc = run_wrapped(tmp_path, f"import pathlib, time; pathlib.Path({str(ready)!r}).touch(); time.sleep(60)")
    deadline = time.time() + 30
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.05)
    child = psutil.Process(proc.pid).children()[0]
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    assert diagnosis.read_exit_code(tmp_path) == -signal.SIGTERM
    assert not child.is_running()


def test_read_exit_code_tolerates_missing_and_torn_files(tmp_path):
    assert diagnosis.read_exit_code(tmp_path) is None
    (tmp_path / "exit_code").write_text('{"exit_co')
    assert diagnosis.read_exit_code(tmp_path) is None


# --------------------------------------------------------------------------- process identity, daemon status


def test_a_pid_is_only_ours_with_its_start_time():
    me = psutil.Process()
    assert gpu_processes.process_if_same(me.pid, me.create_time()) is not None
    assert gpu_processes.process_if_same(me.pid, me.create_time() - 60) is None  # a reused pid
    assert gpu_processes.process_if_same(None, 1.0) is None


def test_daemon_status_from_its_file(tmp_path):
    assert not daemon_control.daemon_status(tmp_path).running
    me = psutil.Process()
    info = {"pid": me.pid, "create_time": me.create_time(), "started_at": 1.0, "heartbeat": 100.0, "interval": 0.5}
    (tmp_path / "daemon.json").write_text(json.dumps(info))
    fresh = daemon_control.daemon_status(tmp_path, now=101.0)
    assert fresh.running and fresh.healthy and fresh.pid == me.pid and "heartbeat 1.0 s ago" in fresh.message
    stuck = daemon_control.daemon_status(tmp_path, now=200.0)
    assert stuck.running and not stuck.healthy and "not responding" in stuck.message
    (tmp_path / "daemon.json").write_text(json.dumps({**info, "create_time": me.create_time() - 99}))
    assert not daemon_control.daemon_status(tmp_path, now=101.0).running  # the pid now belongs to someone else
    (tmp_path / "daemon.json").write_text(json.dumps({**info, "stopped_at": 150.0}))
    assert not daemon_control.daemon_status(tmp_path, now=101.0).running


def test_cuda_detection_reads_the_torch_build_and_honours_the_override(monkeypatch):
    import torch

    assert daemon.torch_build_has_cuda() == (torch.version.cuda is not None)
    monkeypatch.setenv("SAE_LAB_CUDA", "1")
    assert daemon.cuda_available() is True
    monkeypatch.setenv("SAE_LAB_CUDA", "0")
    assert daemon.cuda_available() is False
