"""The submission gate for a training streamed from a model, on the real tiny models and corpus: the model, every
hook a member reads and the text checked as extraction checks them (each problem named by its field), whether
the text gives the rows the run reads, the width the memory fit takes from the hook, and a GPU too small."""

from __future__ import annotations

import shutil

import pytest

from sae_core.config import TrainConfig
from sae_core.data import catalog
from sae_core.gpu import memory
from sae_core.jobs import models, submission
from sae_core.jobs.placement import Submission
from sae_core.sweep import sweep_from_dict
from tests.fakes import fake_pynvml as fake
from tests.fakes.fixtures import fake_gpus  # noqa: F401  (fixture)

GiB = fake.GiB
CORPUS_ROWS = 4389  # the corpus through the llama's tokenizer in contexts of 32, special tokens left out


def streamed(hf, **changes) -> dict:
    return {
        "model": str(hf["llama"]),
        "hook": "model.layers.1",
        "dataset": str(hf["corpus"]),
        "context_size": 32,
        "d_sae": 64,
        "k": 4,
        "batch_size": 256,
        "total_steps": 10,
        "holdout_tokens": 256,
        **changes,
    }


@pytest.fixture
def cfg(hf) -> TrainConfig:
    return TrainConfig.from_dict(streamed(hf))


def problems(verdict) -> list[tuple[str, str]]:
    return [(p.field, p.message) for p in verdict.problems]


def test_a_good_streamed_training_has_no_problem_and_knows_its_model(lab_home, cfg):
    verdict = submission.check(cfg, Submission(None, 1))
    assert verdict.ok, verdict.describe()
    assert verdict.model.cls == "LlamaForCausalLM" and verdict.model.hooks[cfg.hook] == 32
    assert verdict.notes == []


def test_every_problem_is_named_by_its_field(lab_home, hf, tmp_path):
    cases = [
        ({"hook": "model.layer.1"}, "hook", "close: model.layers.1"),
        ({"model": str(hf["corpus"].parent / "nowhere")}, "model", "not found"),
        ({"model": "someone/not-cached"}, "model", catalog.OUTSIDE_MODEL_ROOTS),
        ({"dataset": str(hf["corpus"].parent / "none.txt")}, "dataset", "not found"),
        ({"total_steps": 20}, "dataset", "lower batch_size, total_steps or holdout_tokens"),
    ]
    for change, field, words in cases:
        found = problems(submission.check(TrainConfig.from_dict(streamed(hf, **change)), Submission(None, 1)))
        assert any(f == field and words in m for f, m in found), (change, found)


def test_the_text_must_give_every_row_the_run_reads(lab_home, hf):
    # 256 x 16 + 256 = 4352 rows: the corpus gives 4389
    assert submission.check(TrainConfig.from_dict(streamed(hf, total_steps=16)), Submission(None, 1)).ok
    ((field, message),) = problems(
        submission.check(TrainConfig.from_dict(streamed(hf, total_steps=17)), Submission(None, 1))
    )
    assert field == "dataset"
    assert message == (
        "dataset: the run (batch_size 256 x total_steps 17 + holdout_tokens 256) needs 4,608 rows, but the text "
        f"gives only {CORPUS_ROWS:,} rows in contexts of 32; lower batch_size, total_steps or holdout_tokens, or "
        "give more text"
    )
    # another context size is another count (the remembered one answers only its own query)
    assert not submission.check(
        TrainConfig.from_dict(streamed(hf, total_steps=17, context_size=64)), Submission(None, 1)
    ).ok


def test_the_page_while_typing_does_not_count_rows_and_a_slow_count_is_a_note(lab_home, hf, monkeypatch):
    many = TrainConfig.from_dict(streamed(hf, total_steps=1000))
    assert submission.check(many, Submission(None, 1), scan_values=False).ok

    def slow(*_args, **_kwargs):
        raise models.subprocess.TimeoutExpired("rows", models.ROWS_TIMEOUT_S)

    monkeypatch.setattr(models, "_run_child", slow)
    monkeypatch.setattr(models, "_rows_cache", {})
    verdict = submission.check(many, Submission(None, 1))
    assert verdict.ok and "the job counts them before it trains" in verdict.notes[0]


def test_models_and_text_come_only_from_the_labs_roots(lab_home, cfg, monkeypatch):
    monkeypatch.delenv(catalog.DATA_ROOTS_ENV)
    assert problems(submission.check(cfg, Submission(None, 1))) == [
        ("model", f"model: {catalog.OUTSIDE_MODEL_ROOTS}"),
        ("dataset", f"dataset: {catalog.OUTSIDE_ROOTS}"),
    ]
    shutil.copytree(cfg.model, lab_home / "models" / "llama")
    (lab_home / "datasets").mkdir()
    shutil.copy(cfg.dataset, lab_home / "datasets" / "corpus.txt")
    moved = cfg.model_copy(
        update={"model": str(lab_home / "models" / "llama"), "dataset": str(lab_home / "datasets" / "corpus.txt")}
    )
    assert submission.check(moved, Submission(None, 1)).ok


def test_a_sweep_checks_each_distinct_hook_and_fits_the_widest(lab_home, hf, fake_gpus):  # noqa: F811
    hooks = ["model.layers.1", "model.layers.0.mlp.gate_proj"]  # widths 32 and 64
    base = {k: v for k, v in streamed(hf).items() if k != "hook"}
    sweep = sweep_from_dict({**base, "sweep": {"hook": hooks, "d_sae": [64, 128]}})
    assert submission.check(sweep, Submission(None, 1)).ok
    wrong = sweep_from_dict({**base, "sweep": {"hook": [*hooks, "model.layers.7"]}})
    found = problems(submission.check(wrong, Submission(None, 1)))
    assert [f for f, _ in found] == ["hook"] and "'model.layers.7' is not a module" in found[0][1]
    fake_gpus.set(n_gpus=1)
    verdict = submission.check(sweep, Submission("0", None))
    assert verdict.ok, verdict.describe()
    facts = models.model_facts(base["model"])
    from sae_core.jobs.stream_checks import stream_source

    stream = stream_source(sweep.shared, facts, hooks, on_gpu=True)
    assert stream.hook_widths == (32, 64)
    need = memory.sweep_estimate(sweep, 1, 64, "batch", stream).total_bytes
    assert f"~{need / GiB:.1f} GiB per GPU" in verdict.notes[-1]


def test_a_gpu_too_small_for_the_model_and_the_window_is_refused_naming_the_figure(lab_home, hf, fake_gpus):  # noqa: F811
    big_window = TrainConfig.from_dict(streamed(hf, mixing_contexts=2**20, context_size=512, total_steps=1))
    facts = models.model_facts(big_window.model)
    from sae_core.jobs.stream_checks import stream_source

    stream = stream_source(big_window, facts, [big_window.hook], on_gpu=True)
    assert stream.terms()["mixing_window"] == 2 * 2**20 * 512 * 32 * 4  # 128 GiB
    need = memory.estimate(big_window, 1, 32, stream).total_bytes
    assert need > 128 * GiB > memory.estimate(big_window, 1, 32).total_bytes
    fake_gpus.set(n_gpus=1)
    found = problems(submission.check(big_window, Submission("0", None), scan_values=False))
    assert found == [
        (
            "gpus",
            f"GPU 0 has 80.0 GiB free but the run needs about {need / GiB:.1f} GiB per GPU (estimate for 1 GPU(s)); "
            "pick a GPU with more free memory, more GPUs, or a smaller batch",
        )
    ]


def test_where_the_stream_is_kept_and_the_evaluation_after_training_are_checked(lab_home, hf, tmp_path):
    outside = submission.check(TrainConfig.from_dict(streamed(hf, cache_to="/etc/kept")), Submission(None, 1))
    assert [p.field for p in outside.problems] == ["cache_to"] and "outside the data roots" in outside.problems[
        0
    ].message
    inside = submission.check(TrainConfig.from_dict(streamed(hf, cache_to=str(lab_home / "datasets" / "kept"))),
                              Submission(None, 1))  # fmt: skip
    assert inside.ok, inside.describe()
    bert = streamed(hf, model=str(hf["bert"]), hook="encoder.layer.0", evaluate_contexts=4)
    verdict = submission.check(TrainConfig.from_dict(bert), Submission(None, 1))
    assert ("evaluate_contexts", "evaluate_contexts: the model is not a causal language model (CE loss needs one); "
            "set it to 0") in problems(verdict)  # fmt: skip


def test_a_transcoders_window_counts_its_modules_input_as_well(lab_home, hf, fake_gpus):  # noqa: F811
    from sae_core.jobs.stream_checks import keys_of, stream_source

    mlp = "model.layers.1.mlp"
    facts = models.model_facts(str(hf["llama"]))
    single = TrainConfig.from_dict(streamed(hf, hook=mlp, transcoder=True))
    assert keys_of(single) == [f"in:{mlp}", f"out:{mlp}"]
    stream = stream_source(single, facts, [mlp], on_gpu=True)  # the keys from the config: input and output
    assert stream.hook_widths == (facts.hooks[mlp],) * 2
    plain = stream_source(TrainConfig.from_dict(streamed(hf, hook=mlp)), facts, [mlp], on_gpu=True)
    assert stream.terms()["mixing_window"] == 2 * plain.terms()["mixing_window"]
    mixed = sweep_from_dict({**streamed(hf, hook=mlp), "sweep": {"transcoder": [False, True]}})
    assert keys_of(mixed) == [f"out:{mlp}", f"in:{mlp}"]  # the shared config is no transcoder: the members say
    fake_gpus.set(n_gpus=1)
    verdict = submission.check(mixed, Submission("0", None))
    assert verdict.ok, verdict.describe()
    keyed = stream_source(mixed.shared, facts, [mlp], on_gpu=True, keys=keys_of(mixed))
    need = memory.sweep_estimate(mixed, 1, 32, "batch", keyed).total_bytes
    assert f"~{need / GiB:.1f} GiB per GPU" in verdict.notes[-1]
    assert need > memory.sweep_estimate(mixed, 1, 32, "batch", plain).total_bytes
