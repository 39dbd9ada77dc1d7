"""Where a model and a text may come from, and what loading a model may never do (issue 21).

A name is a hub name only when the local Hugging Face cache holds it; every other name is a path, relative
ones included, and must lie inside the lab's roots. Nothing asks the hub anything. A model that ships its
own code (`auto_map`) is refused by name, and no process the lab starts can be talked into running it, even
with `yes` on its stdin.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sae_core.config import EvaluateConfig, ExtractConfig
from sae_core.data import catalog
from sae_core.data.text import iter_pieces
from sae_core.jobs import models, submission
from sae_core.jobs.placement import Submission
from sae_core.model.loading import resolve_model
from tests.conftest import subprocess_env

LLAMA_HOOK = "model.layers.0"
PRIVATE_FIELDS = ("api_key", "salary_column")


def problems(verdict) -> list[tuple[str, str]]:
    return [(p.field, p.message) for p in verdict.problems]


@pytest.fixture
def children(monkeypatch) -> list[dict]:
    """The keyword arguments of every hooks child the gate starts (each still runs for real)."""
    started: list[dict] = []
    real = models.subprocess.run
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: started.append(k) or real(*a, **k))
    models._cache.clear()
    return started


@pytest.fixture
def lab(lab_home, hf, monkeypatch) -> ExtractConfig:
    """A lab whose roots are its own folders only (the pytest folders lie outside them now), holding the tiny
    Llama and the corpus; the extraction of one from the other."""
    monkeypatch.delenv(catalog.DATA_ROOTS_ENV)
    shutil.copytree(hf["llama"], lab_home / "models" / "llama")
    (lab_home / "datasets").mkdir()
    shutil.copy(hf["corpus"], lab_home / "datasets" / "corpus.txt")
    return ExtractConfig(
        model=str(lab_home / "models" / "llama"),
        hook=LLAMA_HOOK,
        dataset=str(lab_home / "datasets" / "corpus.txt"),
        n_tokens=2000,
        context_size=32,
    )


@pytest.fixture
def server_cwd(tmp_path, hf, monkeypatch) -> Path:
    """The process's working directory (the app's is the repository) holding what the issue read through it."""
    cwd = tmp_path / "cwd"
    shutil.copytree(hf["llama"], cwd / "model_outside")
    (cwd / "outside.txt").write_text("a document outside the roots\n")
    (cwd / "private.json").write_text(json.dumps([dict.fromkeys(PRIVATE_FIELDS, "secret")]))
    (cwd / "sae_lab.egg-info").mkdir()
    (cwd / "sae_lab.egg-info" / "SOURCES.txt").write_text("app.py\nsae_core/__init__.py\n")
    monkeypatch.chdir(cwd)
    return cwd


# --------------------------------------------------------------------------------- relative paths, hub names


@pytest.mark.parametrize(
    ("field", "name"),
    [
        ("model", "model_outside"),
        ("dataset", "outside.txt"),
        ("dataset", "private.json"),
        ("dataset", "sae_lab.egg-info/SOURCES.txt"),
        ("model", "sae_lab.egg-info"),
    ],
)
def test_a_relative_name_is_a_path_and_must_lie_in_the_roots(lab_home, lab, server_cwd, children, field, name):
    outside = {"model": catalog.OUTSIDE_MODEL_ROOTS, "dataset": catalog.OUTSIDE_ROOTS}[field]
    extraction = lab.model_copy(update={field: name, "text_field": "body"})
    assert problems(submission.check(extraction, Submission(None, 1))) == [(field, f"{field}: {outside}")]
    evaluation = EvaluateConfig(sae=str(lab_home / "jobs" / "1"), **{field: name}, text_field="body")
    assert problems(submission.check(evaluation, Submission(None, 1))) == [(field, f"{field}: {outside}")]
    assert children == []  # nothing of it was opened: no hooks child, no first document


def test_a_refusal_names_no_field_of_a_private_file(lab, server_cwd):
    for text_field in ("body", "text"):
        verdict = submission.check(
            lab.model_copy(update={"dataset": "private.json", "text_field": text_field}), Submission(None, 1)
        )
        assert not verdict.ok
        assert not any(word in verdict.describe() for word in PRIVATE_FIELDS), verdict.describe()


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every connection or name look-up of this process fails, and is recorded."""
    tried: list = []

    def refuse(*args, **_kwargs):
        tried.append(args)
        raise OSError("the network is not to be used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return tried


def cache_repo(hf_home: Path, kind: str, name: str, content: Path) -> Path:
    """Lay `content` out in a Hugging Face cache as the snapshot of hub repository `name` (`org/repo`)."""
    repo = hf_home / "hub" / f"{kind}s--{name.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    if content.is_dir():
        shutil.copytree(content, snapshot)
    else:
        (snapshot / "data").mkdir(parents=True)
        shutil.copy(content, snapshot / "data" / "train.txt")
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, hf, monkeypatch) -> dict[str, Path]:
    """HF_HOME pointing at a cache holding the tiny Llama as `tiny-org/llama` and the corpus as the dataset
    `tiny-org/texts`."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return {
        "model": cache_repo(home, "model", "tiny-org/llama", hf["llama"]),
        "dataset": cache_repo(home, "dataset", "tiny-org/texts", hf["corpus"]),
    }


def test_a_name_the_local_cache_holds_is_a_hub_name(
    lab_home, lab, hf_cache, hf, tmp_path, monkeypatch, children, no_network
):
    # a folder of the same name under the working directory (a GPT-2) is not what the name means
    shutil.copytree(hf["gpt2"], tmp_path / "cwd" / "tiny-org" / "llama")
    monkeypatch.chdir(tmp_path / "cwd")
    cfg = lab.model_copy(update={"model": "tiny-org/llama", "dataset": "tiny-org/texts"})
    verdict = submission.check(cfg, Submission(None, 1))
    assert verdict.ok, verdict.describe()
    assert verdict.model.cls == "LlamaForCausalLM" and verdict.model.model_dir == str(hf_cache["model"])
    assert resolve_model("tiny-org/llama") == hf_cache["model"]  # what the job loads
    first = next(iter_pieces("tiny-org/texts"))
    assert first.text == hf["corpus"].read_text().splitlines()[0]
    assert "tiny-org/llama" in catalog.list_models(lab_home)
    assert len(children) == 1 and children[0]["stdin"] == subprocess.DEVNULL
    assert children[0]["env"]["HF_HUB_OFFLINE"] == "1"  # the child reads the cache alone too
    assert no_network == []  # nor did this process ask the hub, reading the cached text


def test_a_name_the_cache_lacks_is_refused_without_asking_the_hub(lab, hf_cache, no_network, children):
    cfg = lab.model_copy(update={"model": "someone/unknown-model", "dataset": "someone/unknown-texts"})
    assert problems(submission.check(cfg, Submission(None, 1))) == [
        ("model", f"model: {catalog.OUTSIDE_MODEL_ROOTS}"),
        ("dataset", f"dataset: {catalog.OUTSIDE_ROOTS}"),
    ]
    assert no_network == [] and children == []


NO_NETWORK_HOOKS = r"""
import socket, sys
def refuse(*args, **kwargs):
    print("NETWORK", args, file=sys.stderr)
    raise OSError("no network")
socket.socket.connect = refuse
socket.getaddrinfo = refuse
from sae_core.cli.main import main
sys.exit(main(["hooks", sys.argv[1], "--json"]))
"""


@pytest.mark.slow
def test_the_hooks_command_answers_an_unknown_name_from_the_cache_alone(tmp_path, hf_cache):
    child = subprocess.run(
        [sys.executable, "-c", NO_NETWORK_HOOKS, "someone/unknown-model"],
        env=subprocess_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert child.returncode == 2 and "NETWORK" not in child.stderr, child.stderr
    assert "'someone/unknown-model' not found" in child.stderr and "never downloads" in child.stderr


# --------------------------------------------------------------------------------------------- remote code
EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("the model's own code ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evilnet"
"""


def remote_code_model(folder: Path, source: Path, marker: Path) -> Path:
    """A copy of the tiny Llama whose config asks for its own classes, from a file that leaves `marker`."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evilnet", architectures=["EvilModel"])
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    return folder


@pytest.fixture
def evil(lab_home, lab, hf, tmp_path) -> tuple[ExtractConfig, Path]:
    marker = tmp_path / "marker"
    model = remote_code_model(lab_home / "models" / "evil", hf["llama"], marker)
    return lab.model_copy(update={"model": str(model)}), marker


AUTO_MAP_REFUSAL = "model: its config.json has an auto_map"


def test_the_gate_refuses_a_model_with_auto_map_by_name_once_per_change(evil, children):
    cfg, marker = evil
    for _rerun in range(3):
        ((field, message),) = problems(submission.check(cfg, Submission(None, 1)))
        assert field == "model" and message.startswith(AUTO_MAP_REFUSAL) and "never runs a model's own code" in message
    assert len(children) == 1 and children[0]["stdin"] == subprocess.DEVNULL  # the refusal is remembered
    config = Path(cfg.model) / "config.json"
    os.utime(config, (config.stat().st_atime, config.stat().st_mtime + 5))  # the folder changed: read again
    assert not submission.check(cfg, Submission(None, 1)).ok and len(children) == 2
    assert not marker.exists()


def test_an_auto_map_in_the_tokenizer_config_is_refused_too(lab, children):
    tokenizer_config = Path(lab.model) / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    tokenizer_config.write_text(json.dumps({**settings, "auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    ((field, message),) = problems(submission.check(lab, Submission(None, 1)))
    assert field == "model" and message.startswith("model: its tokenizer_config.json has an auto_map")


def test_architectures_naming_something_else_than_a_model_class_is_refused_by_name(lab, children):
    config_file = Path(lab.model) / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "architectures": ["pipeline"]}))
    assert problems(submission.check(lab, Submission(None, 1))) == [
        ("model", "model: config.json's architectures names 'pipeline', which is not a transformers model class")
    ]


def run_with_yes(argv: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """`yes | argv`: a stdin that answers every question with y."""
    yes = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    try:
        child = subprocess.run(argv, stdin=yes.stdout, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    finally:
        yes.kill()
        yes.wait()
    return child


@pytest.mark.slow
def test_with_yes_on_stdin_no_command_runs_the_models_code(lab_home, evil, tmp_path):
    cfg, marker = evil
    config = tmp_path / "extract.json"
    config.write_text(cfg.to_json())
    env = subprocess_env(SAE_LAB_HOME=str(lab_home), HF_HOME=str(tmp_path / "hf_home"))
    env.pop(catalog.DATA_ROOTS_ENV, None)
    commands = {
        "hooks": [sys.executable, "-m", "sae_core", "hooks", cfg.model, "--json"],
        "extract": [sys.executable, "-m", "sae_core", "extract", "--config", str(config), "--cpu-procs", "1", "--no-daemon"],
        "job entry": [sys.executable, "-m", "sae_core.extract", "--config", str(config), "--out", str(tmp_path / "out")],
    }  # fmt: skip
    for what, argv in commands.items():
        child = run_with_yes(argv, env, tmp_path)
        output = child.stdout + child.stderr
        assert child.returncode != 0, (what, output[-2000:])
        assert AUTO_MAP_REFUSAL in output, (what, output[-2000:])
        assert "Do you wish to run the custom code" not in output, what
        assert not marker.exists(), f"{what} ran the model's code"
