"""Explore: what an SAE's latents learned, from its inspect/ files only (no torch, no model here).

?sae=jobs/4&latent=17 opens latent 17 of that SAE (a path inside SAE_LAB_HOME): the permalink a colleague
on the shared URL can follow.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from sae_core import paths
from sae_core.config import InspectConfig
from sae_core.latents import Inspection, inspection_stamp, neuronpedia_zip, read_inspection
from sae_core.outputs import find_trained_saes, served_dir
from sae_core.ui import charts, explore, frames
from sae_core.ui.forms import parse_index_param
from sae_core.ui.html import md, md_text
from views.widgets import queue_job_form


@st.cache_resource(max_entries=8, show_spinner=False)
def cached_inspection(folder: str, stamp: float) -> Inspection | None:  # noqa: ARG001  (the cache key)
    """One reader per inspect folder and version of it (a rerun of the job writes a new `stamp`)."""
    return read_inspection(Path(folder))


def pick_sae(home: Path) -> Path | None:
    saes = find_trained_saes(home)
    relative = [str(p.relative_to(home)) for p in saes if p.is_relative_to(home)]
    wanted = st.query_params.get("sae")
    if wanted and wanted not in relative and served_dir(home / wanted, home) is not None:
        st.warning(f"{md_text(wanted)} holds no trained SAE.")
    if wanted in relative and st.session_state.get("explore_url_seen") != wanted:
        st.session_state["explore_sae"] = wanted
        st.session_state["explore_url_seen"] = wanted
    if not relative:
        return None
    picked = st.selectbox("SAE", relative, key="explore_sae")
    st.query_params["sae"] = picked
    return home / picked


def inspect_offer(sae_dir: Path) -> None:
    """No inspect data yet: queue the inspect job (rows, placement, name)."""
    st.info("This SAE has not been inspected yet: the inspect job computes what the page shows.")
    tokens = int(st.number_input("Rows to inspect", min_value=1, value=1_000_000, step=100_000, key="explore_tokens"))

    def config(on_gpu: bool) -> InspectConfig:
        return InspectConfig(sae=str(sae_dir), tokens=tokens, device="auto" if on_gpu else "cpu")

    queue_job_form("inspect", "Inspect this SAE", ":material/search:", "Inspection", f"inspect {sae_dir.name}", config)


def choose_latent(inspection: Inspection, clicked: int | None) -> None:
    """The latent shown: a new click in the table, else ?latent= when it changed, else the number input."""
    wanted = parse_index_param(st.query_params.get("latent"), inspection.d_sae)
    if clicked is not None and st.session_state.get("explore_clicked_seen") != clicked:
        st.session_state["explore_clicked_seen"] = clicked
        st.session_state["explore_latent"] = clicked
    elif wanted is not None and st.session_state.get("explore_url_latent_seen") != wanted:
        st.session_state["explore_url_latent_seen"] = wanted
        st.session_state["explore_latent"] = wanted
    index = st.number_input("Latent", min_value=0, max_value=inspection.d_sae - 1, step=1, key="explore_latent")
    st.query_params["latent"] = str(int(index))
    st.session_state["explore_url_latent_seen"] = int(index)


def overview(inspection: Inspection) -> int | None:
    """The density histogram and the latents table; returns the latent clicked in the table, if any."""
    summary = inspection.summary
    cols = st.columns(4)
    cols[0].metric("Latents", f"{inspection.d_sae:,}")
    cols[1].metric("Rows inspected", f"{summary.get('rows', 0):,}")
    cols[2].metric("Held out of training", f"{summary.get('held_out_rows', 0):,}")
    cols[3].metric("Dead", f"{summary.get('dead_latents', 0):,}")
    note = explore.source_note(summary)
    if note:
        st.caption(md_text(note))
    histogram = frames.firing_histogram(explore.log10_frequencies(inspection))
    if not histogram.empty:
        st.vega_lite_chart(histogram, charts.firing_histogram_spec(), width="stretch", height=charts.WIDE_CHART_HEIGHT)
    search = st.text_input("Search latents", key="explore_search", placeholder="a latent number, or a token it raises")
    table = explore.latents_table(inspection, search)
    event = st.dataframe(
        table, hide_index=True, width="stretch", height=320, key="explore_table", on_select="rerun",
        selection_mode="single-row",
        column_config={"Frequency": st.column_config.NumberColumn(format="%.2e")},
    )  # fmt: skip
    rows = event.selection.rows if event is not None else []
    return int(table.iloc[rows[0]]["Latent"]) if rows else None


def latent_view(inspection: Inspection, index: int, sae_param: str) -> None:
    view = inspection.latent(index)
    st.subheader(md("Latent {}", index))
    cols = st.columns(4)
    cols[0].metric("Frequency", f"{view.frequency:.3%}")
    cols[1].metric("Max activation", f"{view.max_activation:.3g}")
    cols[2].metric("Mean activation", f"{view.mean_activation:.3g}")
    if view.true_feature is not None:
        cols[3].metric("Best true feature", md("#{} (cos {:.2f})", *view.true_feature))
    st.caption("Permalink")
    st.code(f"?sae={sae_param}&latent={index}", language=None)
    left, right = st.columns([3, 2], gap="large")
    with left:
        st.markdown("**Top activations**")
        if not view.top:
            st.caption("It never fired on the rows inspected.")
        for example in view.top:
            if example.tokens:
                st.html(explore.shaded_text_html(example.tokens, example.acts, example.peak, view.max_activation))
            else:
                st.caption(f"row {example.row:,}: {example.value:.3g}")
        for band, examples in reversed(list(enumerate(view.bands))):
            if examples:
                st.markdown(md("**Activation band {} of {}**", band + 1, len(view.bands)))
                for example in examples:
                    if example.tokens:
                        st.html(
                            explore.shaded_text_html(example.tokens, example.acts, example.peak, view.max_activation)
                        )
                    else:
                        st.caption(f"row {example.row:,}: {example.value:.3g}")
    with right:
        st.markdown("**Activation histogram**")
        st.vega_lite_chart(explore.activation_histogram(view, inspection.histogram_bins()), charts.activation_histogram_spec(),
                           width="stretch", height=200)  # fmt: skip
        if view.logit_top:
            st.markdown("**Logit effects** (decoder row through the unembedding)")
            st.dataframe(explore.effects_frame(view), hide_index=True, width="stretch")
        st.markdown("**Nearest latents** (decoder cosine)")
        for other, cosine in view.nearest:
            st.page_link("views/explore.py", label=md("Latent {} · cos {:.2f}", other, cosine),
                         query_params={"sae": sae_param, "latent": str(other)})  # fmt: skip


st.title("Explore latents")
home = paths.lab_home()
sae_dir = pick_sae(home)
if sae_dir is None:
    st.info("No trained SAE yet.")
    st.page_link("views/train.py", label="Train one", icon=":material/arrow_forward:")
    st.stop()
stamp = inspection_stamp(sae_dir)
inspection = cached_inspection(str(sae_dir), stamp) if stamp is not None else None
if inspection is None:
    inspect_offer(sae_dir)
    st.stop()
clicked = overview(inspection)
st.download_button(
    "Export for Neuronpedia (zip of feature JSON)", data=lambda: neuronpedia_zip(inspection),
    file_name=f"{sae_dir.name}-neuronpedia.zip", mime="application/zip", on_click="ignore", key="explore_export",
    icon=":material/download:",
)  # fmt: skip
choose_latent(inspection, clicked)
latent_view(inspection, int(st.session_state["explore_latent"]), str(sae_dir.relative_to(home)))
