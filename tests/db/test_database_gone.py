"""lab.db deleted or replaced while the lab runs (issue 21, item 7): a process notices that the file it opened is
no longer the one at the path and stops writing into it; nothing recreates an empty database beside the old
write-ahead log; the daemon stops with the reason, the CLI says what happened, and every page shows the
database-problem page (no traceback)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from sae_core import db
from sae_core.config import TrainConfig
from sae_core.jobs import daemon_control, store
from sae_core.jobs.placement import Submission
from tests.conftest import subprocess_env

CFG = TrainConfig(activation_source="x", d_sae=8, k=4, total_steps=1)
GONE = "was deleted or replaced while SAE Lab had it open"


def with_history(home) -> None:
    """Two queued jobs and their folders: a lab whose history is worth keeping."""
    for _ in range(2):
        job = store.submit_job(CFG, Submission(None, 1))
        os.makedirs(job.out_dir)


def replace_with_copy(path) -> None:
    """lab.db replaced by a copy of itself (a restore from a backup while the lab runs): a new inode."""
    shutil.copy(path, path.with_name("copy.db"))
    os.replace(path.with_name("copy.db"), path)


# --------------------------------------------------------------------------- in one process


def test_a_deleted_database_is_not_written_into_nor_recreated(lab_home):
    engine = db.get_engine()
    with_history(lab_home)
    (lab_home / "lab.db").unlink()
    for attempt in (lambda: store.submit_job(CFG, Submission(None, 1), engine=engine), store.list_jobs):
        with pytest.raises(db.LabDatabaseError) as gone:  # the engine held, and a fresh look at the path
            attempt()
        assert gone.value.kind == "gone" and GONE in str(gone.value) and "lab.db is missing" in str(gone.value)
    assert not (lab_home / "lab.db").exists()  # nothing created beside the old log
    db.dispose_engines()  # a new process
    with pytest.raises(db.LabDatabaseError) as lost:
        store.list_jobs()
    assert lost.value.kind == "lost" and "is missing but" in str(lost.value) and "2 job folder(s)" in str(lost.value)


def test_a_missing_database_beside_its_write_ahead_log_is_refused(lab_home):
    (lab_home / "lab.db-wal").write_bytes(b"\0" * 32)  # lab.db deleted while a process still held it open
    (lab_home / "lab.db-shm").write_bytes(b"\0" * 32)
    with pytest.raises(db.LabDatabaseError) as refused:
        db.get_engine()
    message = str(refused.value)
    assert refused.value.kind == "lost" and "lab.db-wal and lab.db-shm remain" in message
    assert "deleted while SAE Lab was using it" in message and "disk I/O error" not in message
    assert not (lab_home / "lab.db").exists()


def test_a_replaced_database_is_not_used_until_the_process_starts_again(lab_home):
    engine = db.get_engine()
    with_history(lab_home)
    replace_with_copy(lab_home / "lab.db")
    for attempt in (lambda: store.list_jobs(engine=engine), store.list_jobs):
        with pytest.raises(db.LabDatabaseError) as gone:
            attempt()
        assert gone.value.kind == "gone" and "lab.db is another file now" in str(gone.value)
    db.dispose_engines()  # a new process opens the restored file
    assert [job.id for job in store.list_jobs()] == [2, 1]


# --------------------------------------------------------------------------- the daemon and the CLI, real processes


def cli(home, *args: str) -> subprocess.CompletedProcess:
    env = subprocess_env(SAE_LAB_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "sae_core", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow
@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_the_daemon_stops_with_the_reason_when_its_database_goes(tmp_path, change):
    home = tmp_path / "lab"
    home.mkdir()
    log = tmp_path / "daemon.log"
    env = subprocess_env(SAE_LAB_HOME=str(home))
    with open(log, "wb") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "sae_core", "serve", "--sample-interval", "0"], env=env,
                                  stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.time() + 60
        while not daemon_control.daemon_status(home).healthy:
            assert daemon.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        (home / "jobs" / "1").mkdir(parents=True)  # a history worth keeping
        if change == "deleted":
            (home / "lab.db").unlink()
        else:
            replace_with_copy(home / "lab.db")
        assert daemon.wait(60) == 1
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    text = log.read_text()
    assert f"launcher stops: {home / 'lab.db'} {GONE}" in text and "Traceback" not in text
    if change == "deleted":
        done = cli(home, "jobs")
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert f"{home / 'lab.db'} is missing but" in done.stderr, done.stderr
        assert "disk I/O error" not in done.stderr and "permissions" not in done.stderr
