"""Shared fixtures: a fresh SAE_LAB_HOME per test, and small toy datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sae_core import db
from sae_core.architectures import architecture
from sae_core.config import TrainConfig
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


def own_options_only(values: dict) -> dict:
    """`values` without the options its architecture does not own (an architecture's options are an error on
    another's config), so that one set of values serves every architecture of the registry."""
    options = architecture(values.get("architecture", "topk")).options.model_fields
    return {k: v for k, v in values.items() if k in TrainConfig.model_fields or k in options}


def train_config(**values) -> TrainConfig:
    return TrainConfig(**own_options_only(values))


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
    """A TopK config that trains on the toy set in seconds on one CPU core (process-level tests); with another
    architecture in `overrides`, TopK's k is left out."""
    return own_options_only(
        {
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
    )


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSON-lines file (metrics.jsonl); [] when it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json(path: Path, value: dict) -> Path:
    path.write_text(json.dumps(value))
    return path


@pytest.fixture(scope="session")
def kept_transcoder(hf, tmp_path_factory) -> dict[str, Path]:
    """A TopK transcoder of the tiny GPT-2's first MLP block trained straight from the model, its stream kept
    (cache_to: `<cache>/<mlp>.input` its input, `<cache>/<mlp>` its output)."""
    from sae_core.train import main as train_main
    from tests.model.test_stream import streamed

    base = tmp_path_factory.mktemp("transcoder")
    sae, cache, mlp = base / "sae", base / "cache", "transformer.h.0.mlp"
    config = streamed(hf, hook=mlp, transcoder=True, total_steps=16, cache_to=str(cache))
    assert train_main(["--config", str(write_json(base / "train.json", config)), "--out", str(sae)]) == 0
    return {"sae": sae, "cache": cache, "base": base}


# --------------------------------------------------------------------------- model evaluation (issue 14)


@pytest.fixture(scope="session")
def lm(hf, tmp_path_factory) -> Path:
    """The tiny GPT-2, trained a little on text with structure (tests/hf_models.py)."""
    from tests.hf_models import train_briefly

    return train_briefly(hf["gpt2"], tmp_path_factory.mktemp("lm") / "gpt2")


@pytest.fixture(scope="session")
def text(tmp_path_factory) -> Path:
    """Documents that walk a word list in order (what `lm` was trained on), one per line."""
    from tests.hf_models import sequence_corpus, write_corpus

    return write_corpus(tmp_path_factory.mktemp("text") / "sequences.txt", documents=sequence_corpus(300, seed=1))


@pytest.fixture(scope="session")
def trained(lm, text, tmp_path_factory) -> dict[str, Path]:
    """An extraction from the tiny GPT-2 and a TopK SAE trained briefly on it (holding out 320 rows)."""
    from sae_core.engine.run import main as train_main
    from sae_core.model.run import main as extract_main
    from tests.hf_models import HOOKS

    base = tmp_path_factory.mktemp("evaluate")
    acts, sae = base / "acts", base / "sae"
    extract_cfg = {"model": str(lm), "hook": HOOKS["gpt2"], "dataset": str(text), "n_tokens": 2000,
                   "context_size": 32, "batch_size": 8, "shard_rows": 500, "storage_dtype": "float32", "device": "cpu"}  # fmt: skip
    assert extract_main(["--config", str(write_json(base / "extract.json", extract_cfg)), "--out", str(acts)]) == 0
    train_cfg = {"activation_source": str(acts), "architecture": "topk", "d_sae": 64, "k": 8, "batch_size": 256,
                 "total_steps": 40, "holdout_tokens": 320, "log_every": 20, "device": "cpu"}  # fmt: skip
    assert train_main(["--config", str(write_json(base / "train.json", train_cfg)), "--out", str(sae)]) == 0
    return {"acts": acts, "sae": sae, "base": base}
