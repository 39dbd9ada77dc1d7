"""SAEs: every trained SAE under SAE_LAB_HOME, its figures, firing frequencies, a model evaluation, download
and load snippets; or several compared (a sweep, or SAEs picked): sparsity against fidelity and its Pareto
frontier, a sortable table, one model evaluation of them all."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from sae_core import paths
from sae_core.config import EvaluateConfig
from sae_core.files import CFG_FILE, EVAL_FILE, SPARSITY_FILE
from sae_core.outputs import find_trained_saes, read_json, read_log10_frequency, served_dir
from sae_core.ui import charts, compare, frames, labels
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


def one_sae(saes: list[Path], home: Path) -> None:
    """One SAE: its figures, firing frequencies, a model evaluation, download and load snippets."""
    sae_dir: Path = st.selectbox(
        "SAE",
        saes,
        key="saes_pick",
        format_func=lambda p: str(p.relative_to(home)) if p.is_relative_to(home) else str(p),
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
            st.vega_lite_chart(
                histogram, charts.firing_histogram_spec(), width="stretch", height=charts.WIDE_CHART_HEIGHT
            )

    st.markdown("**Download**")
    sae_download(st, sae_dir, f"{sae_dir.name}-sae.zip", "saes_download", "saes_prepare")

    st.markdown("**Load it in Python**")
    ours, sae_lens = labels.load_snippets(sae_dir)
    st.code(ours, language="python")
    st.code(sae_lens, language="python")
    with st.expander("cfg.json"):
        st.json(cfg)


def compare_view(saes: list[Path], home: Path) -> None:
    """Several SAEs side by side: L0 against FVU (and CE loss recovered), the Pareto frontier, a sortable
    table; a click opens the SAE in Explore; "Evaluate all" queues one model evaluation of them all."""
    sweeps = compare.sweep_folders(saes)
    if "compare_mode" not in st.session_state and not sweeps:
        st.session_state["compare_mode"] = "SAEs I pick"
    mode = st.radio("Compare", ["A sweep", "SAEs I pick"], horizontal=True, key="compare_mode")
    if mode == "A sweep" and not sweeps:
        st.info("No sweep has a completed member yet: pick SAEs instead.")
        return
    if mode == "A sweep":
        sweep = st.selectbox("Sweep", sweeps, key="compare_sweep", format_func=lambda p: relative(p, home))
        entries, evaluated = compare.sweep_entries(sweep), (sweep, [])
    else:
        picked = st.multiselect("SAEs", saes, key="compare_saes", format_func=lambda p: relative(p, home))
        entries = compare.picked_entries(picked, home)
        evaluated = (picked[0], picked[1:]) if picked else None
    if len(entries) < 2:
        st.info("Pick two SAEs or more (or a sweep with two completed members or more) to compare them.")
        return
    frame = compare.comparison_frame(entries, home)
    charts_col, table_col = st.columns([3, 2])
    with charts_col:
        for (x, y, _), frontier, key in zip(
            compare.CHARTS, ("frontier_fvu", "frontier_ce"), ("compare_fvu", "compare_ce"), strict=True
        ):
            shown = frame.dropna(subset=[x, y])
            if shown.empty:
                st.caption("No CE loss score yet: evaluate them with the model (below) to chart it.")
                continue
            event = st.altair_chart(
                charts.comparison_chart(shown, x, y, frontier), on_select="rerun", key=key, width="stretch"
            )
            open_clicked(event, home)
    with table_col:
        st.dataframe(frame.drop(columns=["frontier_ce"]), hide_index=True, key="compare_table",
                     column_config={"frontier_fvu": st.column_config.CheckboxColumn("on the FVU frontier")})  # fmt: skip
        st.caption("Click a column's header to sort by it; click a point of a chart to open that SAE in Explore.")
    with st.expander("Evaluate all with the model", icon=":material/science:"):
        st.caption(
            "One job: each batch of held-out contexts runs the model clean and ablated once, then once per SAE spliced in."
        )
        evaluate_all_form(*evaluated, len(entries))


def relative(path: Path, home: Path) -> str:
    return str(path.relative_to(home)) if path.is_relative_to(home) else str(path)


def open_clicked(event, home: Path) -> None:
    """A click on a point (its `folder`, relative to the lab) opens that SAE in Explore."""
    folder = compare.clicked_folder(event, charts.COMPARE_SELECTION)
    if folder and served_dir(home / folder, home) is not None:
        st.switch_page("views/explore.py", query_params={"sae": folder})


def evaluate_all_form(sae: Path, more: list[Path], count: int) -> None:
    """Queue ONE model evaluation of every SAE compared (a sweep's folder stands for its completed members)."""
    contexts = int(
        st.number_input("Held-out contexts", min_value=1, max_value=2**20, value=256, key="compare_contexts")
    )

    def config(on_gpu: bool) -> EvaluateConfig:
        return EvaluateConfig(
            sae=str(sae), saes=[str(p) for p in more], contexts=contexts, device="auto" if on_gpu else "cpu"
        )

    queue_job_form(
        "compare_evaluate", "Evaluate all", ":material/science:", "Evaluation", f"evaluate {count} SAEs", config
    )


st.title("Trained SAEs")
home = paths.lab_home()
saes = find_trained_saes(home)
if not saes:
    st.info(f"No trained SAE under {md_text(home)} yet (a folder with cfg.json and sae_weights.safetensors).")
    st.page_link("views/train.py", label="Train one", icon=":material/arrow_forward:")
    st.stop()

view = st.radio("View", ["One SAE", "Compare"], horizontal=True, key="saes_view")
if view == "Compare":
    compare_view(saes, home)
else:
    one_sae(saes, home)
