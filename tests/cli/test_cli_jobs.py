"""The job commands, run in this process against a real lab.db and the fake NVML."""

from __future__ import annotations

import json
import os
import threading
import time

import psutil
import pytest

from sae_core.cli import jobs as cli_jobs
from sae_core.config import TrainConfig
from sae_core.jobs import scheduler, store
from sae_core.jobs.placement import Submission
from tests.fakes import fake_pynvml as fake
from tests.fakes import fixtures

fake_gpus = fixtures.fake_gpus  # the fake-NVML fixture, registered in this module


def write_cfg(tmp_path, toy_path, **overrides):
    cfg = {"activation_source": str(toy_path), "d_sae": 64, "k": 4, "batch_size": 256, "total_steps": 20,
           "holdout_tokens": 1024, **overrides}  # fmt: skip
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def submit(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_jobs.cli_submit([*args, "--no-daemon"])
    out, err = capsys.readouterr()
    return code, out, err


def nothing_written(lab_home) -> bool:
    jobs_dir = lab_home / "jobs"
    return store.list_jobs() == [] and (not jobs_dir.exists() or not any(jobs_dir.iterdir()))


# --------------------------------------------------------------------------- submit


@pytest.mark.parametrize(
    ("overrides", "where", "message"),
    [
        ({"bogus": 1}, ["--cpu-procs", "1"], "bogus: unknown key"),
        ({"activation_source": "{tmp}/missing.safetensors"}, ["--cpu-procs", "1"], "activation source not found: "),
        ({"activation_source": "/etc/passwd.npy"}, ["--cpu-procs", "1"], "reads data only from SAE_LAB_HOME"),
        ({}, ["--cpu-procs", "3"], "batch_size 256 does not divide evenly across 3"),
        ({"device": "cuda"}, ["--cpu-procs", "1"], "device: 'cuda' cannot run as a CPU job"),
        ({}, ["--gpus", "5"], "GPU 5 does not exist (this machine has GPU 0, 1)"),
        ({}, ["--gpus", "0,0"], "GPU 0 is listed twice"),
        ({}, ["--gpus", "1"], "GPU 1 is busy: used by pid 1"),
    ],
)
def test_rejected_submission_leaves_nothing_behind(
    lab_home, tmp_path, toy_path, capsys, fake_gpus, overrides, where, message
):
    fake_gpus.set(n_gpus=2, overrides={1: {"processes": [fake.process(1, 40 * fake.GiB)]}})
    overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    code, out, err = submit(capsys, "--config", str(write_cfg(tmp_path, toy_path, **overrides)), *where)
    assert code == 2 and out == ""
    assert err.startswith("rejected: ") and message in err
    assert nothing_written(lab_home)


def test_submit_queues_behind_a_job_that_holds_the_gpu(lab_home, tmp_path, toy_path, capsys, fake_gpus):
    # Job 1 "runs" on GPU 0 (its process is this test) and uses 79 GiB of it: a job submitted now
    # queues behind it, and the memory job 1 will free counts as available.
    me = psutil.Process()
    fake_gpus.set(n_gpus=2, overrides={0: {"processes": [fake.process(me.pid, 79 * fake.GiB)]}})
    cfg_path = write_cfg(tmp_path, toy_path)
    first = store.submit_job(TrainConfig.from_json_file(cfg_path), Submission("0", None))
    scheduler.claim_runnable(cpu_budget=1)
    store.mark_running(first.id, me.pid, me.create_time())

    code, out, err = submit(capsys, "--config", str(cfg_path), "--gpus", "0", "--name", "second", "--json")
    assert code == 0, err
    queued = json.loads(out)
    assert (queued["id"], queued["status"], queued["gpu_ids"], queued["name"]) == (2, "queued", [0], "second")
    assert "no launcher is running" in err
    assert store.get_job(2).submitted_by  # the login name by default


def test_submit_cpu_job_prints_a_line(lab_home, tmp_path, toy_path, capsys):
    code, out, _ = submit(capsys, "--config", str(write_cfg(tmp_path, toy_path)), "--cpu-procs", "2",
                          "--user", "ada")  # fmt: skip
    assert code == 0
    assert out.startswith("queued job 1 (job-1) on CPU x2; output in ")
    assert store.get_job(1).submitted_by == "ada"


# --------------------------------------------------------------------------- jobs, cancel, resume


def test_jobs_lists_as_table_and_json(lab_home, tmp_path, toy_path, capsys):
    cfg = TrainConfig.from_json_file(write_cfg(tmp_path, toy_path))
    store.submit_job(cfg, Submission(None, 1, name="alpha"))
    running = store.submit_job(cfg, Submission("0,1", None, name="beta"))
    scheduler.claim_runnable(cpu_budget=1)
    store.mark_running(running.id, 1, 0.0)
    store.request_cancel(running.id)
    assert cli_jobs.cli_jobs([]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATUS", "WHERE", "STEP", "TOK/S", "USER", "TIME", "ERROR"]
    assert lines[1].split()[:5] == ["2", "beta", "running*", "GPU", "0,1"]
    assert "* cancel requested" in out and "launcher not running" in err
    assert cli_jobs.cli_jobs(["--json", "--status", "running"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [j["name"] for j in data] == ["beta"] and data[0]["cancel_requested"] is True


def test_cancel_and_resume_messages(lab_home, tmp_path, toy_path, capsys):
    job = store.submit_job(TrainConfig.from_json_file(write_cfg(tmp_path, toy_path)), Submission(None, 1))
    assert cli_jobs.cli_cancel([str(job.id)]) == 0
    assert capsys.readouterr().out.strip() == f"job {job.id} cancelled (it had not started)"
    assert cli_jobs.cli_cancel([str(job.id)]) == 2
    assert "already cancelled" in capsys.readouterr().err
    assert cli_jobs.cli_cancel(["42"]) == 2
    assert "no job with id 42" in capsys.readouterr().err
    assert cli_jobs.cli_resume([str(job.id), "--no-daemon"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert store.list_jobs() == [store.get_job(job.id)]  # nothing queued


# --------------------------------------------------------------------------- logs


def test_logs_prints_output_and_the_failure(lab_home, tmp_path, toy_path, capsys):
    job = store.submit_job(TrainConfig.from_json_file(write_cfg(tmp_path, toy_path)), Submission(None, 1))
    logs = lab_home / "jobs" / str(job.id) / "logs"
    logs.mkdir(parents=True)
    (logs / "stdout.log").write_text("step 10/20 | ...\n")
    (logs / "stderr.log").write_text("Traceback ...\nValueError: boom\n")
    store.finish_job(job.id, "failed", 1, "rank 0: ValueError: boom")
    assert cli_jobs.cli_logs([str(job.id)]) == 0
    out, err = capsys.readouterr()
    assert out == "step 10/20 | ...\n" and "failed: rank 0: ValueError: boom" in err
    assert cli_jobs.cli_logs([str(job.id), "--stderr"]) == 0
    assert capsys.readouterr().out.endswith("ValueError: boom\n")


def test_logs_follow_prints_until_the_job_ends(lab_home, tmp_path, toy_path, capsys):
    job = store.submit_job(TrainConfig.from_json_file(write_cfg(tmp_path, toy_path)), Submission(None, 1))
    scheduler.claim_runnable(cpu_budget=1)
    store.mark_running(job.id, os.getpid(), 0.0)
    log = lab_home / "jobs" / str(job.id) / "logs" / "stdout.log"
    log.parent.mkdir(parents=True)
    log.write_text("step 1/20\n")

    def training():
        for step in (10, 20):
            time.sleep(0.2)
            with open(log, "a") as fh:
                fh.write(f"step {step}/20\n")
        store.finish_job(job.id, "completed", 0)

    thread = threading.Thread(target=training)
    thread.start()
    started = time.time()
    assert cli_jobs.cli_logs([str(job.id), "--follow", "--poll", "0.05"]) == 0
    thread.join()
    assert capsys.readouterr().out == "step 1/20\nstep 10/20\nstep 20/20\n"
    assert time.time() - started < 10


# --------------------------------------------------------------------------- hardening (issue 11)


@pytest.mark.parametrize("command", [cli_jobs.cli_cancel, cli_jobs.cli_resume, cli_jobs.cli_logs])
@pytest.mark.parametrize("job_id", ["99999999999999999999", "0", "-3"])
def test_an_id_no_job_can_have_is_a_message(lab_home, capsys, command, job_id):
    assert command([job_id]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rejected: no job with id ") and "Traceback" not in err


def test_an_overlong_step_count_and_a_newline_in_a_name_are_refused(lab_home, tmp_path, toy_path, capsys):
    code, _, err = submit(
        capsys, "--config", str(write_cfg(tmp_path, toy_path, total_steps=10**20)), "--cpu-procs", "1"
    )
    assert code == 2 and "total_steps: Input should be less than or equal to 1000000000" in err
    code, _, err = submit(capsys, "--config", str(write_cfg(tmp_path, toy_path)), "--cpu-procs", "1", "--name", "a\nb")
    assert code == 2 and "name: no control characters" in err
    assert nothing_written(lab_home)
