"""SAELens's on-disk format: cfg.json + sae_weights.safetensors, written and read.

`save` writes an SAE as its saved architecture (BatchTopK and Matryoshka as JumpReLU) with any input scaling folded
into the weights (`normalize_activations: "none"`), so `sae_lens.SAE.load_from_disk` reads it and encodes
raw activations exactly like `load` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..architectures import SAVED_ARCHITECTURES
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
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
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
    `export_tensors()`) and its cfg.json fields `saved` (TopK's k); a threshold is kept exactly as given."""
    options = sae_class(arch).options_from_saved(saved)
    sae = make_sae(arch, d_in, d_sae, options, dtype=dtype, device=device)
    sae.load_saved_tensors(tensors)
    return sae


def exported_copy(sae: SparseAutoencoder, device) -> SparseAutoencoder:
    """The SAE exactly as it will be saved (input scale folded in, batchtopk → jumprelu), in fp32."""
    return from_saved_tensors(
        sae.saved_architecture, sae.d_in, sae.d_sae, sae.saved_config(), sae.export_tensors(), torch.float32, device
    )
