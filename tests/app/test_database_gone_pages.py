"""Every page, after lab.db was deleted, corrupted or replaced while the app ran (issue 21, item 7): the
database-problem page, whole (nothing the page drew before the error stays), and no traceback; any database
error a page meets, not only those health.py explains, is shown the same way."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing

import pytest
from streamlit.testing.v1 import AppTest

from sae_core import db
from sae_core.jobs import store
from tests.app.conftest import APP, Lab
from tests.conftest import subprocess_env
from tests.db.test_database_gone import replace_with_copy

PROBLEM_TITLE = "SAE Lab cannot open its database"
GONE = "was deleted or replaced while SAE Lab had it open"
EXPLAINED = {"deleted": GONE, "corrupted": "is damaged", "replaced by a broken file": GONE}


PAGES = ["views/home.py", "views/monitor.py", "views/extract.py", "views/train.py", "views/jobs.py",
         "views/saes.py", "views/explore.py"]  # fmt: skip


def damage(home, how: str) -> None:
    path = home / "lab.db"
    if how == "deleted":
        path.unlink()
    elif how == "corrupted":  # found by the next process to open it (an open one may read it from its cache)
        db.dispose_engines()
        with open(path, "r+b") as f:
            f.write(os.urandom(path.stat().st_size))
    else:
        replace_with_copy(path)
        with open(path, "r+b") as f:
            f.write(b"\0" * 100)  # a header that is not SQLite's


@pytest.mark.parametrize("how", ["deleted", "corrupted", "replaced by a broken file"])
def test_every_page_shows_the_database_problem_page(lab: Lab, how):
    lab.sample(n_gpus=1)
    lab.job("completed")
    os.makedirs(lab.home / "jobs" / "1", exist_ok=True)
    for page in PAGES:
        at = lab.page(page, user_name="ana")
        assert not at.exception and at.title[0].value != PROBLEM_TITLE, page
    backup = lab.home.parent / "backup.db"
    with closing(sqlite3.connect(lab.home / "lab.db")) as source, closing(sqlite3.connect(backup)) as copy:
        source.backup(copy)
    damage(lab.home, how)
    for page in PAGES:
        at = lab.page(page, user_name="ana")
        assert not at.exception, (page, [e.value for e in at.exception])
        assert [t.value for t in at.title] == [PROBLEM_TITLE], page
        assert EXPLAINED[how] in at.error[0].value, page
    if how != "corrupted":  # restored, and the app started again: every page is back
        shutil.copy(backup, lab.home / "lab.db")
        db.dispose_engines()
        for page in PAGES:
            at = lab.page(page, user_name="ana")
            assert not at.exception and at.title[0].value != PROBLEM_TITLE, page


def test_an_unexpected_database_error_in_a_page_is_the_same_page(lab: Lab, monkeypatch):
    """Not only the errors health.py explains: any database error, raised mid-page, is shown as the page."""
    lab.job("completed")

    def broken(*_a, **_kw):
        raise sqlite3.OperationalError("no such table: job")

    monkeypatch.setattr(store, "list_jobs", broken)
    at = AppTest.from_file(APP, default_timeout=30)
    at.switch_page("views/jobs.py")
    at.run()
    assert not at.exception and [t.value for t in at.title] == [PROBLEM_TITLE]
    assert "OperationalError: no such table: job" in at.error[0].value.replace("\u2060", "")  # md_text's joiners


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/monitor", "/jobs"])
def test_a_page_refreshing_itself_shows_the_database_problem_page(tmp_path, path):
    """A real browser: the Monitor and Jobs pages refresh parts of themselves every 2 s without app.py; when lab.db
    is deleted meanwhile, the whole app reruns and shows the database-problem page, not a traceback."""
    from playwright.sync_api import expect, sync_playwright

    from tests.app.test_e2e_browser import CHROMIUM_ARGS, require_browser, running_lab

    chromium = require_browser()
    with running_lab(tmp_path) as (url, home), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url + path)
        expect(page.get_by_text("Launcher", exact=True)).to_be_visible(timeout=30_000)
        if path == "/jobs":  # a job to list (it fails at once: its data does not exist)
            queue_a_job(home)
            page.reload()
            expect(page.get_by_text("doomed").first).to_be_visible(timeout=30_000)
        (home / "lab.db").unlink()
        expect(page.get_by_text(PROBLEM_TITLE)).to_be_visible(timeout=30_000)
        expect(page.get_by_text(GONE)).to_be_visible()
        assert page.get_by_text("Traceback").count() == 0
        browser.close()


def queue_a_job(home) -> None:
    script = (
        "from sae_core.config import TrainConfig; from sae_core.jobs import store; "
        "from sae_core.jobs.placement import Submission; "
        "store.submit_job(TrainConfig(activation_source='nowhere.npy', d_sae=8, k=4, total_steps=1), "
        "Submission(None, 1, name='doomed'))"
    )
    subprocess.run([sys.executable, "-c", script], env=subprocess_env(SAE_LAB_HOME=str(home)), check=True, timeout=60)
