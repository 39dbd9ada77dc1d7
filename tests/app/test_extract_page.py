"""The Extract page (AppTest) on a tiny real model in SAE_LAB_HOME/models: the hook picker, estimates, the
gate's problems, submitting an extraction with a training after it; the Train page offers the result."""

from __future__ import annotations

import json
import shutil

import pytest

from sae_core.config import ExtractConfig, TrainConfig
from sae_core.jobs import store
from sae_core.jobs.placement import Submission
from tests.app.conftest import rendered
from tests.app.test_app_pages import no_exception, texts
from tests.fakes import fake_pynvml as fake


@pytest.fixture
def lab_with_model(lab, hf):
    shutil.copytree(hf["llama"], lab.home / "models" / "tiny-llama")
    (lab.home / "datasets").mkdir(exist_ok=True)
    shutil.copy(hf["corpus"], lab.home / "datasets" / "corpus.txt")
    return lab


def open_extract(lab):
    at = lab.page("views/extract.py", user_name="ana")
    no_exception(at)
    return at


def errors(at) -> list[str]:
    return [rendered(str(e.value)) for e in at.error]


def test_the_hook_picker_lists_the_models_modules_with_the_middle_block_chosen(lab_with_model):
    lab_with_model.sample(fake.no_driver())
    at = open_extract(lab_with_model)
    assert at.selectbox(key="extract_model").value.endswith("tiny-llama")
    hook = at.selectbox(key="extract_hook")
    assert "model.layers.0 · width 32" in hook.options and "model.layers.0.mlp.up_proj · width 64" in hook.options
    assert hook.value == "model.layers.1"  # of blocks 0 and 1, the middle one
    assert "LlamaForCausalLM" in texts(at)
    assert any(m.label == "Estimated memory per rank" for m in at.metric)
    assert any(m.label == "Disk needed" for m in at.metric)


def test_submitting_queues_an_extraction_and_the_training_that_waits_for_it(lab_with_model):
    lab_with_model.sample(fake.no_driver())
    at = open_extract(lab_with_model)
    at.number_input(key="extract_tokens").set_value(2000)
    at.number_input(key="extract_cpu_procs").set_value(1)
    at.checkbox(key="extract_then_train").check().run()
    at.number_input(key="extract_expansion").set_value(2.0)
    at.number_input(key="extract_train_batch").set_value(256)
    at.number_input(key="extract_k").set_value(4)
    at.text_input(key="extract_name").input("tiny-l1").run()
    no_exception(at)
    assert errors(at) == []
    assert "d_sae = 2 × 32 = 64 · 200 rows held out for evaluation" in texts(at)
    at.button(key="extract_submit").click().run()
    no_exception(at)
    training, extraction = store.list_jobs()
    assert (extraction.kind, extraction.name, extraction.cpu_procs) == ("extract", "tiny-l1", 1)
    cfg = json.loads(extraction.config_json)
    assert cfg["hook"] == "model.layers.1" and cfg["n_tokens"] == 2000 and cfg["device"] == "cpu"
    assert training.depends_on == extraction.id
    assert json.loads(training.config_json)["activation_source"] == extraction.out_dir
    assert f"Extraction job {extraction.id} queued, then training job {training.id}." in texts(at)


def test_a_bad_model_path_and_a_missing_text_field_are_named(lab_with_model, tmp_path):
    lab_with_model.sample(fake.no_driver())
    at = open_extract(lab_with_model)
    at.selectbox(key="extract_model").set_value("Other…").run()
    at.text_input(key="extract_model_typed").input(str(lab_with_model.home / "models" / "nope")).run()
    no_exception(at)
    assert any("model:" in e and "not found" in e for e in errors(at))
    at.selectbox(key="extract_model").set_value(str(lab_with_model.home / "models" / "tiny-llama")).run()
    records = lab_with_model.home / "datasets" / "records.jsonl"
    records.write_text(json.dumps({"body": "hello world"}) + "\n")
    at = open_extract(lab_with_model)
    at.selectbox(key="extract_dataset").set_value(str(records)).run()
    assert any("text_field:" in e and "has no field 'text'" in e for e in errors(at))
    assert at.button(key="extract_submit").disabled
    at.text_input(key="extract_field").input("body").run()
    assert errors(at) == []


def test_the_train_page_offers_the_labs_extractions_with_their_provenance(lab_with_model, hf, tmp_path):
    from sae_core.model.run import main as extract_main

    lab_with_model.sample(fake.no_driver())
    job = store.submit_job(ExtractConfig(model=str(hf["llama"]), hook="model.layers.0", dataset=str(hf["corpus"]), n_tokens=600), Submission(None, 1))  # fmt: skip
    config = tmp_path / "x.json"
    config.write_text(json.dumps({**json.loads(job.config_json), "context_size": 32, "storage_dtype": "float32"}))
    assert extract_main(["--config", str(config), "--out", job.out_dir]) == 0
    at = lab_with_model.page("views/train.py", user_name="ana")
    no_exception(at)
    label = f"job {job.id}: llama · model.layers.0 · 600 rows"
    assert label in at.selectbox(key="train_dataset").options
    at.selectbox(key="train_dataset").set_value(label).run()
    no_exception(at)
    assert "600 rows x 32 float32" in texts(at)


def test_an_extraction_job_shows_rows_disk_and_what_its_training_waits_for(lab_with_model, hf):
    import time

    from sae_core.db.tables import MetricPoint
    from sae_core.jobs import metrics

    lab_with_model.sample(fake.no_driver())
    cfg = ExtractConfig(model=str(hf["llama"]), hook="model.layers.0", dataset=str(hf["corpus"]), n_tokens=5000)
    extraction = store.submit_job(cfg, Submission(None, 1, name="l0"))
    training = store.submit_job(TrainConfig(activation_source=extraction.out_dir, d_sae=64, total_steps=10), Submission(None, 1, depends_on=extraction.id))  # fmt: skip
    points = [
        MetricPoint(
            job_id=extraction.id, step=rows, tokens=rows, tokens_per_s=1e4, disk_bytes=rows * 80.0, time=time.time()
        )
        for rows in (1000, 2000)
    ]
    metrics.write_metric_points(extraction.id, points)
    at = lab_with_model.page("views/jobs.py", user_name="ana")
    at.query_params["job"] = str(extraction.id)
    at.run()
    no_exception(at)
    assert at.dataframe[0].value["Kind"].tolist() == ["train", "extract"]
    assert any(m.label == "Rows" and m.value == "2,000 / 5,000" for m in at.metric)
    assert any(m.label == "Disk used" and m.value == "156.2 KiB" for m in at.metric)
    at.query_params["job"] = str(training.id)
    at.run()
    assert f"Waits for job {extraction.id} to complete." in texts(at)
