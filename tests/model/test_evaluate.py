"""The model evaluation of an SAE on a real (tiny, randomly initialised) causal LM loaded from disk: the identity
SAE recovers everything, the zero SAE nothing, a trained one something in between, on held-out contexts only;
the figures are deterministic, 2 ranks give those of 1, and every bad input gets a named error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_core.data.activations import open_activations
from sae_core.engine.saelens import save as save_sae
from sae_core.engine.saes import make_sae
from sae_core.files import EVAL_FILE, MODEL_EVAL_FILE, REFUSED_FILE, SWEEP_FILE
from sae_core.model.evaluate import main as evaluate_main
from tests.conftest import subprocess_env, write_json
from tests.hf_models import HOOKS

HOOK = HOOKS["gpt2"]


def evaluate(tmp_path: Path, sae: Path, out: Path | None = None, **fields) -> tuple[int, Path]:
    out = out or tmp_path / f"eval_{len(list(tmp_path.glob('eval_*')))}"
    config = write_json(tmp_path / f"{out.name}.json", {"sae": str(sae), "device": "cpu", "batch_size": 4, **fields})
    return evaluate_main(["--config", str(config), "--out", str(out)]), out


def figures_of(out: Path) -> dict:
    return json.loads((out / MODEL_EVAL_FILE).read_text())


def saelens_folder(path: Path, W_enc: torch.Tensor, W_dec: torch.Tensor) -> Path:
    """A standard (ReLU) SAE written in SAELens's format, as one from another tool would arrive."""
    sae = make_sae("standard", W_enc.shape[0], W_enc.shape[1])
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    save_sae(sae, path)
    return path


def identity_sae(path: Path, d_in: int = 32) -> Path:
    """relu(x) - relu(-x) = x: a standard SAE with 2·d_in latents that reconstructs every input exactly."""
    eye = torch.eye(d_in)
    return saelens_folder(path, torch.cat([eye, -eye], dim=1), torch.cat([eye, -eye], dim=0))


def test_the_identity_sae_recovers_everything_and_the_zero_sae_nothing(tmp_path, lm, text):
    given = {"model": str(lm), "hook": HOOK, "dataset": str(text), "context_size": 32, "contexts": 12}
    code, out = evaluate(tmp_path, identity_sae(tmp_path / "identity"), **given)
    assert code == 0
    identity = figures_of(out)
    assert identity["ce_spliced"] == identity["ce_clean"] and identity["kl_spliced"] == pytest.approx(0, abs=1e-9)
    assert identity["ce_loss_score"] == 1.0 and identity["kl_div_score"] == pytest.approx(1.0)
    assert identity["explained_variance"] == pytest.approx(1.0)
    assert identity["ce_zero_ablation"] > identity["ce_clean"]  # replacing the block's output does matter
    assert identity["eval_contexts"] == 12 and identity["eval_tokens"] == 12 * 31
    zero = saelens_folder(tmp_path / "zero", torch.randn(32, 64), torch.zeros(64, 32))
    code, out = evaluate(tmp_path, zero, **given)
    assert code == 0
    nothing = figures_of(out)
    assert nothing["ce_spliced"] == pytest.approx(nothing["ce_zero_ablation"], rel=1e-12)
    assert nothing["ce_loss_score"] == pytest.approx(0.0, abs=1e-9)
    assert nothing["kl_div_score"] == pytest.approx(0.0, abs=1e-9)
    assert nothing["ce_clean"] == identity["ce_clean"]  # the same contexts
    # the SAE folder gets the figures too (a SAELens folder had no eval.json before)
    assert json.loads((zero / EVAL_FILE).read_text())["ce_loss_score"] == nothing["ce_loss_score"]


def test_a_trained_sae_scores_in_between_on_held_out_contexts_only(tmp_path, trained):
    code, out = evaluate(tmp_path, trained["sae"])
    assert code == 0
    figures = figures_of(out)
    assert 0 < figures["ce_loss_score"] < 1 and 0 < figures["kl_div_score"] < 1
    assert 0 < figures["ce_loss_score_mean_ablation"] < 1
    assert figures["ce_clean"] < figures["ce_spliced"] < figures["ce_zero_ablation"]
    assert 0 < figures["explained_variance"] < 1 and 0 < figures["eval_l0"] <= 8
    # The contexts evaluated are whole contexts of the training holdout: none of their rows was trained on.
    data = open_activations(trained["acts"])
    trained_rows = data.context_ids(0, data.n_rows - 320)
    ids = np.asarray(figures["eval_context_ids"])
    assert len(ids) == figures["eval_contexts"] >= 5 and not np.isin(ids, trained_rows).any()
    assert np.isin(ids, data.context_ids(data.n_rows - 320, data.n_rows)).all()
    # the SAE's eval.json keeps its training figures and gains the model's
    eval_json = json.loads((trained["sae"] / EVAL_FILE).read_text())
    assert eval_json["ce_loss_score"] == figures["ce_loss_score"] and "fvu" in eval_json
    assert eval_json["holdout_kind"] == "tail" and "eval_context_ids" not in eval_json
    # deterministic: the same figures again
    code, again = evaluate(tmp_path, trained["sae"])
    assert code == 0 and figures_of(again) == figures


def test_contexts_caps_the_held_out_contexts_used(tmp_path, trained):
    code, out = evaluate(tmp_path, trained["sae"], contexts=3)
    assert code == 0
    figures = figures_of(out)
    assert figures["eval_contexts"] == 3 and len(figures["eval_context_ids"]) == 3


def refused(tmp_path: Path, sae: Path, **fields) -> str:
    code, out = evaluate(tmp_path, sae, **fields)
    assert code == 2
    assert not (out / MODEL_EVAL_FILE).exists()
    return (out / REFUSED_FILE).read_text()


def test_bad_inputs_get_named_errors(tmp_path, hf, trained):
    foreign = identity_sae(tmp_path / "foreign")
    assert refused(tmp_path, foreign).startswith("model: the SAE's training data names no model")
    text = {"dataset": str(hf["corpus"]), "context_size": 32}
    assert refused(tmp_path, foreign, model=str(hf["gpt2"]), **text).startswith("hook:")
    narrow = identity_sae(tmp_path / "narrow", d_in=16)
    message = refused(tmp_path, narrow, model=str(hf["gpt2"]), hook=HOOK, **text)
    assert message.startswith(f"hook: {HOOK} outputs width 32 but the SAE's d_in is 16")
    message = refused(tmp_path, foreign, model=str(tmp_path / "no-model"), hook=HOOK, **text)
    assert message.startswith("model:") and "not found" in message
    message = refused(tmp_path, foreign, model=str(hf["bert"]), hook=HOOKS["bert"], **text)
    assert message.startswith("model: BertModel is not a causal language model")
    message = refused(tmp_path, foreign, model=str(hf["gpt2"]), hook="transformer.h.9", **text)
    assert message.startswith("hook: 'transformer.h.9' is not a module") and "transformer.h.0" in message
    assert refused(tmp_path, tmp_path / "nothing-here").startswith("sae: ")
    message = refused(tmp_path, foreign, model=str(hf["gpt2"]), hook=HOOK, dataset=str(tmp_path / "none.txt"))
    assert message.startswith("dataset:")
    # an SAE trained on activations of another model's hook: held-out contexts cannot serve another hook
    message = refused(tmp_path, trained["sae"], hook="transformer.h.1")
    assert message.startswith("dataset: the held-out contexts come from the model and hook")


@pytest.mark.slow
def test_two_ranks_give_the_figures_of_one(tmp_path, trained):
    config = write_json(tmp_path / "eval.json", {"sae": str(trained["sae"]), "device": "cpu", "batch_size": 2})
    figures = {}
    for nproc in (1, 2):
        out = tmp_path / f"ranks{nproc}"
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "sae_core.evaluate", "--config", str(config), "--out", str(out)]  # fmt: skip
        child = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert child.returncode == 0, child.stderr[-3000:]
        figures[nproc] = figures_of(out)
    one, two = figures[1], figures[2]
    assert one["eval_context_ids"] == two["eval_context_ids"] and one["eval_tokens"] == two["eval_tokens"]
    for name in ("ce_clean", "ce_spliced", "ce_zero_ablation", "ce_mean_ablation", "kl_spliced", "ce_loss_score"):
        assert two[name] == pytest.approx(one[name], rel=1e-6, abs=1e-9), name


# --------------------------------------------------------------------------- several SAEs in one pass


def sweep_folder(tmp_path: Path, trained, holdouts=(320, 320)) -> tuple[Path, list[Path]]:
    """A sweep's run folder as the training writes it: sweep.json, and a member folder per SAE (the trained
    TopK SAE and two more trained on the same activations, with `holdouts` held out)."""
    from sae_core.engine.run import main as train_main

    run = tmp_path / "sweep"
    members = [("k=8", {}), ("k=4", {"k": 4, "holdout_tokens": holdouts[0]}),
               ("d_sae=32", {"d_sae": 32, "holdout_tokens": holdouts[1]})]  # fmt: skip
    shutil.copytree(trained["sae"], run / "k=8")
    base = json.loads((trained["sae"] / "train_config.json").read_text())
    for name, overrides in members[1:]:
        config = write_json(tmp_path / f"{name}.json", {**base, **overrides, "total_steps": 20})
        assert train_main(["--config", str(config), "--out", str(run / name)]) == 0
    write_json(run / SWEEP_FILE, {"placement": "batch", "world_size": 1,
                                  "members": [{"name": n, "overrides": o} for n, o in members]})  # fmt: skip
    return run, [run / name for name, _ in members]


def test_several_saes_in_one_pass_get_exactly_the_figures_each_gets_alone(tmp_path, trained):
    run, folders = sweep_folder(tmp_path, trained)
    alone = []
    for folder in folders:
        code, out = evaluate(tmp_path, folder, contexts=6)
        assert code == 0
        alone.append(figures_of(out))
    code, out = evaluate(tmp_path, run, contexts=6)  # the sweep's folder: every completed member
    assert code == 0
    together = figures_of(out)
    assert [entry["sae"] for entry in together["saes"]] == [str(f) for f in folders]
    assert together["eval_contexts"] == 6 and together["eval_context_ids"] == alone[0]["eval_context_ids"]
    for folder, single, entry in zip(folders, alone, together["saes"], strict=True):
        merged = {**together, **entry}
        for name, value in single.items():
            assert merged[name] == value, (folder.name, name)  # exactly: the same sums in the same order
        eval_json = json.loads((folder / EVAL_FILE).read_text())
        assert {k: eval_json[k] for k in single if k != "eval_context_ids"} == {
            k: v for k, v in single.items() if k != "eval_context_ids"
        }
    assert len({entry["ce_spliced"] for entry in together["saes"]}) == 3  # three different SAEs
    # a hand-picked list (`saes`) is the same pass
    code, out = evaluate(tmp_path, folders[2], saes=[str(folders[0])], contexts=6)
    assert code == 0
    picked = figures_of(out)
    assert [e["ce_loss_score"] for e in picked["saes"]] == [alone[2]["ce_loss_score"], alone[0]["ce_loss_score"]]


def test_a_member_that_cannot_share_the_pass_is_named(tmp_path, trained):
    run, folders = sweep_folder(tmp_path, trained, holdouts=(320, 640))
    message = refused(tmp_path, run)
    assert message.startswith(f"sae: member d_sae=32 of {run} held out other contexts than member k=8 of {run}")
    (folders[1] / "sae_weights.safetensors").unlink()
    message = refused(tmp_path, folders[0], saes=[str(folders[1])])
    assert message.startswith(f"saes: {folders[1]}: sae: {folders[1]} holds no SAE")
    foreign = identity_sae(tmp_path / "foreign")
    message = refused(tmp_path, folders[0], saes=[str(foreign)])
    assert message.startswith(f"saes: {foreign}: model: the SAE's training data names no model")
    for folder in folders:
        (folder / EVAL_FILE).unlink()
    message = refused(tmp_path, run)
    assert message.startswith(f"sae: the sweep {run} has no completed member yet (3 listed in sweep.json)")
