"""Shared fixtures: a fresh SAE_LAB_HOME per test, and small toy datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae_core import db
from sae_core.data.catalog import DATA_ROOTS_ENV
from sae_core.data.toy import write_toy

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def lab_home(tmp_path, tmp_path_factory, monkeypatch) -> Path:
    """A fresh, empty SAE_LAB_HOME whose allowed data roots hold this session's temporary folders (where
    the toy sets are written); engines of earlier tests are forgotten."""
    home = tmp_path / "lab"
    home.mkdir()
    monkeypatch.setenv("SAE_LAB_HOME", str(home))
    monkeypatch.setenv(DATA_ROOTS_ENV, str(tmp_path_factory.getbasetemp()))
    db.dispose_engines()
    yield home
    db.dispose_engines()


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child processes (sae_core is installed in the venv): one thread per process on
    2-core machines."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def racing_scripts(script: str, argvs: list[list[str]], env: dict[str, str], timeout: float = 120) -> list:
    """Run `python -c script *argv` for every argv at once; the JSON lists they print, concatenated."""
    procs = [
        subprocess.Popen([sys.executable, "-c", script, *argv], env=env, stdout=subprocess.PIPE, text=True)
        for argv in argvs
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0
        results += json.loads(out)
    return results


@pytest.fixture(scope="session")
def toy_path(tmp_path_factory) -> Path:
    """A small toy set: 16k tokens, d_in 32, 64 ground-truth features."""
    path = tmp_path_factory.mktemp("toy") / "toy.safetensors"
    write_toy(path, tokens=16384, d_in=32, features=64, seed=0)
    return path


@pytest.fixture(scope="session")
def hf(tmp_path_factory) -> dict[str, Path]:
    """Tiny GPT-2, Llama and BERT models (tests/hf_models.py) and a 200-document corpus (.txt), saved once
    per session under the pytest base folder (inside the data roots the lab_home fixture names)."""
    from tests.hf_models import HOOKS, save_tiny_model, write_corpus

    base = tmp_path_factory.mktemp("hf")
    paths = {family: save_tiny_model(family, base / family) for family in HOOKS}
    paths["corpus"] = write_corpus(base / "corpus.txt")
    return paths


def tiny_config(toy_path: Path, **overrides) -> dict:
    """A TopK config that trains on the toy set in seconds on one CPU core (process-level tests)."""
    return {
        "activation_source": str(toy_path),
        "architecture": "topk",
        "d_sae": 64,
        "k": 4,
        "batch_size": 256,
        "total_steps": 30,
        "log_every": 10,
        "checkpoint_every": 10,
        "holdout_tokens": 1024,
        "device": "cpu",
        "b_dec_init": "mean",
        **overrides,
    }


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSON-lines file (metrics.jsonl); [] when it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
