"""The submission gate for extractions, on real tiny models and text files: every problem named by its field,
where models and text may come from, the memory and disk estimates, extract-then-train, resume, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest

from sae_core.cli.main import main as cli
from sae_core.config import ExtractConfig, TrainConfig
from sae_core.data import catalog
from sae_core.jobs import extract_checks, models, store, submission
from sae_core.jobs.placement import Submission
from tests.fakes import fake_pynvml as fake
from tests.fakes.fixtures import fake_gpus  # noqa: F401  (fixture)

GiB = fake.GiB


@pytest.fixture
def cfg(hf) -> ExtractConfig:
    return ExtractConfig(
        model=str(hf["llama"]), hook="model.layers.0", dataset=str(hf["corpus"]), n_tokens=3000, context_size=32
    )


def problems(verdict) -> list[tuple[str, str]]:
    return [(p.field, p.message) for p in verdict.problems]


def test_a_good_extraction_has_no_problem_and_knows_its_width_memory_and_disk(lab_home, cfg):
    verdict = submission.check(cfg, Submission(None, 1))
    assert verdict.ok, verdict.describe()
    assert verdict.model.cls == "LlamaForCausalLM" and verdict.model.hooks[cfg.hook] == 32
    assert verdict.disk_bytes == 3000 * (32 * 2 + 16) + 3000 * 4  # bfloat16 rows, their indices, the contexts
    assert verdict.memory["weights"] == verdict.model.parameters * 4  # float32 on the CPU
    assert "cuda_context" not in verdict.memory


def test_every_problem_is_named_by_its_field(lab_home, cfg, hf, tmp_path):
    cases = [
        ({"hook": "model.layer.0"}, "hook", "close: model.layers.0"),
        ({"model": str(hf["corpus"].parent / "nowhere")}, "model", "not found"),
        ({"model": "someone/not-cached"}, "model", catalog.OUTSIDE_MODEL_ROOTS),  # not in the cache: a path
        ({"dataset": str(hf["corpus"].parent / "none.txt")}, "dataset", "not found"),
        ({"dataset": str(hf["corpus"]), "text_field": "body", "device": "cuda"}, "device", "cannot run as a CPU job"),
    ]
    for change, field, words in cases:
        found = problems(submission.check(cfg.model_copy(update=change), Submission(None, 1)))
        assert any(f == field and words in m for f, m in found), (change, found)
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"body": "hello"}) + "\n")
    found = problems(submission.check(cfg.model_copy(update={"dataset": str(records)}), Submission(None, 1)))
    assert found[0][0] == "text_field" and "has no field 'text'" in found[0][1]
    assert submission.check(
        cfg.model_copy(update={"dataset": str(records), "text_field": "body"}), Submission(None, 1)
    ).ok


def test_models_and_text_come_only_from_the_labs_roots(lab_home, cfg, monkeypatch):
    monkeypatch.delenv(catalog.DATA_ROOTS_ENV)  # the tiny models and the corpus lie outside the lab now
    assert problems(submission.check(cfg, Submission(None, 1))) == [
        ("model", f"model: {catalog.OUTSIDE_MODEL_ROOTS}"),
        ("dataset", f"dataset: {catalog.OUTSIDE_ROOTS}"),
    ]  # nothing opened, nothing revealed
    shutil.copytree(cfg.model, lab_home / "models" / "llama")
    moved = cfg.model_copy(update={"model": str(lab_home / "models" / "llama")})
    ((got, message),) = problems(submission.check(moved, Submission(None, 1)))
    assert got == "dataset" and message == f"dataset: {catalog.OUTSIDE_ROOTS}"
    (lab_home / "datasets").mkdir()
    shutil.copy(cfg.dataset, lab_home / "datasets" / "corpus.txt")
    assert submission.check(
        moved.model_copy(update={"dataset": str(lab_home / "datasets" / "corpus.txt")}), Submission(None, 1)
    ).ok


def test_gpu_memory_and_disk_are_compared_with_what_is_free(lab_home, cfg, fake_gpus, monkeypatch):  # noqa: F811
    fake_gpus.set(n_gpus=1, memory_used=80 * GiB - 256 * 2**20)  # 256 MiB free: less than a CUDA context
    ((field, message),) = problems(submission.check(cfg, Submission("0", None)))
    assert field == "gpus" and "free but the run needs about" in message
    fake_gpus.set(n_gpus=1)
    verdict = submission.check(cfg, Submission("0", None))
    assert verdict.ok and verdict.memory["cuda_context"] > 0
    monkeypatch.setattr(extract_checks.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**6, 10**6, 1000))
    ((field, message),) = problems(submission.check(cfg, Submission("0", None)))
    assert field == "n_tokens" and "1000 B free" in message


def test_extract_then_train_queues_both_the_training_waiting_on_the_extractions_folder(lab_home, cfg):
    train = TrainConfig(
        activation_source="(the extraction)", d_sae=64, k=4, batch_size=256, total_steps=10, holdout_tokens=256
    )
    extraction, training, _ = submission.submit_extract(cfg, Submission(None, 1, name="l0"), then_train=train)
    assert (extraction.kind, training.kind, training.depends_on) == ("extract", "train", extraction.id)
    assert store.job_config(training).activation_source == extraction.out_dir
    assert training.name == "l0 (train)"
    too_few = train.model_copy(update={"holdout_tokens": 2900})  # 3000 rows < 256 + 2900
    with pytest.raises(submission.SubmissionRejected, match="then train: the extraction writes 3,000 rows, fewer"):
        submission.submit_extract(cfg, Submission(None, 1), then_train=too_few)
    bad = train.model_copy(update={"batch_size": 255})
    with pytest.raises(submission.SubmissionRejected, match="then train: batch_size 255 does not divide"):
        submission.submit_extract(cfg, Submission(None, 2), then_train=bad)
    assert len(store.list_jobs()) == 2  # nothing more was queued


def test_a_failed_extraction_resumes_into_the_folder_holding_its_shards(lab_home, cfg):
    first = store.submit_job(cfg, Submission(None, 1, name="l0"))
    store.finish_job(first.id, "failed", exit_code=1, error="killed")
    again, _ = submission.resume(first.id)
    assert again.kind == "extract" and again.resumed_from == first.id and again.name == "l0 (resumed)"
    from sae_core.jobs.command import build_command

    argv, _ = build_command(again, lab_home)
    assert argv[argv.index("--out") + 1] == first.out_dir  # its shards are kept, the rest computed
    store.finish_job(again.id, "failed", exit_code=1, error="killed again")
    third, _ = submission.resume(again.id)
    assert third.resumed_from == first.id  # still the folder that holds the data


def test_model_facts_are_read_once_per_model_folder(lab_home, cfg, monkeypatch):
    models._cache.clear()
    calls = []
    real = models.subprocess.run
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert submission.check(cfg, Submission(None, 1)).ok
    assert submission.check(cfg.model_copy(update={"hook": "model.layers.1"}), Submission(None, 1)).ok
    assert len(calls) == 1


def test_the_extract_and_hooks_commands(lab_home, cfg, tmp_path, capsys):
    config = tmp_path / "extract.json"
    config.write_text(cfg.to_json())
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"d_sae": 64, "k": 4, "batch_size": 256, "total_steps": 10, "holdout_tokens": 256}))
    assert cli(["extract", "--config", str(config), "--cpu-procs", "1", "--then-train", str(train), "--no-daemon"]) == 0
    out = capsys.readouterr().out
    assert (
        "queued extraction job 1" in out and "queued training job 2 (job-1 (train)): starts when job 1 completes" in out
    )
    bad = tmp_path / "bad.json"
    bad.write_text(cfg.model_copy(update={"hook": "model.nope"}).to_json())
    assert cli(["extract", "--config", str(bad), "--cpu-procs", "1", "--no-daemon"]) == 2
    assert "hook: 'model.nope' is not a module" in capsys.readouterr().err
    assert cli(["hooks", cfg.model, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert (
        listed["class"] == "LlamaForCausalLM"
        and {"path": "model.layers.0", "module": "LlamaDecoderLayer", "width": 32} in listed["hooks"]
    )
    assert cli(["hooks", cfg.model]) == 0
    assert "model.layers.1" in capsys.readouterr().out
    assert cli(["hooks", str(tmp_path)]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err
