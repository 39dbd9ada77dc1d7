"""Jobs: the queue (refreshing itself) and one job in detail: live curves, logs, cancel/resume, downloads."""

from __future__ import annotations

import json
import time

import streamlit as st

from sae_core import paths
from sae_core.db.tables import LIVE_STATUSES
from sae_core.files import MODEL_EVAL_FILE, STDERR_LOG, STDOUT_LOG
from sae_core.jobs import store, submission
from sae_core.jobs.errors import JobError
from sae_core.jobs.kinds import job_kind
from sae_core.jobs.lifecycle import cancel_job
from sae_core.jobs.logs import log_dir_of, tail_text
from sae_core.jobs.metrics import metrics_frame, named_columns
from sae_core.outputs import is_trained_sae, plain_file, read_json, served_dir, sweep_members
from sae_core.text import format_bytes, format_duration, format_rate
from sae_core.ui import charts, frames, html, labels
from sae_core.ui.downloads import metrics_csv
from sae_core.ui.forms import parse_job_param
from sae_core.ui.html import md, md_text
from views.widgets import live_fragment, sae_download

TABLE_LIMIT = 500
CHART_POINTS = 1000
STATUS_COLOURS = {
    "queued": "gray",
    "starting": "blue",
    "running": "blue",
    "completed": "green",
    "failed": "red",
    "cancelled": "orange",
}


@live_fragment
def jobs_table() -> None:
    table = frames.jobs_table(store.list_jobs(limit=TABLE_LIMIT), time.time())
    st.dataframe(
        table,
        hide_index=True,
        width="stretch",
        height=min(420, 38 + 35 * len(table)),
        column_config={
            "Progress": st.column_config.ProgressColumn("Progress", min_value=0.0, max_value=1.0, format="percent"),
            "Submitted": st.column_config.DatetimeColumn("Submitted", format="YYYY-MM-DD HH:mm"),
        },
    )


def pick_job(jobs) -> int:
    """The job shown below: from ?job=ID (links from Train), then the picker; kept in the URL."""
    options = [job.id for job in jobs]
    labels = {job.id: f"#{job.id} · {job.name} · {job.status}" for job in jobs}
    wanted = parse_job_param(st.query_params.get("job"))
    pending = st.session_state.pop("jobs_pick_pending", None)
    if pending is not None:
        wanted = pending
    if wanted is not None and wanted != st.session_state.get("jobs_url_seen"):
        st.session_state["jobs_url_seen"] = wanted
        if wanted not in options and store.get_job(wanted) is not None:
            options.insert(0, wanted)
        if wanted in options:
            st.session_state["jobs_pick"] = wanted
    if st.session_state.get("jobs_pick") not in options:
        st.session_state["jobs_pick"] = options[0]
    picked = st.selectbox("Job", options, key="jobs_pick", format_func=lambda i: labels.get(i, f"#{i}"))
    st.query_params["job"] = str(picked)
    st.session_state["jobs_url_seen"] = picked
    return picked


def actions(job) -> None:
    c1, c2, c3, c4 = st.columns([1, 1, 2, 2], vertical_alignment="center")
    if job.status in LIVE_STATUSES and c1.button("Cancel job", key="job_cancel", icon=":material/cancel:"):
        try:
            _, message = cancel_job(job.id)
        except JobError as exc:
            st.error(md_text(exc))
        else:
            st.toast(md_text(message))
            st.rerun()
    if job.status in ("failed", "cancelled") and c2.button("Resume", key="job_resume", icon=":material/replay:"):
        try:
            new, _ = submission.resume(job.id, submitted_by=st.session_state.get("user_name", ""))
        except JobError as exc:
            st.error(md_text(exc))
        else:
            st.session_state["jobs_pick_pending"] = new.id
            st.rerun(scope="app")
    downloads(job, c3, c4)


def downloads(job, c1, c2) -> None:
    out_dir = served_dir(job.out_dir, paths.lab_home())
    if out_dir is None:
        c1.caption("This job's folder is not inside SAE_LAB_HOME, so its files are not served.")
    elif is_trained_sae(out_dir):
        sae_download(c1, out_dir, f"sae-job-{job.id}.zip", "job_download_zip", "job_prepare_zip")
    else:
        c1.caption(md_text(job_kind(job.kind).result_note))
    c2.download_button(
        "Metrics CSV",
        data=lambda: metrics_csv(metrics_frame(job.id)),
        file_name=f"metrics-job-{job.id}.csv",
        mime="text/csv",
        on_click="ignore",
        key="job_download_csv",
        icon=":material/table:",
    )


def disk_tile(job, metrics, col) -> None:  # noqa: ARG001  (every tile takes the same arguments)
    """An extraction's disk written so far."""
    disk = metrics["disk_bytes"].dropna() if "disk_bytes" in metrics else []
    col.metric("Disk used", format_bytes(disk.iloc[-1]) if len(disk) else "—")


def data_wait_tile(job, metrics, col) -> None:  # noqa: ARG001
    """The share of time the ranks waited for data."""
    data_wait = frames.data_wait_summary(metrics)
    col.metric(
        "Data wait", md_text(data_wait[0]) if data_wait else "—", help=md_text(data_wait[1]) if data_wait else None
    )


def model_figures(job, metrics=None, col=None) -> None:  # noqa: ARG001
    """An evaluation job's result (its model_eval.json), once written."""
    out_dir = served_dir(job.out_dir, paths.lab_home())
    result = read_json(out_dir / MODEL_EVAL_FILE) if out_dir is not None else {}
    shown = labels.model_eval_figures(result)
    if shown:
        cols = st.columns(len(shown))
        for col, (label, value) in zip(cols, shown.items(), strict=False):
            col.metric(md_text(label), md_text(value))
    each = frames.evaluation_table(result, paths.lab_home())
    if not each.empty:
        st.markdown(md("**Each SAE** ({} evaluated in one pass)", len(each)))
        st.dataframe(each, hide_index=True, width="stretch", key="job_evaluated_saes")


# The sixth tile of a job, by its kind's `tile` (jobs/kinds.py).
TILES = {"disk": disk_tile, "data_wait": data_wait_tile, "model_figures": model_figures}


def sweep_section(job, members, metrics) -> None:
    """A sweep: each member's status (from its folder) and latest figures, and one chart, a line per member."""
    live = job.status in LIVE_STATUSES
    table = frames.members_table(members, metrics, live)
    done = int((table["Status"] == "completed").sum())
    st.markdown(md("**Members**: {} of {} completed", done, len(members)))
    st.dataframe(table, hide_index=True, width="stretch", key="job_members_table")
    names = [member.name for member in members]
    figures = frames.member_metrics(metrics)
    if not figures:
        st.caption("No metrics yet: rank 0 records each member's every log_every steps once training runs.")
        return
    c1, c2 = st.columns([1, 3])
    metric = c1.selectbox("Metric", figures, key="job_member_metric")
    chosen = c2.multiselect("Members shown", names, default=names, key="job_members_shown")
    lines = frames.member_lines(metrics, chosen, metric)
    if lines.empty:
        st.caption("Nothing to draw for the members chosen.")
    else:
        st.vega_lite_chart(lines, charts.members_spec(metric), width="stretch", height=charts.WIDE_CHART_HEIGHT)


def job_detail(job_id: int, was_live: bool) -> None:
    job = store.get_job(job_id)
    if job is None:
        st.warning(md("Job {} no longer exists.", job_id))
        return
    if was_live and job.status not in LIVE_STATUSES:
        st.rerun(scope="app")  # it just finished: stop the timer, refresh the table and buttons
    st.markdown(
        f"### {md_text(job.name)} {html.badge(job.status, STATUS_COLOURS.get(job.status, 'gray'))}",
    )
    now = time.time()
    metrics = metrics_frame(job.id, max_points=CHART_POINTS)
    cols = st.columns(6)
    kind = job_kind(job.kind)
    cols[0].metric(md_text(kind.progress_label), f"{job.last_step:,} / {job.total_steps:,}")
    cols[1].metric("Tokens/s", format_rate(job.tokens_per_s).removesuffix(" tok/s"))
    eta = frames.job_eta_seconds(job.status, job.started_at, job.last_step, job.total_steps, now)
    cols[2].metric("ETA", format_duration(eta))
    cols[3].metric("Runs on", md_text(frames.gpus_label(job.gpu_ids, job.cpu_procs)))
    cols[4].metric("Submitted by", md_text(job.submitted_by or "—"))
    TILES[kind.tile](job, metrics, cols[5])
    if job.depends_on is not None and job.status == "queued":
        st.info(md("Waits for job {} to complete.", job.depends_on), icon=":material/schedule:")
    if job.error:
        st.error(md_text(job.error, multiline=True), icon=":material/error:")
    actions(job)

    out_dir = served_dir(job.out_dir, paths.lab_home())
    members = sweep_members(out_dir) if out_dir is not None else []
    if members:
        sweep_section(job, members, metrics)
    elif metrics.empty:
        st.caption("No metrics yet: rank 0 records them every log_every steps once training runs.")
    else:
        shown = kind.chart_metrics or [*frames.CHART_METRICS, *named_columns(metrics)]
        st.vega_lite_chart(frames.metrics_long(metrics, shown), charts.metrics_spec(), width="stretch")
        peaks = frames.peak_memory_by_rank(metrics)
        if not peaks.empty:
            st.markdown("**Peak memory per rank**")
            st.dataframe(peaks[["rank", "peak"]], hide_index=True)

    log_tab, config_tab = st.tabs(["Log", "Config"])
    with log_tab:
        served = served_dir(job.out_dir, paths.lab_home()) is not None
        for name in (STDOUT_LOG, STDERR_LOG):
            log = log_dir_of(job) / name
            text = tail_text(log) if served and plain_file(log) else ""
            st.caption(md("{} (last lines)", name))
            st.code(text or "(empty)", language=None)
    with config_tab:
        st.json(json.loads(job.config_json), expanded=True)


st.title("Jobs")
jobs = store.list_jobs(limit=TABLE_LIMIT)
if not jobs:
    st.info("No jobs yet.")
    st.page_link("views/train.py", label="Queue one on the Train page", icon=":material/arrow_forward:")
    st.stop()

jobs_table()
job_id = pick_job(jobs)
selected = next((job for job in jobs if job.id == job_id), None) or store.get_job(job_id)
live = selected is not None and selected.status in LIVE_STATUSES
live_fragment(job_detail, run_every=2 if live else None)(job_id, live)
