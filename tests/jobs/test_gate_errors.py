"""Every error the submission gate can raise reaches the person as one line naming the field (issue 21 §5): a
binary .jsonl text, an .npy whose header gives an impossible shape, a model whose reading crashes, and any
exception no check foresaw, whose traceback goes to the server log only."""

from __future__ import annotations

import io
import json
import logging
import shutil

import numpy as np
import pytest

from sae_core.cli.main import main as cli
from sae_core.config import ExtractConfig, TrainConfig
from sae_core.jobs import source_checks, submission
from sae_core.jobs.errors import UNEXPECTED
from sae_core.jobs.placement import Submission


@pytest.fixture
def extract_cfg(hf) -> ExtractConfig:
    return ExtractConfig(
        model=str(hf["llama"]), hook="model.layers.0", dataset=str(hf["corpus"]), n_tokens=3000, context_size=32
    )


def problems(verdict) -> list[tuple[str, str]]:
    return [(p.field, p.message) for p in verdict.problems]


def leaks_nothing(message: str) -> bool:
    """No traceback, no exception class, no path of the server's code."""
    return not any(word in message for word in ("Traceback", "Error:", "site-packages", "sae_core/", ".py"))


def npy_with_shape(path, shape: str):
    """An .npy file whose header says `shape` (written by hand: numpy would not write it)."""
    out = io.BytesIO()
    np.save(out, np.zeros((4, 3), np.float32))
    path.write_bytes(out.getvalue().replace(b"(4, 3), ", shape.encode() + b", ", 1))
    return path


def test_a_binary_jsonl_text_is_named_as_not_utf8(lab_home, extract_cfg):
    binary = lab_home / "datasets" / "binary.jsonl"
    binary.parent.mkdir()
    binary.write_bytes(bytes(range(128, 256)) * 8)
    found = problems(submission.check(extract_cfg.model_copy(update={"dataset": str(binary)}), Submission(None, 1)))
    assert found == [("dataset", f"dataset: {binary} is not UTF-8 text")]


@pytest.mark.parametrize("shape", ["(-4, 3)", "(99999999999999999999, 3)", "(-99999999999999999999, 3)", "(2**3, 3)"])
def test_an_npy_header_with_an_impossible_shape_is_named(lab_home, shape):
    (lab_home / "datasets").mkdir()
    path = npy_with_shape(lab_home / "datasets" / "acts.npy", shape)
    cfg = TrainConfig(activation_source=str(path), d_sae=64, total_steps=10)
    ((field, message),) = problems(submission.check(cfg, Submission(None, 1)))
    assert field == "activation_source" and "not a readable .npy array" in message and leaks_nothing(message)


def test_the_cli_refuses_it_in_one_line(lab_home, tmp_path, capsys):
    (lab_home / "datasets").mkdir()
    path = npy_with_shape(lab_home / "datasets" / "acts.npy", "(99999999999999999999, 3)")
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"activation_source": str(path), "d_sae": 64, "total_steps": 10}))
    assert cli(["submit", "--config", str(config), "--cpu-procs", "1", "--no-daemon"]) == 2
    err = capsys.readouterr().err
    assert "not a readable .npy array" in err and "Traceback" not in err


def test_a_model_whose_reading_crashes_is_one_line_and_its_traceback_is_logged(lab_home, extract_cfg, hf, caplog):
    model = lab_home / "models" / "odd"
    shutil.copytree(hf["gpt2"], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "n_embd": -5}))  # loads, then fails to build
    with caplog.at_level(logging.ERROR, logger="sae_core.gate"):
        found = problems(submission.check(extract_cfg.model_copy(update={"model": str(model)}), Submission(None, 1)))
    assert [field for field, _ in found] == ["model"]
    assert found[0][1] == f"model: {UNEXPECTED}"
    assert "Traceback" in caplog.text and "RuntimeError" in caplog.text  # the child's own report, for the operator


def test_an_exception_no_check_foresaw_is_one_line_naming_the_field(lab_home, extract_cfg, monkeypatch, caplog):
    def broken_reader(*_args, **_kwargs):
        raise RuntimeError("boom in /srv/private/reader.py")

    monkeypatch.setattr(source_checks, "iter_pieces", broken_reader)
    with caplog.at_level(logging.ERROR, logger="sae_core.gate"):
        found = problems(submission.check(extract_cfg, Submission(None, 1)))
    assert found == [("dataset", f"dataset: {UNEXPECTED}")]
    assert leaks_nothing(found[0][1])
    assert "boom in /srv/private/reader.py" in caplog.text and "Traceback" in caplog.text
