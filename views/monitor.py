"""Monitor: every GPU live, from the launcher's sampler history in SQLite (never NVML per viewer)."""

from __future__ import annotations

import time

import streamlit as st

from sae_core import db
from sae_core.gpu.history import latest_probe, query_host, query_series
from sae_core.text import format_bytes, format_percent, power_label
from sae_core.ui import charts, frames, html, labels
from views.widgets import live_fragment

WINDOWS = ["5m", "1h", "24h", "7d"]
CARD_COLUMNS = 4

st.title("Monitor")
left, right = st.columns([3, 2], vertical_alignment="bottom")
window = left.segmented_control("Window", WINDOWS, default="5m", key="monitor_window") or "5m"
aggregate = right.toggle("Aggregated view (all GPUs together)", key="monitor_aggregate")


def gpu_card(gpu, series) -> None:
    with st.container(border=True):
        st.markdown(html.md("**GPU {}** · {}", gpu.index, gpu.name))
        if gpu.error:
            st.error(html.md_text(gpu.error))
        users = labels.gpu_users(gpu)
        badges_md = " ".join(html.badge(u, "violet" if u.startswith("job") else "orange") for u in users)
        st.markdown(badges_md or html.badge("no processes", "gray"))
        st.markdown(html.memory_bar_html(gpu.memory_used, gpu.memory_total), unsafe_allow_html=True)
        st.caption(
            f"Util {format_percent(gpu.util_gpu)} · "
            f"{'—' if gpu.temperature is None else f'{gpu.temperature:.0f} °C'} · "
            f"{power_label(gpu.power_w, gpu.power_limit_w)}"
        )
        st.vega_lite_chart(
            series[series["gpu"] == gpu.index],
            charts.gpu_history_spec(),
            width="stretch",
            height=charts.GPU_CARD_CHART_HEIGHT,
        )


def aggregated_card(gpus, series) -> None:
    totals = frames.aggregate_now(gpus)
    with st.container(border=True):
        st.markdown(html.md("**All {} GPUs**", len(gpus)))
        cols = st.columns(3)
        cols[0].metric("Mean utilization", format_percent(totals["util_gpu"]))
        cols[1].metric(
            "Memory used",
            f"{format_bytes(totals['memory_used'])} / {format_bytes(totals['memory_total'])}",
        )
        cols[2].metric("Power", power_label(totals["power_w"], totals["power_limit_w"]))
        st.markdown(html.memory_bar_html(totals["memory_used"], totals["memory_total"]), unsafe_allow_html=True)
        st.vega_lite_chart(series, charts.gpu_history_spec(), width="stretch", height=charts.WIDE_CHART_HEIGHT)


def host_section(engine, probe) -> None:
    st.subheader("Host")
    host = probe.host
    cols = st.columns(3)
    cols[0].metric("CPU", format_percent(host.cpu_percent))
    cols[1].metric("RAM", f"{format_bytes(host.ram_used)} / {format_bytes(host.ram_total)}")
    cols[2].metric("Last sample", f"{max(0.0, time.time() - probe.t):.0f} s ago")
    host_series = frames.host_history_long(query_host(engine, window))
    if not host_series.empty:
        st.vega_lite_chart(host_series, charts.host_history_spec(), width="stretch", height=charts.WIDE_CHART_HEIGHT)


@live_fragment
def live() -> None:
    engine = db.get_engine()
    probe = latest_probe(engine)
    if probe is None:
        st.info(
            "No sample yet. The launcher's GPU sampler records one every second; "
            "start the launcher from the sidebar if it is not running."
        )
        return
    if not probe.gpus:
        st.warning(f"No NVIDIA GPU found: {html.md_text(labels.no_gpu_reason(probe))}")
        host_section(engine, probe)
        return
    series = frames.gpu_history_long(query_series(engine, window, aggregate))
    if aggregate:
        aggregated_card(probe.gpus, series)
    else:
        width = min(CARD_COLUMNS, len(probe.gpus))
        for row_start in range(0, len(probe.gpus), width):
            for col, gpu in zip(st.columns(width), probe.gpus[row_start : row_start + width], strict=False):
                with col:
                    gpu_card(gpu, series)
    st.subheader("Processes")
    processes = frames.process_frame(probe)
    if processes.empty:
        st.caption("No process is using a GPU.")
    else:
        st.dataframe(processes, hide_index=True, width="stretch")
    host_section(engine, probe)


live()
