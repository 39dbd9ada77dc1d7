"""The CLI with a training streamed from a model: `estimate` takes d_in from the hook's width (a sweep's widest)
and prints the stream's terms; `rows` counts what a text gives; `submit` refuses through the same gate."""

from __future__ import annotations

import json

from sae_core.cli import estimate as cli_estimate
from sae_core.cli import jobs as cli_jobs
from sae_core.cli.main import main as cli
from sae_core.config import TrainConfig
from sae_core.gpu import memory
from sae_core.jobs import models
from sae_core.jobs.stream_checks import stream_source
from sae_core.sweep import read_training_config

GiB = memory.GiB


def write(tmp_path, hf, **overrides):
    cfg = {"model": str(hf["llama"]), "hook": "model.layers.1", "dataset": str(hf["corpus"]), "context_size": 32,
           "k": 4, "d_sae": 64, "batch_size": 256, "total_steps": 10, "holdout_tokens": 256, **overrides}  # fmt: skip
    path = tmp_path / "stream.json"
    path.write_text(json.dumps(cfg))
    return path


def test_estimate_a_streamed_config_takes_the_hooks_width_and_prints_the_stream(lab_home, tmp_path, hf, capsys):
    path = write(tmp_path, hf, hook="model.layers.0.mlp.gate_proj")  # 64 wide
    assert cli_estimate.cli_estimate(["--config", str(path), "--gpus", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    cfg = TrainConfig.from_json_file(path)
    stream = stream_source(cfg, models.model_facts(cfg.model), [cfg.hook], on_gpu=True)
    assert data["d_in"] == 64 and data == memory.estimate(cfg, 1, 64, stream).to_dict()
    assert data["breakdown"]["mixing_window"] == 2 * 256 * 32 * 64 * 4
    assert cli_estimate.cli_estimate(["--config", str(path), "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "d_in 64" in out
    for term in ("model_weights", "model_forward_batch", "mixing_window"):
        assert memory.TERM_LABELS[term] in out


def test_estimate_a_sweep_over_hooks_counts_a_window_per_hook(lab_home, tmp_path, hf, capsys):
    path = write(tmp_path, hf, hook=None, sweep={"hook": ["model.layers.1", "model.layers.0.mlp.gate_proj"]})
    assert cli_estimate.cli_estimate(["--config", str(path), "--gpus", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["d_in"] == 64 and data["stream"]["mixing_window"] == 2 * 256 * 32 * (32 + 64) * 4
    sweep = read_training_config(path)
    stream = stream_source(sweep.shared, models.model_facts(str(hf["llama"])), ["model.layers.1",
                           "model.layers.0.mlp.gate_proj"], on_gpu=True)  # fmt: skip
    assert data["layouts"]["batch"]["total_bytes"] == memory.sweep_estimate(sweep, 1, 64, "batch", stream).total_bytes
    assert cli_estimate.cli_estimate(["--config", str(path), "--gpus", "1"]) == 0
    assert memory.TERM_LABELS["mixing_window"] in capsys.readouterr().out


def test_estimate_names_a_wrong_hook(lab_home, tmp_path, hf, capsys):
    path = write(tmp_path, hf, hook="model.layers.9")
    assert cli_estimate.cli_estimate(["--config", str(path), "--gpus", "1"]) == 2
    assert "hook: 'model.layers.9' is not a module of this model" in capsys.readouterr().err


def test_rows_counts_what_the_text_gives_and_submit_refuses_too_little(lab_home, tmp_path, hf, capsys):
    assert cli(["rows", str(hf["llama"]), str(hf["corpus"]), "--context-size", "32", "--needed", "1000000"]) == 0
    assert capsys.readouterr().out == "4,389 rows in 148 contexts of 32\n"  # the whole corpus
    assert cli(["rows", str(hf["llama"]), str(hf["corpus"]), "--context-size", "32", "--needed", "100", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["rows"] >= 100 and not found["exhausted"]
    path = write(tmp_path, hf, total_steps=1000)
    assert cli_jobs.cli_submit(["--config", str(path), "--cpu-procs", "1", "--no-daemon"]) == 2
    assert "dataset: the run (batch_size 256 x total_steps 1,000" in capsys.readouterr().err
