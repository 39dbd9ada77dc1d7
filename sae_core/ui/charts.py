"""Chart specs (Vega-Lite, composed with Altair once per process) that the pages fill with a frame."""

from __future__ import annotations

import copy
import functools

import altair as alt

from .frames import CHART_METRICS

# Charts are composed with Altair once per process (its schema validation costs tens of ms per
# chart, which would blow the 200 ms rerun budget with eight GPUs) and rendered with the frame
# attached by st.vega_lite_chart.


def _detached(chart) -> dict:
    """The chart's spec without data: Altair fills in an empty placeholder dataset (and a facet needs
    a named one), which would hide the frame given to st.vega_lite_chart. Its default 300 px view
    config goes too, so Streamlit's theme applies."""
    spec = chart.to_dict()
    for key in ("data", "datasets", "config"):
        spec.pop(key, None)
    return spec


GPU_SERIES = ("util %", "mem %")
HOST_SERIES = ("CPU %", "RAM %")


# Heights are given to st.vega_lite_chart (the whole chart, axes and legend included), not put in
# the spec: Streamlit fits a spec height to the outer box, which squeezes a small chart's plot to nothing.
GPU_CARD_CHART_HEIGHT = 170
WIDE_CHART_HEIGHT = 260


def gpu_history_spec() -> dict:
    return copy.deepcopy(_percent_lines_spec(GPU_SERIES))


def host_history_spec() -> dict:
    return copy.deepcopy(_percent_lines_spec(HOST_SERIES))


@functools.cache
def _percent_lines_spec(series: tuple[str, ...]) -> dict:
    chart = (
        alt.Chart()
        .mark_line(interpolate="monotone", strokeWidth=1.5)
        .encode(
            x=alt.X("t:T", title=None, axis=alt.Axis(labelOverlap=True, tickCount=4)),
            y=alt.Y("value:Q", title=None, scale=alt.Scale(domain=[0, 100])),
            color=alt.Color(
                "metric:N",
                title=None,
                scale=alt.Scale(domain=list(series), range=["#10b981", "#6366f1"]),
                legend=alt.Legend(orient="top", direction="horizontal", labelLimit=120),
            ),
            tooltip=[alt.Tooltip("t:T", format="%Y-%m-%d %H:%M:%S"), "metric:N", alt.Tooltip("value:Q", format=".0f")],
        )
    )
    return _detached(chart)


def metrics_spec(columns: int = 3) -> dict:
    return copy.deepcopy(_metrics_spec(columns))


@functools.cache
def _metrics_spec(columns: int) -> dict:
    # A facet needs top-level data to compile; a named placeholder is dropped from the spec so the
    # frame given to st.vega_lite_chart becomes the data.
    chart = (
        alt.Chart(alt.Data(name="metrics"))
        .mark_line(strokeWidth=1.5)
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
            tooltip=["metric:N", "step:Q", "value:Q"],
        )
        .properties(width=260, height=160)
        .facet(facet=alt.Facet("metric:N", title=None, sort=list(CHART_METRICS)), columns=columns)
        .resolve_scale(y="independent")
    )
    return _detached(chart)


def activation_histogram_spec() -> dict:
    return copy.deepcopy(_activation_histogram_spec())


@functools.cache
def _activation_histogram_spec() -> dict:
    chart = (
        alt.Chart()
        .mark_bar()
        .encode(
            x=alt.X("low:Q", bin="binned", scale=alt.Scale(type="log"), title="activation"),
            x2="high:Q",
            y=alt.Y("count:Q", title="tokens"),
            tooltip=["low:Q", "high:Q", "count:Q"],
        )
    )
    return _detached(chart)


def firing_histogram_spec() -> dict:
    return copy.deepcopy(_firing_histogram_spec())


@functools.cache
def _firing_histogram_spec() -> dict:
    chart = (
        alt.Chart()
        .mark_bar()
        .encode(
            x=alt.X("log10_freq_start:Q", bin="binned", title="log10 firing frequency"),
            x2="log10_freq_end:Q",
            y=alt.Y("latents:Q", title="latents"),
            tooltip=["log10_freq_start:Q", "log10_freq_end:Q", "latents:Q"],
        )
    )
    return _detached(chart)


def members_spec(metric: str) -> dict:
    """One metric of a sweep, a line per member (colour), from `frames.member_lines`."""
    return copy.deepcopy(_members_spec(metric))


@functools.cache
def _members_spec(metric: str) -> dict:
    chart = (
        alt.Chart()
        .mark_line(strokeWidth=1.5)
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y("value:Q", title=metric, scale=alt.Scale(zero=False)),
            color=alt.Color("member:N", title="member", legend=alt.Legend(orient="bottom", labelLimit=240)),
            tooltip=["member:N", "step:Q", alt.Tooltip("value:Q", title=metric, format=".4g")],
        )
    )
    return _detached(chart)


COMPARE_SELECTION = "picked"  # the comparison chart's click selection: the point's `folder`
COMPARE_TITLES = {"l0": "L0 (active latents per token)", "fvu": "FVU (lower is better)",
                  "ce_loss_score": "CE loss recovered (higher is better)"}  # fmt: skip


def comparison_chart(frame, x: str, y: str, frontier: str) -> alt.LayerChart | alt.FacetChart:
    """SAEs as points (x against y), the Pareto frontier (rows where `frontier` is true) as a line through
    them; hovering shows a point's name, config and figures, clicking selects its `folder`. An Altair chart
    (not a cached spec): Streamlit's `on_select` needs the chart's selection parameter."""
    picked = alt.selection_point(name=COMPARE_SELECTION, fields=["folder"], on="click", clear="dblclick")
    base = alt.Chart(frame)
    x_enc = alt.X(f"{x}:Q", title=COMPARE_TITLES.get(x, x), scale=alt.Scale(zero=False))
    y_enc = alt.Y(f"{y}:Q", title=COMPARE_TITLES.get(y, y), scale=alt.Scale(zero=False))
    line = (
        base.transform_filter(alt.datum[frontier])
        .mark_line(color="#f97316", strokeDash=[4, 3], strokeWidth=1.5)
        .encode(x=x_enc, y=y_enc, order=alt.Order(f"{x}:Q"))
    )
    tooltip = [alt.Tooltip("name:N", title="SAE"), alt.Tooltip("config:N", title="config"),
               alt.Tooltip("architecture:N"), alt.Tooltip("d_sae:Q", format=","),
               alt.Tooltip(f"{x}:Q", format=".4g"), alt.Tooltip(f"{y}:Q", format=".4g"),
               alt.Tooltip(f"{frontier}:N", title="on the frontier")]  # fmt: skip
    points = (
        base.mark_circle(size=90)
        .encode(
            x=x_enc,
            y=y_enc,
            color=alt.condition(alt.datum[frontier], alt.value("#f97316"), alt.value("#6366f1")),
            opacity=alt.condition(picked, alt.value(1.0), alt.value(0.35)),
            tooltip=tooltip,
        )
        .add_params(picked)
    )
    return alt.layer(line, points)
