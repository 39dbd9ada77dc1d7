"""Transcoders (issue 24 §5) with the tiny GPT-2 of the tests: a member reads an MLP block's input and predicts its
output. The streamed rows are the module's own input and output; a streamed transcoder (topk, batchtopk,
standard; with a skip term) trains below FVU 1 against its target, alone and inside a sweep (bit for bit its
single run); its SAELens transcoder folder loads back exactly; spliced in place of the module, a transcoder equal
to the module leaves the model's loss as it is and a trained one recovers part of it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sae_core import files
from sae_core.architectures import ARCHITECTURES
from sae_core.config import InspectConfig, TrainConfig
from sae_core.data.heldout import plan_inspection
from sae_core.data.stream_cache import cache_folder
from sae_core.engine.saelens import exported_copy
from sae_core.engine.schedule import init_from_data
from sae_core.jsonfile import ConfigError
from sae_core.latents import read_inspection
from sae_core.model.hooks import HookReader
from sae_core.model.inspect import main as inspect_main
from sae_core.model.loading import load_model, load_tokenizer, resolve_model
from sae_core.model.splice import Splicer, SpliceTotals, input_mean, splice_batch
from sae_core.model.stream import open_source
from sae_core.outputs import sweep_members
from sae_core.sae import load, make_sae, save
from sae_core.train import main
from tests.engine.test_train import finish, run_train, weights
from tests.model.test_stream import streamed, write

MLP = "transformer.h.0.mlp"


def transcoding(hf, **changes) -> dict:
    return streamed(hf, **{"hook": MLP, "transcoder": True, "total_steps": 16, **changes})


def module_io(model, hook: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's input and output on a plain forward of the whole model."""
    seen = {}
    handle = model.get_submodule(hook).register_forward_hook(
        lambda _m, inputs, output: seen.update(input=inputs[0], output=output)
    )
    with torch.no_grad():
        model(input_ids=tokens)
    handle.remove()
    return seen["input"], seen["output"]


def test_streamed_transcoder_rows_are_the_modules_input_and_output(hf):
    cfg = TrainConfig.from_dict(transcoding(hf))
    assert (cfg.input_key, cfg.target_key) == (f"in:{MLP}", f"out:{MLP}")
    source = open_source(cfg, cfg.stream_keys, torch.device("cpu"))
    contexts = source.plan.windows[0][:5]
    rows = source.rows(contexts)
    model = load_model(resolve_model(cfg.model), "auto", torch.device("cpu"))
    module_in, module_out = module_io(model, MLP, torch.from_numpy(source.tokens[contexts].astype(np.int64)))
    mask = torch.from_numpy(source.kept[contexts])
    assert torch.equal(rows[f"in:{MLP}"], module_in[mask])
    assert torch.equal(rows[f"out:{MLP}"], module_out[mask])


@pytest.mark.parametrize(
    ("architecture", "saved"),
    [("topk", "topk_transcoder"), ("batchtopk", "jumprelu_transcoder"), ("standard", "transcoder")],
)
def test_a_streamed_transcoder_trains_against_its_target_and_loads_back(tmp_path, hf, architecture, saved):
    changes = {"l1_coefficient": 1.0, "k": None} if architecture == "standard" else {}
    config = {k: v for k, v in transcoding(hf, architecture=architecture, **changes).items() if v is not None}
    out = tmp_path / "run"
    assert main(["--config", str(write(tmp_path, config, "cfg")), "--out", str(out)]) == 0
    figures = json.loads((out / files.EVAL_FILE).read_text())
    assert 0 < figures["fvu"] < 1, figures  # of the module's output, on the held-out contexts
    metrics = [json.loads(line) for line in (out / files.METRICS_FILE).read_text().splitlines()]
    assert metrics[-1]["fvu"] < 1
    cfg = json.loads((out / files.CFG_FILE).read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_out"], cfg["apply_b_dec_to_input"]) == (saved, 32, 32, False)
    assert (cfg["metadata"]["hook_name"], cfg["metadata"]["hook_name_out"]) == (MLP, MLP)
    sae = load(out)
    assert sae.transcoder and not sae.skip and sae.W_dec.shape == (64, 32)
    # What was saved predicts the module's output from its input as the evaluation measured it.
    source = open_source(TrainConfig.from_dict(config), [f"in:{MLP}", f"out:{MLP}"], torch.device("cpu"))
    held = source.rows(source.plan.holdout)
    n = figures["holdout_tokens"]  # the held-out contexts' last rows, as the evaluation reads them
    x, y = held[f"in:{MLP}"][-n:], held[f"out:{MLP}"][-n:]
    with torch.no_grad():
        fvu = (y - sae(x)).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert float(fvu) == pytest.approx(figures["fvu"], rel=1e-4)


def test_a_skip_transcoder_learns_its_skip_term_and_saves_it_in_saelens_shape(tmp_path, hf):
    out = tmp_path / "run"
    config = transcoding(hf, transcoder_skip=True)
    assert main(["--config", str(write(tmp_path, config, "cfg")), "--out", str(out)]) == 0
    cfg = json.loads((out / files.CFG_FILE).read_text())
    assert cfg["architecture"] == "topk_skip_transcoder"
    saved = weights(out)
    assert saved["W_skip"].shape == (32, 32) and saved["W_skip"].abs().sum() > 0  # [d_out, d_in], learned
    assert 0 < json.loads((out / files.EVAL_FILE).read_text())["fvu"] < 1
    sae = load(out)
    x = torch.randn(8, 32)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), sae.decode(sae.encode(x), x))
        torch.testing.assert_close(sae(x) - sae.decode(sae.encode(x), torch.zeros_like(x)), x @ saved["W_skip"].t())


def test_a_transcoder_inside_a_sweep_is_its_single_run_bit_for_bit(tmp_path, hf):
    base = {k: v for k, v in transcoding(hf).items() if k not in ("transcoder", "hook")}
    sweep = {**base, "hook": MLP, "sweep": {"transcoder": [False, True], "k": [2, 4]}}
    assert main(["--config", str(write(tmp_path, sweep, "sweep")), "--out", str(tmp_path / "sweep")]) == 0
    members = sweep_members(tmp_path / "sweep")
    assert [m.status for m in members] == ["completed"] * 4
    kinds = {m.name: json.loads((m.folder / files.CFG_FILE).read_text())["architecture"] for m in members}
    assert sorted(kinds.values()) == ["topk", "topk", "topk_transcoder", "topk_transcoder"]
    transcoder = next(m for m in members if m.overrides.get("transcoder"))
    out = tmp_path / "single"
    single = {**base, "hook": MLP, **transcoder.overrides}
    assert main(["--config", str(write(tmp_path, single, "single")), "--out", str(out)]) == 0
    for name, tensor in weights(out).items():
        assert torch.equal(weights(transcoder.folder)[name], tensor), name


def test_config_refuses_what_cannot_be_a_transcoder(hf):
    gated = {k: v for k, v in transcoding(hf, architecture="gated", l1_coefficient=1.0).items() if k != "k"}
    with pytest.raises(ConfigError, match="architecture gated cannot be trained as a transcoder"):
        TrainConfig.from_dict(gated)
    with pytest.raises(ConfigError, match="transcoder_skip: only for a transcoder"):
        TrainConfig.from_dict({**transcoding(hf), "transcoder": False, "transcoder_skip": True})
    with pytest.raises(ConfigError, match="transcoder: only for training from a model"):
        TrainConfig.from_dict({"activation_source": "x", "d_sae": 8, "k": 2, "total_steps": 4, "transcoder": True})


@torch.no_grad()
def test_export_folds_a_transcoders_centre_and_both_scales(tmp_path):
    torch.manual_seed(0)
    for arch, skip in (("topk", True), ("standard", False), ("jumprelu", True)):
        options = {"k": 4} if arch == "topk" else {}
        sae = make_sae(arch, 16, 48, ARCHITECTURES[arch].options(**options), transcoder=True, d_out=12, skip=skip)
        x, y = torch.randn(64, 16) * 5 + 1, torch.randn(64, 12) * 0.2
        init_from_data(sae, x, "mean", y)
        sae.b_enc.normal_(0, 0.1)
        if skip:
            sae.W_skip.normal_(0, 0.1)
        scaled = sae(x * sae.input_scale) / sae.target_scale  # the training module on scaled inputs, unscaled
        torch.testing.assert_close(exported_copy(sae, "cpu")(x), scaled, rtol=1e-4, atol=1e-5)
        save(sae, tmp_path / arch)
        loaded = load(tmp_path / arch)
        assert (loaded.d_in, loaded.d_out, loaded.skip) == (16, 12, skip)
        torch.testing.assert_close(loaded(x), scaled, rtol=1e-4, atol=1e-5)


def relu_mlp_transcoder(model) -> torch.nn.Module:
    """A standard transcoder equal to GPT-2's block-0 MLP once its GELU is a ReLU: c_fc is the encoder, c_proj
    the decoder (GPT-2's Conv1D weights are [in, out], SAELens's shapes)."""
    mlp = model.get_submodule(MLP)
    d_in, d_sae = mlp.c_fc.weight.shape
    sae = make_sae("standard", d_in, d_sae, transcoder=True, d_out=mlp.c_proj.weight.shape[1])
    with torch.no_grad():
        sae.load_saved_tensors(
            {"W_enc": mlp.c_fc.weight, "b_enc": mlp.c_fc.bias, "W_dec": mlp.c_proj.weight, "b_dec": mlp.c_proj.bias}
        )
    return sae.eval()


def splice_scores(model, saes, tokens: torch.Tensor) -> list[dict]:
    mask = torch.ones_like(tokens, dtype=torch.bool)
    reader = HookReader(model, MLP)
    mean = input_mean(reader, lambda: [(tokens, mask)], 32, torch.device("cpu"))
    reader.close()
    splicer = Splicer(model, MLP)
    totals = [SpliceTotals(sae.d_out, sae.d_sae, torch.device("cpu")) for sae in saes]
    splice_batch(splicer, saes, tokens, mask, mean, totals)
    splicer.close()
    return [sums.figures() for sums in totals]


def test_a_transcoder_equal_to_its_module_leaves_the_models_loss_as_it_is(hf):
    model = load_model(resolve_model(str(hf["gpt2"])), "auto", torch.device("cpu"))
    model.get_submodule(MLP).act = torch.nn.ReLU()  # the block's MLP is then exactly a ReLU transcoder
    source = open_source(TrainConfig.from_dict(transcoding(hf)), [f"in:{MLP}"], torch.device("cpu"))
    tokens = torch.from_numpy(source.tokens[source.plan.holdout][:8].astype(np.int64))
    (same,) = splice_scores(model, [relu_mlp_transcoder(model)], tokens)
    assert same["ce_spliced"] == pytest.approx(same["ce_clean"], abs=1e-5)
    assert same["kl_spliced"] == pytest.approx(0, abs=1e-6) and same["explained_variance"] == pytest.approx(1)


def test_a_trained_transcoder_spliced_in_recovers_part_of_the_loss(tmp_path, hf, lm, text):
    config = transcoding(hf, model=str(lm), dataset=str(text), total_steps=60, batch_size=64)
    out = tmp_path / "run"
    assert main(["--config", str(write(tmp_path, config, "cfg")), "--out", str(out)]) == 0
    source = open_source(TrainConfig.from_dict(config), [f"in:{MLP}"], torch.device("cpu"))
    tokens = torch.from_numpy(source.tokens[source.plan.holdout].astype(np.int64))
    model = load_model(resolve_model(str(lm)), "auto", torch.device("cpu"))
    (trained,) = splice_scores(model, [load(out)], tokens)
    assert trained["ce_zero_ablation"] > trained["ce_clean"] + 0.05, trained  # the module matters to the model
    assert 0 < trained["ce_loss_score"] < 1 and 0 < trained["explained_variance"] < 1, trained


@pytest.mark.slow
def test_two_ranks_train_a_transcoder_as_one(tmp_path, hf):
    config = write(tmp_path, transcoding(hf, transcoder_skip=True), "cfg")
    finish(run_train(config, tmp_path / "one"))
    finish(run_train(config, tmp_path / "two", nproc=2))
    for name, tensor in weights(tmp_path / "one").items():
        torch.testing.assert_close(weights(tmp_path / "two")[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_inspecting_a_streamed_transcoder_reads_its_modules_kept_input(tmp_path, kept_transcoder):
    sae_dir = kept_transcoder["sae"]
    plan = plan_inspection(InspectConfig(sae=str(sae_dir), tokens=400))
    assert plan.data.source == cache_folder(kept_transcoder["cache"], f"in:{MLP}") and plan.transcoder
    assert plan.hook == MLP and plan.data.manifest.provenance["hook_side"] == "in"
    config = write(tmp_path, {"sae": str(sae_dir), "tokens": 400, "top_k": 4, "chunk_rows": 150, "device": "cpu"}, "i")
    assert inspect_main(["--config", str(config), "--out", str(tmp_path / "job")]) == 0
    inspection = read_inspection(sae_dir)
    summary = inspection.summary
    assert summary["transcoder"] and summary["hook"] == MLP and summary["has_text"] and summary["has_logits"]
    assert summary["activations"] == str(plan.data.source) and summary["rows"] == 400
    # The top examples are the rows of the module's INPUT where each latent fires most.
    sae = load(sae_dir)
    rows = torch.from_numpy(plan.data.read(np.arange(plan.first_row, plan.data.n_rows)))
    with torch.no_grad():
        z = sae.encode(rows)
    tokens = plan.data.row_index("token_ids", plan.first_row, plan.data.n_rows)
    tokenizer = load_tokenizer(resolve_model(str(plan.model)))
    fired = 0
    for j in range(inspection.d_sae):
        view = inspection.latent(j)
        best = [v for v in z[:, j].topk(4).values.tolist() if v > 0]
        assert [e.value for e in view.top] == pytest.approx(best, rel=1e-5)
        for example in view.top:
            local = example.row - plan.first_row
            assert float(z[local, j]) == pytest.approx(example.value, rel=1e-5)
            assert example.tokens[example.peak] == tokenizer.decode([int(tokens[local])])
            fired += 1
    assert fired > 50


def test_inspecting_a_transcoder_refuses_its_modules_output_or_no_kept_stream(tmp_path, hf, kept_transcoder):
    output = cache_folder(kept_transcoder["cache"], f"out:{MLP}")
    with pytest.raises(ConfigError, match=r"holds the output of transformer\.h\.0\.mlp.*\.input folder"):
        plan_inspection(InspectConfig(sae=str(kept_transcoder["sae"]), activations=str(output)))
    given = cache_folder(kept_transcoder["cache"], f"in:{MLP}")
    assert plan_inspection(InspectConfig(sae=str(kept_transcoder["sae"]), activations=str(given))).transcoder
    bare = tmp_path / "bare"
    assert main(["--config", str(write(tmp_path, transcoding(hf, total_steps=2), "bare")), "--out", str(bare)]) == 0
    with pytest.raises(ConfigError, match=r"stream was not kept; give activations of the input of transformer\.h\.0"):
        plan_inspection(InspectConfig(sae=str(bare)))
