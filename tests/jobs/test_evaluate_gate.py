"""The submission gate for model evaluations, on a real tiny causal LM and an SAE trained on its activations:
what it opens, every problem named by its field, the memory estimate, the queued row, the CLI."""

from __future__ import annotations

import json

import pytest

from sae_core.cli.main import main as cli
from sae_core.config import EvaluateConfig, ExtractConfig, InspectConfig, TrainConfig
from sae_core.jobs import store, submission
from sae_core.jobs.placement import Submission
from tests.hf_models import HOOKS
from tests.model.test_evaluate import identity_sae


def problems(verdict) -> list[tuple[str, str]]:
    return [(p.field, p.message) for p in verdict.problems]


def test_a_good_evaluation_plans_the_held_out_contexts_and_its_memory(lab_home, trained):
    verdict = submission.check(EvaluateConfig(sae=str(trained["sae"]), contexts=4), Submission(None, 1))
    assert verdict.ok, verdict.describe()
    plan = verdict.evaluation
    assert plan.hook == HOOKS["gpt2"] and plan.d_in == 32 and plan.d_sae == 64 and len(plan.context_ids) == 4
    assert verdict.model.causal_lm and verdict.model.vocab_size > 0
    tokens = 8 * 32  # batch_size 8 contexts of the extraction's 32 tokens
    assert verdict.memory["log_probabilities"] == tokens * verdict.model.vocab_size * 4 * 3
    assert verdict.memory["weights"] == verdict.model.parameters * 4 and "cuda_context" not in verdict.memory


def test_every_problem_is_named_by_its_field(lab_home, trained, hf, lm, text, tmp_path):
    foreign = identity_sae(tmp_path / "foreign")
    narrow = identity_sae(tmp_path / "narrow", d_in=16)
    given = {"dataset": str(text), "hook": HOOKS["gpt2"]}
    cases = [
        ({"sae": str(foreign)}, "model", "names no model"),
        ({"sae": str(tmp_path / "nothing")}, "sae", "holds no SAE"),
        ({"sae": str(narrow), "model": str(lm), **given}, "hook", "outputs width 32 but the SAE's d_in is 16"),
        ({"sae": str(foreign), "model": str(hf["bert"]), **given, "hook": HOOKS["bert"]}, "model", "not a causal"),
        ({"sae": str(foreign), "model": str(lm), **given, "hook": "transformer.h.7"}, "hook", "is not a module"),
        ({"sae": str(trained["sae"]), "device": "cuda"}, "device", "cannot run as a CPU job"),
        ({"sae": str(trained["sae"]), "hook": "transformer.h.1"}, "dataset", "come from the model and hook"),
    ]
    for fields, field, words in cases:
        found = problems(submission.check(EvaluateConfig(**fields), Submission(None, 1)))
        assert [f for f, _ in found] == [field], (fields, found)
        assert words in found[0][1], (fields, found)


def test_an_sae_outside_the_labs_roots_is_refused_without_being_read(lab_home, trained, monkeypatch):
    monkeypatch.delenv("SAE_LAB_DATA_ROOTS")
    found = problems(submission.check(EvaluateConfig(sae=str(trained["sae"])), Submission(None, 1)))
    assert [f for f, _ in found] == ["sae"]


def test_submit_queues_an_evaluation_row_and_resume_queues_it_again(lab_home, trained):
    job, _ = submission.submit(EvaluateConfig(sae=str(trained["sae"]), contexts=3), Submission(None, 1, name="ev"))
    assert job.kind == "evaluate" and job.total_steps == 3 and job.cpu_procs == 1
    assert isinstance(store.job_config(job), EvaluateConfig)
    store.finish_job(job.id, "failed", 1, "boom")
    again, _ = submission.resume(job.id)
    assert (
        again.kind == "evaluate" and again.name == "ev (resumed)" and store.job_config(again) == store.job_config(job)
    )


def test_extract_then_train_then_evaluate_queues_three_waiting_jobs(lab_home, hf):
    cfg = ExtractConfig(model=str(hf["gpt2"]), hook="transformer.h.1", dataset=str(hf["corpus"]), n_tokens=3000,
                        context_size=32)  # fmt: skip
    train = TrainConfig(activation_source="(the extraction)", d_sae=64, k=4, batch_size=256, total_steps=5,
                        holdout_tokens=48)  # fmt: skip
    later = EvaluateConfig(sae="(the training)", contexts=4)
    with pytest.raises(submission.SubmissionRejected, match="then evaluate: needs a training"):
        submission.submit_extract(cfg, Submission(None, 1), then_evaluate=later)
    with pytest.raises(submission.SubmissionRejected, match="holds out 48 rows, not two whole contexts of 32"):
        submission.submit_extract(cfg, Submission(None, 1), then_train=train, then_evaluate=later)
    train = train.model_copy(update={"holdout_tokens": 256})
    extraction, training, verdict = submission.submit_extract(
        cfg, Submission(None, 1), then_train=train, then_evaluate=later
    )
    evaluation = verdict.then_evaluation
    assert evaluation.depends_on == training.id and training.depends_on == extraction.id
    assert store.job_config(evaluation).sae == training.out_dir


def test_the_cli_rejects_a_bad_evaluation_with_the_field_and_queues_a_good_one(lab_home, trained, tmp_path, capsys):
    assert cli(["evaluate", str(tmp_path / "nothing"), "--cpu-procs", "1", "--no-daemon"]) == 2
    assert "rejected: sae: " in capsys.readouterr().err
    assert cli(["evaluate", str(trained["sae"]), "--contexts", "0", "--cpu-procs", "1", "--no-daemon"]) == 2
    assert "contexts: " in capsys.readouterr().err
    code = cli(["evaluate", str(trained["sae"]), "--contexts", "2", "--cpu-procs", "1", "--no-daemon", "--json"])
    assert code == 0
    job = json.loads(capsys.readouterr().out)
    assert job["kind"] == "evaluate" and job["total_steps"] == 2


# --------------------------------------------------------------------------- inspections (issue 15)


def test_an_inspection_is_planned_with_its_memory_and_every_problem_named(lab_home, trained, tmp_path, monkeypatch):
    verdict = submission.check(InspectConfig(sae=str(trained["sae"]), tokens=500), Submission(None, 1))
    assert verdict.ok, verdict.describe()
    assert verdict.memory["chunk"] == 2048 * (32 + 64 * 4) * 4 and "cuda_context" not in verdict.memory
    foreign = identity_sae(tmp_path / "foreign")
    cases = [
        ({"sae": str(foreign)}, "activations", "not trained by SAE Lab"),
        ({"sae": str(foreign), "activations": str(tmp_path / "none")}, "activations", "not found"),
        ({"sae": str(tmp_path / "nothing")}, "sae", "holds no SAE"),
        ({"sae": str(trained["sae"]), "device": "cuda"}, "device", "cannot run as a CPU job"),
    ]
    for fields, field, words in cases:
        found = problems(submission.check(InspectConfig(**fields), Submission(None, 1)))
        assert [f for f, _ in found] == [field], (fields, found)
        assert words in found[0][1], (fields, found)
    monkeypatch.delenv("SAE_LAB_DATA_ROOTS")
    found = problems(submission.check(InspectConfig(sae=str(trained["sae"])), Submission(None, 1)))
    assert [f for f, _ in found] == ["sae"]


def test_the_cli_queues_an_inspection_and_resume_queues_it_again(lab_home, trained, capsys):
    assert cli(["inspect", str(trained["sae"]), "--tokens", "0", "--cpu-procs", "1", "--no-daemon"]) == 2
    assert "tokens: " in capsys.readouterr().err
    assert cli(["inspect", str(trained["sae"]), "--tokens", "700", "--cpu-procs", "1", "--no-daemon", "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["kind"] == "inspect" and job["total_steps"] == 700
    store.finish_job(job["id"], "cancelled", None, "cancelled on request")
    again, _ = submission.resume(job["id"])
    assert again.kind == "inspect" and store.job_config(again).tokens == 700


def test_several_saes_are_checked_each_and_their_weights_counted(lab_home, trained, tmp_path):
    import shutil

    from sae_core.gpu.model_memory import evaluation_bytes

    copy = tmp_path / "copy"
    shutil.copytree(trained["sae"], copy)
    one = submission.check(EvaluateConfig(sae=str(trained["sae"]), contexts=4), Submission(None, 1))
    two = submission.check(EvaluateConfig(sae=str(trained["sae"]), saes=[str(copy)], contexts=4), Submission(None, 1))
    assert two.ok, two.describe()
    assert two.evaluation.sae_dirs == (trained["sae"], copy) and two.evaluation.d_saes == (64, 64)
    weights = evaluation_bytes(0, "float32", 1, 1, 1, 1, 1, 32, 64)["sae"] - 64 * 4 * 2  # one SAE's, no latents
    assert two.memory["sae"] - one.memory["sae"] == weights  # the second SAE's weights, its latents not twice
    foreign = identity_sae(tmp_path / "foreign")
    cfg = EvaluateConfig(sae=str(trained["sae"]), saes=[str(copy), str(foreign)])
    ((field, message),) = problems(submission.check(cfg, Submission(None, 1)))
    assert field == "saes" and message.startswith(f"saes: {foreign}: model: the SAE's training data names no model")
    outside = EvaluateConfig(sae=str(trained["sae"]), saes=["/etc/somewhere"])
    assert [f for f, _ in problems(submission.check(outside, Submission(None, 1)))] == ["saes"]
