"""Sentences and labels the pages show: the GPU summary, who uses a GPU, eval figures, load snippets."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..text import format_duration


def load_snippets(sae_dir: Path) -> tuple[str, str]:
    """Python that loads this SAE with sae_core and with SAELens."""
    path = str(sae_dir)
    ours = (
        "from sae_core.sae import load\n\n"
        f"sae = load({path!r})\n"
        "latents = sae.encode(activations)  # activations: [tokens, d_in]\n"
        "reconstruction = sae.decode(latents)\n"
    )
    theirs = (
        "from sae_lens import SAE\n\n"
        f"sae = SAE.load_from_disk({path!r}, device='cpu')\n"
        "latents = sae.encode(activations)\n"
    )
    return ours, theirs


def model_sources(found: list[str], models_dir: Path, cache_dir: Path) -> str:
    """Where the Extract page looks for models, what it found there, and how to add one."""
    local = sum(Path(m).parent == models_dir for m in found)
    where = f"{models_dir} (a folder per model, as save_pretrained writes it) and the Hugging Face cache {cache_dir}"
    if not found:
        return (
            f"No model found yet. Models are looked for in {where}. To add one, copy or save its folder into "
            f"{models_dir}, or download it into the cache on this machine (hf download ORG/NAME, for example "
            "hf download openai-community/gpt2); then reload this page."
        )
    return f"{local} model(s) in {models_dir}, {len(found) - local} in the Hugging Face cache {cache_dir}."


STALE_AFTER_S = 30.0


def no_gpu_reason(probe: Any) -> str:
    """Why a probe has no GPUs: NVML's own reason, or that the driver answered with none."""
    if probe is None:
        return "the launcher's GPU sampler has not reported yet"
    return probe.reason or "the NVIDIA driver reports no devices"


def gpu_summary(probe: Any, now: float | None = None) -> str:
    """One line for the sidebar from the sampler's latest probe (None: nothing sampled yet)."""
    if probe is None:
        return "No GPU sample yet: the launcher's sampler records one every second once it runs."
    if not probe.gpus:
        line = f"No NVIDIA GPU found: {no_gpu_reason(probe)}. Jobs run as CPU processes."
    else:
        names: dict[str, int] = {}
        for gpu in probe.gpus:
            names[gpu.name] = names.get(gpu.name, 0) + 1
        line = ", ".join(f"{count} × {name}" for name, count in names.items())
    if now is not None and probe.t and now - probe.t > STALE_AFTER_S:
        line += f" (last sample {format_duration(now - probe.t)} ago: is the launcher running?)"
    return line


# --------------------------------------------------------------------------- monitor


def gpu_users(gpu: Any) -> list[str]:
    """Who is on this GPU: SAE Lab jobs by number, anything else by pid, user and command."""
    labels = []
    for proc in getattr(gpu, "processes", None) or []:
        if getattr(proc, "job_id", None) is not None:
            label = f"job {proc.job_id}"
        else:
            command = (proc.command or "?").split()[0].rsplit("/", 1)[-1] if proc.command else "?"
            label = f"pid {proc.pid} · {proc.user or '?'} · {command}"
        if label not in labels:
            labels.append(label)
    return labels


_EVAL_LABELS = {
    "fvu": ("FVU", "{:.4f}"),
    "l0": ("L0", "{:.1f}"),
    "dead_fraction": ("Dead fraction", "{:.1%}"),
    "mmcs": ("MMCS (feature recovery)", "{:.3f}"),
    "tokens_per_s": ("Tokens/s", "{:,.0f}"),
    "steps": ("Steps", "{:,}"),
}


# A model evaluation's figures (model/splice.py; SAELens's names and formulas for the two scores)
_MODEL_EVAL_LABELS = {
    "ce_loss_score": ("CE loss recovered", "{:.3f}"),
    "kl_div_score": ("KL recovered", "{:.3f}"),
    "ce_clean": ("CE clean", "{:.4f}"),
    "ce_spliced": ("CE with the SAE", "{:.4f}"),
    "ce_zero_ablation": ("CE zero-ablated", "{:.4f}"),
    "kl_spliced": ("KL with the SAE", "{:.4f}"),
    "explained_variance": ("Explained variance", "{:.3f}"),
    "eval_contexts": ("Contexts", "{:,}"),
}


def model_eval_figures(figures: Mapping[str, Any]) -> dict[str, str]:
    """The model evaluation's figures of eval.json (or model_eval.json), labelled; {} before one ran."""
    return eval_figures(figures, _MODEL_EVAL_LABELS)


def eval_figures(figures: Mapping[str, Any], labels: Mapping[str, tuple[str, str]] | None = None) -> dict[str, str]:
    """eval.json → labelled, formatted figures in a fixed order; missing or odd values are skipped."""
    shown = {}
    for key, (label, fmt) in (labels or _EVAL_LABELS).items():
        value = figures.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            shown[label] = fmt.format(int(value) if fmt == "{:,}" else value)
    return shown
