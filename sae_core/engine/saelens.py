"""SAELens's on-disk format: cfg.json + sae_weights.safetensors, written and read.

`save` writes an SAE as its saved architecture (BatchTopK and Matryoshka as JumpReLU) with any input scaling folded
into the weights (`normalize_activations: "none"`), so `sae_lens.SAE.load_from_disk` reads it and encodes
raw activations exactly like `load` does.

A transcoder is written in SAELens's transcoder format: architecture `transcoder`, `skip_transcoder`,
`jumprelu_transcoder` or `jumprelu_skip_transcoder` (a TopK one as `topk_transcoder`, a name of ours: SAELens
has no TopK transcoder), `d_out` beside `d_in`, `apply_b_dec_to_input: false` (b_dec is the output's), W_dec
[d_sae, d_out] and, with a skip term, W_skip [d_out, d_in]; the metadata names the module (`hook_name`, read at
its input, and `hook_name_out`, its output).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..architectures import SAVED_ARCHITECTURES, SAVED_TRANSCODERS
from ..files import CFG_FILE, WEIGHTS_FILE
from .saes import SparseAutoencoder, make_sae, sae_class

SAE_LENS_VERSION = "6.0.0"  # the SAELens on-disk format we write


def sae_lens_cfg(sae: SparseAutoencoder, dtype: str = "float32", extra_meta: dict | None = None) -> dict:
    cfg = {
        "architecture": sae.saved_architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": not sae.transcoder,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **({"d_out": sae.d_out} if sae.transcoder else {}),
        **sae.saved_config(),
    }
    meta = {"sae_lens_version": SAE_LENS_VERSION, "sae_lens_training_version": SAE_LENS_VERSION}
    # SAELens 6 reads `meta`; `metadata` is kept as well for readers that look for that name.
    cfg["meta"] = dict(meta)
    cfg["metadata"] = {
        **meta,
        "trained_with": "sae_lab",
        "trained_architecture": sae.architecture,
        **(extra_meta or {}),
    }
    if sae.transcoder and "hook_name" in cfg["metadata"]:  # the module it replaces: read at its input
        cfg["metadata"].setdefault("hook_name_out", cfg["metadata"]["hook_name"])
    return cfg


def save(sae: SparseAutoencoder, out_dir: str | Path, dtype: str = "float32", extra_meta: dict | None = None) -> None:
    """Write cfg.json and sae_weights.safetensors (weights folded for raw inputs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.to(getattr(torch, dtype)) for n, t in sae.export_tensors().items()}
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CFG_FILE).write_text(json.dumps(sae_lens_cfg(sae, dtype, extra_meta), indent=2))


def load(path: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read an SAE written by `save` (or any SAELens folder of an architecture in SAVED_ARCHITECTURES)."""
    path = Path(path)
    cfg = json.loads((path / CFG_FILE).read_text())
    tensors = load_file(str(path / WEIGHTS_FILE), device=str(device))
    arch = cfg["architecture"]
    if arch not in SAVED_ARCHITECTURES:
        raise ValueError(f"{path}: architecture {arch!r} is not one of {', '.join(SAVED_ARCHITECTURES)}")
    sae = from_saved_tensors(arch, int(cfg["d_in"]), int(cfg["d_sae"]), cfg, tensors, tensors["W_enc"].dtype, device)
    sae.eval()
    return sae


def from_saved_tensors(arch: str, d_in: int, d_sae: int, saved: dict, tensors, dtype, device) -> SparseAutoencoder:
    """An inference SAE of saved architecture `arch` from SAELens-named tensors (a file's, or
    `export_tensors()`) and its cfg.json fields `saved` (TopK's k); a threshold is kept exactly as given. A
    transcoder's output width is its decoder's."""
    engine, skip = SAVED_TRANSCODERS.get(arch, (arch, False))
    options = sae_class(engine).options_from_saved(saved)
    shape = (
        {"transcoder": True, "d_out": int(tensors["W_dec"].shape[1]), "skip": skip} if arch in SAVED_TRANSCODERS else {}
    )
    sae = make_sae(engine, d_in, d_sae, options, dtype=dtype, device=device, **shape)
    sae.load_saved_tensors(tensors)
    return sae


def exported_copy(sae: SparseAutoencoder, device) -> SparseAutoencoder:
    """The SAE exactly as it will be saved (input scale folded in, batchtopk → jumprelu), in fp32."""
    return from_saved_tensors(
        sae.saved_architecture, sae.d_in, sae.d_sae, sae.saved_config(), sae.export_tensors(), torch.float32, device
    )
