"""Tables and chart data for the pages, as pandas frames: jobs, metrics, GPU and host history, processes,
firing frequencies, the memory breakdown."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..outputs import DEAD_LOG10
from ..text import format_bytes, format_duration, format_rate


def job_progress(last_step: int | None, total_steps: int | None) -> float:
    if not total_steps:
        return 0.0
    return max(0.0, min(1.0, (last_step or 0) / total_steps))


def job_eta_seconds(
    status: str, started_at: float | None, last_step: int | None, total_steps: int | None, now: float
) -> float | None:
    """Remaining time at the run's average pace so far (None until a step has been logged)."""
    if status != "running" or not started_at or not last_step or not total_steps:
        return None
    elapsed = max(0.0, now - started_at)
    remaining_steps = max(0, total_steps - last_step)
    return elapsed / last_step * remaining_steps


def gpus_label(gpu_ids: str, cpu_procs: int | None) -> str:
    if gpu_ids:
        return "GPU " + gpu_ids
    return f"CPU × {cpu_procs or 1}"


JOB_TABLE_COLUMNS = [
    "ID", "Name", "Kind", "Status", "Progress", "Step", "ETA", "GPUs", "Tokens/s", "Submitted by", "Submitted",
]  # fmt: skip


def jobs_table(jobs: Iterable[Any], now: float) -> pd.DataFrame:
    """One row per job (objects with the Job table's attributes), newest first as given."""
    rows = []
    for job in jobs:
        rows.append(
            {
                "ID": job.id,
                "Name": job.name,
                "Kind": getattr(job, "kind", "train"),
                "Status": job.status,
                "Progress": job_progress(job.last_step, job.total_steps),
                "Step": f"{job.last_step or 0:,}/{job.total_steps or 0:,}",
                "ETA": format_duration(
                    job_eta_seconds(job.status, job.started_at, job.last_step, job.total_steps, now)
                ),
                "GPUs": gpus_label(job.gpu_ids, job.cpu_procs),
                "Tokens/s": format_rate(job.tokens_per_s),
                "Submitted by": job.submitted_by,
                "Submitted": pd.Timestamp(job.created_at, unit="s", tz="UTC"),
            }
        )
    return pd.DataFrame(rows, columns=JOB_TABLE_COLUMNS)


CHART_METRICS = ("loss", "fvu", "l0", "dead_fraction", "lr", "data_wait")
DATA_BOUND_WAIT = 0.2  # waiting for data this much of the time: reading, not compute, sets the pace


def data_wait_summary(frame: pd.DataFrame) -> tuple[str, str] | None:
    """The latest data_wait as (tile value, what it means); None before it was measured."""
    if frame.empty or "data_wait" not in frame.columns or frame["data_wait"].dropna().empty:
        return None
    wait = float(frame["data_wait"].dropna().iloc[-1])
    if wait >= DATA_BOUND_WAIT:
        return f"{wait:.0%}", "Training waits for data: reading (disk or network filesystem) is the limit."
    return f"{wait:.0%}", "Data arrives ahead of the steps: compute is the limit."


def metrics_long(frame: pd.DataFrame, metrics: Iterable[str] = CHART_METRICS) -> pd.DataFrame:
    """(step, metric, value) rows for one faceted chart; missing metrics and nulls are dropped."""
    present = [m for m in metrics if m in frame.columns]
    if frame.empty or not present:
        return pd.DataFrame({"step": [], "metric": [], "value": []})
    long = frame[["step", *present]].melt(id_vars="step", var_name="metric", value_name="value")
    return long.dropna(subset=["value"])


def peak_memory_by_rank(frame: pd.DataFrame) -> pd.DataFrame:
    """Largest peak memory each rank has reported (`peak_mem` list or `peak_mem_json` text per row)."""
    column = (
        "peak_mem" if "peak_mem" in frame.columns else "peak_mem_json" if "peak_mem_json" in frame.columns else None
    )
    if column is None or frame.empty:
        return pd.DataFrame({"rank": [], "peak_bytes": [], "peak": []})
    peaks: dict[int, int] = {}
    for value in frame[column]:
        ranks = json.loads(value) if isinstance(value, str) else (value or [])
        for rank, peak in enumerate(ranks):
            if peak is not None:
                peaks[rank] = max(peaks.get(rank, 0), int(peak))
    ranks_sorted = sorted(peaks)
    return pd.DataFrame(
        {
            "rank": ranks_sorted,
            "peak_bytes": [peaks[r] for r in ranks_sorted],
            "peak": [format_bytes(peaks[r]) for r in ranks_sorted],
        }
    )


def firing_histogram(log10_freq: Iterable[float], bins: int = 40, floor: float = DEAD_LOG10) -> pd.DataFrame:
    """Histogram of log10 firing frequency; never-firing latents (log10 ≤ floor) are left out
    and counted as dead instead, as they would pile up at -inf."""
    values = pd.Series(list(log10_freq), dtype="float64")
    alive = values[values > floor].dropna()
    if alive.empty:
        return pd.DataFrame({"log10_freq_start": [], "log10_freq_end": [], "latents": []})
    counts, edges = _histogram(alive.to_numpy(), bins)
    return pd.DataFrame({"log10_freq_start": edges[:-1], "log10_freq_end": edges[1:], "latents": counts})


def _histogram(values, bins: int):
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return counts.astype(int), edges


def dead_latents(log10_freq: Iterable[float], floor: float = DEAD_LOG10) -> int:
    values = pd.Series(list(log10_freq), dtype="float64")
    return int((values.isna() | (values <= floor)).sum())


PROCESS_COLUMNS = ["GPU", "PID", "User", "Command", "GPU memory", "Job"]


def process_frame(probe: Any) -> pd.DataFrame:
    rows = []
    for gpu in getattr(probe, "gpus", None) or []:
        for proc in gpu.processes or []:
            rows.append(
                {
                    "GPU": gpu.index,
                    "PID": proc.pid,
                    "User": proc.user or "",
                    "Command": proc.command or "",
                    "GPU memory": format_bytes(proc.gpu_memory),
                    "Job": "" if proc.job_id is None else str(proc.job_id),
                }
            )
    return pd.DataFrame(rows, columns=PROCESS_COLUMNS)


def gpu_history_long(series: pd.DataFrame) -> pd.DataFrame:
    """history.query_series rows → (t, gpu, metric, value): utilization and memory in % of total,
    so one 0–100 axis serves both lines of a card's chart."""
    if series is None or series.empty:
        return pd.DataFrame({"t": [], "gpu": [], "metric": [], "value": []})
    frame = pd.DataFrame(
        {
            "t": series["t"],
            "gpu": series["gpu"],
            "util %": series["util_gpu"],
            "mem %": series["mem_used"] / series["mem_total"].where(series["mem_total"] > 0) * 100,
        }
    )
    long = frame.melt(id_vars=["t", "gpu"], var_name="metric", value_name="value")
    return long.dropna(subset=["value"])


def aggregate_now(gpus: Iterable[Any]) -> dict[str, float | None]:
    """Mean utilization and total memory/power across GPUs for the aggregated view."""
    gpus = list(gpus)
    utils = [g.util_gpu for g in gpus if g.util_gpu is not None]
    return {
        "util_gpu": sum(utils) / len(utils) if utils else None,
        "memory_used": sum(g.memory_used or 0 for g in gpus),
        "memory_total": sum(g.memory_total or 0 for g in gpus),
        "power_w": sum(g.power_w or 0 for g in gpus) if any(g.power_w is not None for g in gpus) else None,
        "power_limit_w": sum(g.power_limit_w or 0 for g in gpus)
        if any(g.power_limit_w is not None for g in gpus)
        else None,
    }


def host_history_long(frame: pd.DataFrame) -> pd.DataFrame:
    """history.query_host rows → (t, metric, value) with CPU % and RAM % of total."""
    if frame is None or frame.empty:
        return pd.DataFrame({"t": [], "metric": [], "value": []})
    wide = pd.DataFrame(
        {
            "t": frame["t"],
            "CPU %": frame["cpu_percent"],
            "RAM %": frame["ram_used"] / frame["ram_total"].where(frame["ram_total"] > 0) * 100,
        }
    )
    return wide.melt(id_vars="t", var_name="metric", value_name="value").dropna(subset=["value"])


def breakdown_frame(breakdown: Mapping[str, int], labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Memory estimate terms, largest first, with readable names and sizes; zero terms are left out."""
    items = sorted(((k, v) for k, v in breakdown.items() if v), key=lambda kv: -kv[1])
    labels = labels or {}
    return pd.DataFrame({"part": [labels.get(k, k) for k, _ in items], "memory": [format_bytes(v) for _, v in items]})


# --------------------------------------------------------------------------- a sweep's members

MEMBER_TABLE_COLUMNS = ["Member", "Status", "Step", "FVU", "L0", "Error"]


def latest_per_member(frame: pd.DataFrame) -> dict[str, dict]:
    """Each member's latest metric row (a sweep's `metrics_frame`), by member name."""
    if frame.empty or "member" not in frame.columns:
        return {}
    rows = frame.dropna(subset=["member"]).sort_values("step", kind="stable").groupby("member").tail(1)
    return {str(row["member"]): row.to_dict() for _, row in rows.iterrows()}


def members_table(members: Iterable[Any], metrics: pd.DataFrame, live: bool) -> pd.DataFrame:
    """One row per member of a sweep (outputs.MemberStatus): its status as its folder shows it (a member
    neither completed nor failed is "running" while the job is live, else "not finished"), and step, FVU
    and L0 from its latest metric."""
    latest = latest_per_member(metrics)
    rows = []
    for member in members:
        last = latest.get(member.name, {})
        status = member.status if member.status != "running" or live else "not finished"
        rows.append(
            {
                "Member": member.name,
                "Status": status,
                "Step": _int_or_none(last.get("step")),
                "FVU": _float_or_none(member.figures.get("fvu"), last.get("fvu")),
                "L0": _float_or_none(member.figures.get("l0"), last.get("l0")),
                "Error": member.error or "",
            }
        )
    table = pd.DataFrame(rows, columns=MEMBER_TABLE_COLUMNS)
    table["Step"] = table["Step"].astype("Int64")  # a member without a metric yet has no step
    return table


def _int_or_none(value) -> int | None:
    return int(value) if isinstance(value, int | float) and not pd.isna(value) else None


def _float_or_none(*values) -> float | None:
    """The first finite number of `values` (eval.json's figure first, then the latest metric's)."""
    for value in values:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def member_lines(frame: pd.DataFrame, members: Iterable[str], metric: str) -> pd.DataFrame:
    """(step, member, value) rows of one metric for the chosen members: a line per member."""
    chosen = list(members)
    if frame.empty or metric not in frame.columns or "member" not in frame.columns:
        return pd.DataFrame({"step": [], "member": [], "value": []})
    rows = frame[frame["member"].isin(chosen)][["step", "member", metric]].rename(columns={metric: "value"})
    return rows.dropna(subset=["value"]).reset_index(drop=True)


def member_metrics(frame: pd.DataFrame) -> list[str]:
    """The chartable per-step figures a sweep's frame holds (loss first), for the member chart's picker."""
    numeric = [c for c in ("loss", "fvu", "l0", "dead_fraction", "lr", "aux_loss") if c in frame.columns]
    named = [c for c in frame.columns if c not in _FRAME_BASICS and c not in numeric]
    return [c for c in [*numeric, *named] if frame[c].notna().any()]


_FRAME_BASICS = {"member", "step", "tokens", "time", "peak_mem", "peak_mem_max", "mse", "tokens_per_s", "data_wait",
                 "disk_bytes"}  # fmt: skip


EVALUATION_COLUMNS = {
    "ce_loss_score": "CE loss recovered",
    "kl_div_score": "KL recovered",
    "ce_spliced": "CE with the SAE",
    "kl_spliced": "KL with the SAE",
    "explained_variance": "Explained variance",
    "eval_l0": "L0",
}


def evaluation_table(result: Mapping[str, Any], home: Path | None = None) -> pd.DataFrame:
    """An evaluation of several SAEs in one pass (model_eval.json's `saes`): a row per SAE, its folder
    (relative to `home` when inside it) and its figures; empty for a single SAE's result."""
    entries = result.get("saes")
    rows = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict):
            continue
        folder = str(entry.get("sae", ""))
        if home is not None and Path(folder).is_relative_to(home):
            folder = str(Path(folder).relative_to(home))
        rows.append({"SAE": folder, **{label: _float_or_none(entry.get(k)) for k, label in EVALUATION_COLUMNS.items()}})
    return pd.DataFrame(rows, columns=["SAE", *EVALUATION_COLUMNS.values()])
