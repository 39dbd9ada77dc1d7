"""Job kinds as rows: every fact about a kind in its JobKind row (jobs/kinds.py), nothing else asking a job's
kind by name, and an unknown kind refused instead of being run as a training."""

from __future__ import annotations

import re

import pytest

from sae_core.config import EvaluateConfig, ExtractConfig, InspectConfig, TrainConfig
from sae_core.db.tables import Job
from sae_core.jobs import kinds, store, submission
from sae_core.jobs.gate import Verdict
from sae_core.jobs.placement import Submission
from sae_core.sweep import sweep_from_dict
from tests.conftest import REPO

CONFIGS = {
    "train": TrainConfig(activation_source="acts.safetensors", d_sae=64, total_steps=10),
    "sweep": sweep_from_dict(
        {"activation_source": "acts.safetensors", "total_steps": 10, "sweep": {"d_sae": [64, 128]}}
    ),
    "extract": ExtractConfig(model="m", hook="model.layers.0", dataset="d.txt", n_tokens=100),
    "evaluate": EvaluateConfig(sae="sae"),
    "inspect": InspectConfig(sae="sae"),
}


def test_every_kind_has_a_config_the_table_knows():
    assert set(kinds.KINDS) == set(CONFIGS)
    for name, cfg in CONFIGS.items():
        assert kinds.kind_of(cfg).name == name


@pytest.mark.parametrize("name", list(kinds.KINDS))
def test_each_kinds_gate_check_comes_from_its_row_and_starts_with_the_shared_checks(name, lab_home):
    kind = kinds.KINDS[name]
    check = kind.check_function()
    verdict = check(CONFIGS[name], Submission("0", 2, name="x\ny"))  # both placements; a name of two lines
    assert isinstance(verdict, Verdict) and verdict.placement_failed
    assert [p.field for p in verdict.problems] == ["name", "placement"]
    # the front door takes the same row
    assert submission.check(CONFIGS[name], Submission("0", 2)).placement_failed


@pytest.mark.parametrize("name", list(kinds.KINDS))
def test_where_a_kind_writes_and_what_says_it_finished(name, tmp_path):
    kind = kinds.KINDS[name]
    job = Job(id=7, name="j", config_json="{}", status="failed", created_at=0.0, total_steps=1, kind=name,
              out_dir=str(tmp_path / "7"), resumed_from=3)  # fmt: skip
    expected = tmp_path / "3" if kind.resume == "shards" else tmp_path / "7"  # an extraction keeps its shards
    assert kind.writes_into(job) == expected and kind.finished_marker(job) == expected / kind.finished_file


def test_an_unknown_kind_is_refused_not_run_as_a_training(lab_home):
    with pytest.raises(ValueError, match="job kind 'stream' is not one of train, sweep, extract, evaluate, inspect"):
        kinds.job_kind("stream")
    with pytest.raises(ValueError, match="no job kind runs a Submission"):
        kinds.kind_of(Submission())  # type: ignore[arg-type]
    job = store.submit_job(CONFIGS["train"], Submission(None, 1))
    with store.db.write_session(store.engine_or_default(None)) as session:  # a row written by another version
        row = session.get(Job, job.id)
        row.kind = "stream"
        session.add(row)
    with pytest.raises(ValueError, match="job kind 'stream'"):
        store.job_config(store.require_job(job.id))


# Comparisons of a job's kind with a kind's name: what the table answers instead.
KIND_BY_NAME = re.compile(r"kind(\.name)?\s*(==|!=|in)\s*[\(\[{]?\s*\"(train|sweep|extract|evaluate|inspect)\"")


def test_no_code_outside_the_table_asks_a_jobs_kind_by_name():
    sources = [*(REPO / "sae_core").rglob("*.py"), *(REPO / "views").rglob("*.py"), REPO / "app.py"]
    found = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sources
        if path.name != "kinds.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if KIND_BY_NAME.search(line)
    ]
    assert found == []
