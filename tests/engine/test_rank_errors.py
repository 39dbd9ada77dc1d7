"""A config or data error found at start reaches the output and the failure's root cause on every run,
whichever of the two ranks torchrun stops first (a rank used to die before it had printed the reason)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sae_core.jobs.diagnosis import root_cause
from tests.conftest import subprocess_env, tiny_config

pytestmark = pytest.mark.slow
RUNS = 10


def nan_set(tmp_path: Path) -> Path:
    rows = np.random.default_rng(0).standard_normal((4096, 8)).astype(np.float32)
    rows[4000, 3] = np.nan
    np.save(tmp_path / "nan.npy", rows)
    return tmp_path / "nan.npy"


CASES = {
    "a batch that does not split over 2 ranks": (
        lambda tmp, toy: tiny_config(toy, batch_size=511),
        "batch_size 511 does not divide evenly across 2 ranks",
    ),
    "a NaN in the data": (
        lambda tmp, toy: tiny_config(nan_set(tmp), batch_size=256, holdout_tokens=256),
        "column 3 holds NaN",
    ),
}


def torchrun(cfg_path: Path, logs: Path, out: Path) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--max-restarts", "0",
        "--log-dir", str(logs / "torchrun"), "--tee", "3",
        "-m", "sae_core.train", "--config", str(cfg_path), "--out", str(out),
    ]  # fmt: skip
    return subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("case", list(CASES))
def test_the_reason_survives_every_rank_race(tmp_path, toy_path, case):
    make_config, reason = CASES[case]
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(make_config(tmp_path, toy_path)))
    missing = []
    for pair in range(RUNS // 2):  # two at a time: more ways for the ranks to race
        runs = [(n, torchrun(cfg_path, tmp_path / f"logs{n}", tmp_path / f"out{n}")) for n in (2 * pair, 2 * pair + 1)]
        for n, proc in runs:
            output, _ = proc.communicate(timeout=120)
            cause = root_cause(tmp_path / f"logs{n}", proc.returncode)
            if proc.returncode == 0 or reason not in output or reason not in cause:
                missing.append((n, proc.returncode, cause, output[-1500:]))
    assert missing == [], missing[0]
