"""The app tests' view of a lab: a fresh SAE_LAB_HOME, the fake NVML behind the real sampler, and only the
launcher daemon's boundary patched (no real daemon is started by AppTests)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from sae_core import db, files
from sae_core.config import TrainConfig
from sae_core.data.toy import write_toy
from sae_core.gpu import history
from sae_core.jobs import daemon_control, scheduler, store
from sae_core.jobs.placement import Submission
from sae_core.ui.html import WORD_JOINER
from tests.conftest import REPO
from tests.fakes.fixtures import fake_gpus  # noqa: F401  (fixture)

APP = str(REPO / "app.py")


def rendered(markdown: str) -> str:
    """The text a markdown source shows: its backslash escapes (of ASCII punctuation) resolved, without the
    invisible word joiners that keep autolinks and emoji from forming (ui/html.py)."""
    return re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", markdown).replace(WORD_JOINER, "")


class Lab:
    """The test's view of the lab: GPUs (fake NVML → the real sampler → SQLite) and the patched daemon."""

    def __init__(self, home: Path, gpus, monkeypatch: pytest.MonkeyPatch):
        self.home = home
        self.gpus = gpus
        self.daemon_running = True
        self.ensure_calls = 0
        monkeypatch.setattr(daemon_control, "ensure_daemon", self._ensure)
        monkeypatch.setattr(daemon_control, "daemon_status", self._status)

    def _ensure(self, home=None, **_kw) -> bool:
        self.ensure_calls += 1
        return self.daemon_running

    def _status(self, home=None, now=None) -> daemon_control.DaemonStatus:
        t = time.time()
        if self.daemon_running:
            return daemon_control.DaemonStatus(True, True, 4242, t - 60, t, "launcher running (pid 4242)", "x.log")
        return daemon_control.DaemonStatus(False, False, None, None, None, "launcher not running", "x.log")

    @property
    def engine(self):
        return db.get_engine()

    def sample(self, scn: dict | None = None, **kwargs) -> None:
        """Set the GPUs and let the real sampler record one tick (what the daemon does every second)."""
        self.gpus.set(scn, **kwargs) if (scn is not None or kwargs) else None
        history.Sampler(self.engine).tick()

    def page(self, path: str | None = None, **session) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=30)
        for key, value in session.items():
            at.session_state[key] = value
        if path:
            at.switch_page(path)
        return at.run()

    def job(self, status: str = "queued", gpus: str | None = None, cpu: int | None = 2, **cfg_kw) -> int:
        source = self.home / "datasets" / "x.safetensors"
        if not source.exists():  # real data: a resume passes the submission gate, which opens it
            write_toy(source, tokens=16384, d_in=16, features=32, seed=0)
        cfg = TrainConfig(activation_source=str(source), d_sae=64, total_steps=200)
        cfg = cfg.model_copy(update=cfg_kw)
        job = store.submit_job(cfg, Submission(gpus, None if gpus else cpu, name=f"{status}-job", submitted_by="ana"))
        if status != "queued":
            scheduler.claim_runnable(cpu_budget=1000)
            store.mark_running(job.id, os.getpid(), time.time())
        if status in ("completed", "failed", "cancelled"):
            store.finish_job(job.id, status, exit_code=0 if status == "completed" else 1, error=None)
        return job.id

    def toy_dataset(self) -> Path:
        """The toy set the Train page offers, in SAE_LAB_HOME/datasets (16k tokens, d_in 16)."""
        path = self.home / files.DATASETS_DIR / files.TOY_FILE
        write_toy(path, tokens=16384, d_in=16, features=32, seed=0)
        return path


@pytest.fixture
def lab(lab_home, fake_gpus, monkeypatch) -> Lab:  # noqa: F811
    monkeypatch.delenv("SAE_LAB_PASSWORD", raising=False)
    return Lab(lab_home, fake_gpus, monkeypatch)
