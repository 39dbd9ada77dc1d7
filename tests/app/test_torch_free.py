"""The app process renders its shell, Monitor, Jobs, SAEs and Explore without loading torch (~1 s and ~180 MiB a process).

Run in a fresh interpreter: this test process has long imported torch. The pages run through AppTest with
the fake NVML behind the real sampler, a queued job with metrics, and only the daemon boundary patched.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, subprocess_env
from tests.fakes import fake_pynvml as fake

SCRIPT = r"""
import json, sys, time
from streamlit.testing.v1 import AppTest
from sae_core import db
from sae_core.config import TrainConfig
from sae_core.gpu import history
from sae_core.jobs import daemon_control, metrics, store
from sae_core.jobs.placement import Submission

daemon_control.ensure_daemon = lambda home=None, **kw: True  # the boundary: no real daemon
daemon_control.daemon_status = lambda home=None, now=None: daemon_control.DaemonStatus(
    True, True, 1, time.time(), time.time(), "test", "x")
history.Sampler(db.get_engine()).tick()
job = store.submit_job(TrainConfig(activation_source="/x.safetensors", d_sae=64, total_steps=9), Submission("0", None))
metrics.write_metric_points(job.id, [metrics.metric_point_from_record(job.id, {"step": 1, "tokens": 9, "loss": 1.0})])
for page in ("views/monitor.py", "views/jobs.py", "views/saes.py", "views/explore.py"):
    at = AppTest.from_file(sys.argv[1], default_timeout=60)
    at.query_params["job"] = str(job.id)
    at.switch_page(page)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.title[0].value in ("Monitor", "Jobs", "Trained SAEs", "Explore latents")
print("LOADED " + json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))))
"""


@pytest.mark.slow
def test_shell_monitor_and_jobs_render_without_torch(tmp_path):
    scenario = fake.write_scenario(tmp_path / "gpus.json", n_gpus=2)
    env = subprocess_env(SAE_LAB_HOME=str(tmp_path / "lab"), **fake.env_for(scenario))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(REPO / "app.py")], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("LOADED "))[7:])
    assert loaded == [], f"the app process imported {loaded[:5]}"
