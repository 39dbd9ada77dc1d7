"""A damaged lab home never loses history silently: a lost, corrupt or unwritable lab.db is refused with
one message (CLI, app, daemon), and a job never reuses the folder of an earlier one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from streamlit.testing.v1 import AppTest

from sae_core import db
from sae_core.config import TrainConfig
from sae_core.db import snapshots
from sae_core.jobs import daemon, daemon_control, store
from sae_core.jobs.placement import Submission
from tests.conftest import REPO, subprocess_env


def cli(home, *args):
    env = subprocess_env(SAE_LAB_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-m", "sae_core", *args], env=env, capture_output=True, text=True, timeout=60
    )


def lost_history(home, empty: bool):
    for job_id in (1, 2):
        (home / "jobs" / str(job_id) / "logs").mkdir(parents=True)
    if empty:
        (home / "lab.db").write_bytes(b"")


def corrupt(home):
    (home / "lab.db").write_bytes(os.urandom(8192))


@pytest.mark.parametrize("empty", [True, False], ids=["empty lab.db", "missing lab.db"])
def test_a_lost_history_is_refused_not_restarted(lab_home, empty):
    lost_history(lab_home, empty)
    with pytest.raises(db.LabDatabaseError) as refused:
        db.get_engine()
    message = str(refused.value)
    assert ("is empty" if empty else "is missing") in message and "2 job folder(s) (up to job 2)" in message
    assert "move" in message and "aside" in message
    assert (lab_home / "lab.db").exists() == empty  # nothing created, nothing overwritten


def test_a_corrupt_database_is_explained_and_a_copy_kept(lab_home):
    corrupt(lab_home)
    original = (lab_home / "lab.db").read_bytes()
    with pytest.raises(db.LabDatabaseError) as refused:
        db.get_engine()
    message = str(refused.value)
    assert refused.value.kind == "damaged" and "is damaged (file is not a database)" in message
    assert "PRAGMA integrity_check says" in message and ".recover" in message
    (backup,) = lab_home.glob("lab.db.damaged-*")
    assert backup.read_bytes() == original and str(backup) in message


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["lost", "corrupt"])
def test_the_cli_and_the_daemon_say_it_once_and_stop(tmp_path, damage):
    home = tmp_path / "lab"
    home.mkdir()
    lost_history(home, empty=True) if damage == "lost" else corrupt(home)
    for args in (("jobs",), ("serve", "--once", "--sample-interval", "0")):
        done = cli(home, *args)
        assert done.returncode == 1, (args, done.stderr)
        assert "Traceback" not in done.stderr and ("lab.db is" in done.stderr), done.stderr


def test_the_app_shows_one_page_explaining_the_damage(lab_home, monkeypatch):
    corrupt(lab_home)
    monkeypatch.setattr(daemon_control, "ensure_daemon", lambda home=None, **kw: True)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=30).run()
    assert not at.exception
    assert at.title[0].value == "SAE Lab cannot open its database"
    assert "is damaged" in at.error[0].value and not at.sidebar.markdown


def test_an_unwritable_database_is_explained(lab_home):
    db.get_engine()
    db.dispose_engines()
    path = lab_home / "lab.db"
    if os.getuid() == 0:  # root writes through permissions: make the file immutable instead
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a file read-only for root here (no chattr +i)")
    else:
        path.chmod(0o444)
        lab_home.chmod(0o555)
    try:
        with pytest.raises(db.LabDatabaseError) as refused:
            store.submit_job(TrainConfig(activation_source="x", d_sae=8, k=4, total_steps=1), Submission(None, 1))
        assert refused.value.kind == "unwritable" and "cannot be written" in str(refused.value)
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        lab_home.chmod(0o755)
        path.chmod(0o644)


def test_a_new_job_never_reuses_an_existing_folder(lab_home, caplog):
    db.get_engine()
    (lab_home / "jobs" / "7").mkdir(parents=True)  # left by hand, or by an earlier history
    cfg = TrainConfig(activation_source="x", d_sae=8, k=4, total_steps=1)
    first = store.submit_job(cfg, Submission(None, 1))
    second = store.submit_job(cfg, Submission(None, 1))
    assert (first.id, second.id) == (8, 9)
    assert caplog.text.count("job folders up to 7 exist") == 1  # said once


def test_the_daemon_outlives_an_unwritable_status_file_and_reports_it(lab_home):
    db.get_engine()
    (lab_home / "daemon.json").mkdir()  # the status file cannot be written (as on a full or read-only disk)
    stop = threading.Event()
    codes = []
    thread = threading.Thread(
        target=lambda: codes.append(daemon.serve(lab_home, interval_s=0.05, sampler_interval_s=None, stop=stop))
    )
    thread.start()
    try:
        deadline = time.time() + 20
        while time.time() < deadline and "cannot write" not in daemon_control.daemon_status(lab_home).message:
            time.sleep(0.05)
        status = daemon_control.daemon_status(lab_home)
        assert status.running and status.healthy and "cannot write" in status.message, status
        time.sleep(0.3)
        assert thread.is_alive()  # still serving
    finally:
        stop.set()
        thread.join(10)
    assert codes == [0]


def test_status_written_to_the_database_names_the_daemon(lab_home):
    # the row is plain JSON of the status file's fields
    engine = db.get_engine()
    problem = daemon_control.beat(lab_home / "nowhere", {"pid": 1, "heartbeat": 0.0}, engine)
    assert problem and "cannot write" in problem
    assert json.loads(snapshots.get(engine, daemon_control.STATUS_KEY))["problem"] == problem
