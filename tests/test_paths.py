"""Files SAE Lab creates are private to the user under any umask (SAE_LAB_SHARED_GROUP shares them)."""

from __future__ import annotations

import grp
import json
import os
import stat
import subprocess
import sys

import pytest

from tests.conftest import subprocess_env, tiny_config


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def run_with_umask_0(args, env) -> subprocess.CompletedProcess:
    code = "import os, runpy, sys; os.umask(0); sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_lab_and_a_run_are_private_whatever_the_umask(tmp_path, toy_path):
    home = tmp_path / "lab"
    env = subprocess_env(SAE_LAB_HOME=str(home), SAE_LAB_DATA_ROOTS=str(toy_path.parent))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(tiny_config(toy_path, total_steps=2, log_every=1, checkpoint_every=2)))
    submitted = run_with_umask_0(["sae_core", "submit", "--config", str(cfg), "--cpu-procs", "1", "--no-daemon"], env)
    assert submitted.returncode == 0, submitted.stderr
    assert mode(home) == 0o700 and mode(home / "lab.db") == 0o600 and mode(home / "jobs") == 0o700
    trained = run_with_umask_0(["sae_core.train", "--config", str(cfg), "--out", str(home / "run")], env)
    assert trained.returncode == 0, trained.stderr
    for path in (home / "run").rglob("*"):
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another group needs root (or membership)")
def test_a_shared_group_gets_the_home_and_everything_in_it(tmp_path):
    group = grp.getgrgid(65534).gr_name  # nogroup
    home = tmp_path / "lab"
    env = subprocess_env(SAE_LAB_HOME=str(home), SAE_LAB_SHARED_GROUP=group)
    done = run_with_umask_0(["sae_core", "jobs"], env)
    assert done.returncode == 0, done.stderr
    assert mode(home) == 0o2770 and home.stat().st_gid == 65534
    assert mode(home / "lab.db") == 0o660 and (home / "lab.db").stat().st_gid == 65534
