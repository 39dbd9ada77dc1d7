"""SAEs: every trained SAE under SAE_LAB_HOME, its figures, firing frequencies, a model evaluation, download
and load snippets."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from sae_core import paths
from sae_core.config import EvaluateConfig
from sae_core.files import CFG_FILE, EVAL_FILE, SPARSITY_FILE
from sae_core.outputs import find_trained_saes, read_json, read_log10_frequency
from sae_core.ui import charts, frames, labels
from sae_core.ui.html import md, md_text
from views.widgets import queue_job_form, sae_download


def show_figures(title_md: str, shown: dict[str, str]) -> None:
    st.markdown(title_md)
    cols = st.columns(max(1, len(shown)))
    for col, (label, value) in zip(cols, shown.items(), strict=False):
        col.metric(md_text(label), md_text(value))


def evaluate_form(sae_dir: Path) -> None:
    """Queue a model evaluation of this SAE: how many held-out contexts, where it runs, who asks."""
    contexts = int(st.number_input("Held-out contexts", min_value=1, max_value=2**20, value=256, key="saes_contexts"))

    def config(on_gpu: bool) -> EvaluateConfig:
        return EvaluateConfig(sae=str(sae_dir), contexts=contexts, device="auto" if on_gpu else "cpu")

    queue_job_form(
        "evaluate", "Evaluate with the model", ":material/science:", "Evaluation", f"evaluate {sae_dir.name}", config
    )


st.title("Trained SAEs")
home = paths.lab_home()
saes = find_trained_saes(home)
if not saes:
    st.info(f"No trained SAE under {md_text(home)} yet (a folder with cfg.json and sae_weights.safetensors).")
    st.page_link("views/train.py", label="Train one", icon=":material/arrow_forward:")
    st.stop()

sae_dir: Path = st.selectbox(
    "SAE", saes, key="saes_pick", format_func=lambda p: str(p.relative_to(home)) if p.is_relative_to(home) else str(p)
)
cfg = read_json(sae_dir / CFG_FILE)
figures = read_json(sae_dir / EVAL_FILE)
log10_freq = read_log10_frequency(sae_dir / SPARSITY_FILE)

# cfg.json is a file anyone with write access to the lab may have put there: every value shown as text.
metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
cols = st.columns(4)
cols[0].metric("Architecture", md_text(metadata.get("trained_architecture") or cfg.get("architecture", "?")))
cols[1].metric("d_in → d_sae", md("{} → {}", cfg.get("d_in", "?"), cfg.get("d_sae", "?")))
cols[2].metric("k", md_text(cfg.get("k", "—")))
cols[3].metric("dtype", md_text(cfg.get("dtype", "?")))
if shown := labels.eval_figures(figures):
    show_figures("**Evaluation** (held-out tokens)", shown)
else:
    st.caption("No eval.json beside this SAE.")
if with_model := labels.model_eval_figures(figures):
    show_figures(
        "**With the model** (the SAE spliced in at its hook; SAELens's ce_loss_score, kl_div_score)", with_model
    )
with st.expander("Evaluate with the model", expanded=not with_model, icon=":material/science:"):
    st.caption(
        "Runs the model on held-out contexts clean, with the hook's output replaced by the SAE's reconstruction, "
        "and zero- and mean-ablated: CE loss and KL recovered, as a job on the queue."
    )
    evaluate_form(sae_dir)

if sae_dir.is_relative_to(home):
    st.page_link("views/explore.py", label="Explore its latents", icon=":material/travel_explore:",
                 query_params={"sae": str(sae_dir.relative_to(home))})  # fmt: skip

st.markdown("**Feature firing frequency**")
if log10_freq is None:
    st.caption("No sparsity.safetensors beside this SAE.")
else:
    dead = frames.dead_latents(log10_freq)
    st.caption(f"{dead:,} of {len(log10_freq):,} latents never fired on the training tokens (dead).")
    histogram = frames.firing_histogram(log10_freq)
    if not histogram.empty:
        st.vega_lite_chart(histogram, charts.firing_histogram_spec(), width="stretch", height=charts.WIDE_CHART_HEIGHT)

st.markdown("**Download**")
sae_download(st, sae_dir, f"{sae_dir.name}-sae.zip", "saes_download", "saes_prepare")

st.markdown("**Load it in Python**")
ours, sae_lens = labels.load_snippets(sae_dir)
st.code(ours, language="python")
st.code(sae_lens, language="python")
with st.expander("cfg.json"):
    st.json(cfg)
