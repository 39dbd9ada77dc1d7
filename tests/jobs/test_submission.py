"""The submission gate on a real lab.db, real activation files and the fake NVML: every problem at once,
the rule for GPUs other SAE Lab jobs hold, and resume through the same gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_core.config import TrainConfig
from sae_core.data import catalog
from sae_core.jobs import scheduler, store, submission
from sae_core.jobs.placement import Submission
from tests.fakes import fake_pynvml as fake
from tests.fakes.fixtures import fake_gpus  # noqa: F401  (fixture)

GiB = fake.GiB


@pytest.fixture
def cfg(toy_path) -> TrainConfig:
    return TrainConfig(activation_source=str(toy_path), d_sae=64, k=4, batch_size=256, total_steps=20)


def problems(verdict: submission.Verdict) -> list[tuple[str, str]]:
    return [(p.field, p.message) for p in verdict.problems]


def test_a_good_cpu_submission_has_no_problem_and_opens_the_dataset(lab_home, cfg):
    verdict = submission.check(cfg, Submission(None, 2))
    assert verdict.ok and verdict.gpus == [] and verdict.notes == []
    assert verdict.dataset is not None and verdict.dataset.d_in == 32


def test_every_problem_is_reported_at_once_naming_its_field(lab_home, cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_LAB_CPU_BUDGET", "2")
    missing = tmp_path / "nowhere" / "acts.safetensors"
    bad = cfg.model_copy(update={"activation_source": str(missing), "device": "cuda"})
    verdict = submission.check(bad, Submission(None, 3))
    fields = [field for field, _ in problems(verdict)]
    assert fields == ["cpu_procs", "device", "batch_size", "activation_source"]
    assert "batch_size 256 does not divide evenly across 3 ranks" in verdict.describe()
    assert f"activation source not found: {missing}" in verdict.describe()


@pytest.mark.parametrize(
    ("gpus", "cpu", "field", "words"),
    [
        ("0,0", None, "placement", "listed twice"),
        ("0", 2, "placement", "not both"),
        (None, None, "placement", "needs GPUs"),
    ],
)
def test_a_bad_placement_is_one_problem(lab_home, cfg, gpus, cpu, field, words):
    verdict = submission.check(cfg, Submission(gpus, cpu))
    ((got_field, message),) = problems(verdict)
    assert got_field == field and words in message


def test_a_gpu_held_by_another_sae_lab_job_queues_the_new_one_behind_it(lab_home, cfg, fake_gpus):  # noqa: F811
    fake_gpus.set(n_gpus=2)
    holder = store.submit_job(cfg, Submission("1", None, name="sweep"))
    verdict = submission.check(cfg, Submission("0,1", None))
    assert verdict.ok, verdict.describe()
    assert verdict.notes == [f"GPU 1: queued behind SAE Lab job {holder.id} 'sweep' (queued)"]
    job, _ = submission.submit(cfg, Submission("0,1", None, name="second"))
    assert job.gpu_list == [0, 1] and job.status == "queued"
    assert [j.id for j in scheduler.claim_runnable(cpu_budget=1)] == [holder.id]  # the queue orders them


def test_a_gpu_a_foreign_process_uses_is_refused_and_nothing_is_written(lab_home, cfg, fake_gpus):  # noqa: F811
    fake_gpus.set(n_gpus=2, overrides={1: {"processes": [fake.process(4242, 30 * GiB)]}})
    with pytest.raises(submission.SubmissionRejected) as refused:
        submission.submit(cfg, Submission("1", None))
    ((field, message),) = [(p.field, p.message) for p in refused.value.problems]
    assert field == "gpus" and message.startswith("GPU 1 is busy: used by pid 4242")
    assert store.list_jobs() == []


def test_the_memory_fit_uses_the_datasets_width(lab_home, cfg, fake_gpus):  # noqa: F811
    fake_gpus.set(n_gpus=1, memory_used=80 * GiB - 100 * 2**20)
    verdict = submission.check(cfg, Submission("0", None))
    ((field, message),) = problems(verdict)
    assert field == "gpus" and "free but the run needs about" in message


def test_values_are_scanned_whole_up_to_the_size_limit_and_sampled_beyond(lab_home, cfg, tmp_path, monkeypatch):
    import numpy as np

    from sae_core.data import checks

    acts = np.random.default_rng(0).standard_normal((2048, 8)).astype(np.float32)
    acts[1000, 3] = np.nan
    np.save(tmp_path / "nan.npy", acts)
    nan_cfg = cfg.model_copy(update={"activation_source": str(tmp_path / "nan.npy"), "holdout_tokens": 256})
    assert "row 1000, column 3 holds NaN" in submission.check(nan_cfg, Submission(None, 1)).describe()
    assert submission.check(nan_cfg, Submission(None, 1), scan_values=False).ok  # the page while a person types
    # A "huge" set: a sample is scanned up front (first and last rows included); training checks the rest.
    monkeypatch.setattr(checks, "FULL_SCAN_MAX_BYTES", 1000)
    monkeypatch.setattr(checks, "SAMPLE_SCAN_BYTES", 4096)
    monkeypatch.setattr(checks, "SAMPLE_PIECE_BYTES", 1024)  # 4 runs of 32 rows: 0-31, ..., 2016-2047
    assert submission.check(nan_cfg, Submission(None, 1)).ok
    acts[1000, 3], acts[-1, 0] = 0.0, np.inf
    np.save(tmp_path / "nan.npy", acts)
    assert "row 2047, column 0 holds Inf" in submission.check(nan_cfg, Submission(None, 1)).describe()


def test_resume_needs_a_failed_or_cancelled_job_with_a_complete_checkpoint(lab_home, cfg, fake_gpus):  # noqa: F811
    fake_gpus.set(n_gpus=2)
    j = store.submit_job(cfg, Submission("1", None, name="base", submitted_by="ada"))
    with pytest.raises(store.JobError, match="only failed or cancelled"):
        submission.resume(j.id)
    store.request_cancel(j.id)
    with pytest.raises(store.JobError, match="no complete checkpoint"):
        submission.resume(j.id)
    partial = lab_home / "jobs" / str(j.id) / "checkpoints" / "step_000000010"
    partial.mkdir(parents=True)  # no COMPLETE marker: a checkpoint cut short
    with pytest.raises(store.JobError, match="no complete checkpoint"):
        submission.resume(j.id)
    (partial / "COMPLETE").write_text("10")
    resumed, _ = submission.resume(j.id)
    assert resumed.resumed_from == j.id and resumed.status == "queued"
    assert resumed.gpu_list == [1] and resumed.name == "base (resumed)" and resumed.submitted_by == "ada"
    assert resumed.config_json == j.config_json
    # a resume that fails before its own first checkpoint is resumed from the checkpoint it started from
    store.finish_job(resumed.id, "failed", 1, "boom")
    again, _ = submission.resume(resumed.id)
    assert again.resumed_from == j.id and again.name == "base (resumed)"


def test_resume_passes_the_gate_a_gpu_taken_meanwhile_is_refused(lab_home, cfg, fake_gpus, tmp_path):  # noqa: F811
    fake_gpus.set(n_gpus=2)
    j = store.submit_job(cfg, Submission("1", None))
    store.request_cancel(j.id)
    done = lab_home / "jobs" / str(j.id) / "checkpoints" / "step_000000010"
    done.mkdir(parents=True)
    (done / "COMPLETE").write_text("10")
    fake_gpus.set(n_gpus=2, overrides={1: {"processes": [fake.process(4242, 30 * GiB)]}})
    with pytest.raises(submission.SubmissionRejected, match="GPU 1 is busy"):
        submission.resume(j.id)


# --------------------------------------------------------------------------- hardening (issue 11)


@pytest.mark.parametrize("source", ["/etc", "/etc/passwd", "/no/such/path.npy", "", "/proc/1/cwd"])
def test_outside_the_data_roots_every_path_gets_the_same_answer(lab_home, cfg, source):
    verdict = submission.check(cfg.model_copy(update={"activation_source": source or "."}), Submission(None, 1))
    ((field, message),) = problems(verdict)
    assert field == "activation_source"
    assert message == f"activation_source: {catalog.OUTSIDE_ROOTS}"  # nothing listed, nothing revealed


def test_a_link_inside_the_datasets_folder_pointing_outside_is_refused(lab_home, cfg, monkeypatch):
    monkeypatch.delenv(catalog.DATA_ROOTS_ENV)
    link = lab_home / "datasets" / "acts.safetensors"
    link.parent.mkdir()
    link.symlink_to(cfg.activation_source)  # the toy set lives outside the lab
    verdict = submission.check(cfg.model_copy(update={"activation_source": str(link)}), Submission(None, 1))
    assert [field for field, _ in problems(verdict)] == ["activation_source"]
    monkeypatch.setenv(catalog.DATA_ROOTS_ENV, str(Path(cfg.activation_source).parent))  # its folder allowed
    assert submission.check(cfg.model_copy(update={"activation_source": str(link)}), Submission(None, 1)).ok


def test_a_shard_linked_out_of_a_set_in_the_roots_is_refused_by_the_gate(lab_home, cfg, monkeypatch, tmp_path):
    from tests.data.test_manifest import write_folder

    monkeypatch.delenv(catalog.DATA_ROOTS_ENV)
    folder = lab_home / "datasets" / "set"
    folder.mkdir(parents=True)
    write_folder(folder, sizes=(4096, 4096), d_in=8)
    (folder / "shard_00001.safetensors").rename(tmp_path / "elsewhere.safetensors")  # outside every root
    (folder / "shard_00001.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    verdict = submission.check(cfg.model_copy(update={"activation_source": str(folder)}), Submission(None, 1))
    ((field, message),) = problems(verdict)
    assert field == "activation_source" and message.endswith(
        "a link to a file outside its folder; a set's shards must lie in it"
    )
    assert "elsewhere" not in message


@pytest.mark.parametrize(("name", "words"), [("x" * 201, "at most 200 characters"), ("a\nb", "no control characters")])
def test_job_and_user_names_are_short_single_lines(lab_home, cfg, name, words):
    verdict = submission.check(cfg, Submission(None, 1, name=name, submitted_by=name))
    assert [(field, words in message) for field, message in problems(verdict)] == [
        ("name", True),
        ("submitted_by", True),
    ]


def test_a_cpu_job_must_fit_the_hosts_ram(lab_home, cfg):
    huge = cfg.model_copy(update={"d_sae": 2**24, "k": 32, "batch_size": 4096})  # hundreds of GiB per rank
    ((field, message),) = problems(submission.check(huge, Submission(None, 1)))
    assert field == "cpu_procs" and "GiB of RAM for 1 process(es), but this machine has" in message
    assert submission.check(cfg, Submission(None, 2)).ok  # the toy run fits
