"""Pure helpers behind the web pages: formatting, chart frames, form parsing, downloads.

Nothing here imports Streamlit, so every rule the pages rely on is unit-tested
without a browser. The pages call these, then render.
"""

from __future__ import annotations

import copy
import functools
import hmac
import io
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .config import ConfigError, TrainConfig

# --------------------------------------------------------------------------- formatting

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float | None) -> str:
    """`12.3 GiB`; `—` when unknown (NVML may not report a figure)."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float | None) -> str:
    """`0:01:05`, `2 d 03:04:05`; `—` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "—"
    total = int(round(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days} d {hours:02d}:{minutes:02d}:{secs:02d}" if days else clock


def format_rate(tokens_per_s: float | None) -> str:
    if tokens_per_s is None or not math.isfinite(tokens_per_s):
        return "—"
    return f"{tokens_per_s:,.0f} tok/s"


def format_percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}%"


# --------------------------------------------------------------------------- memory bars and badges

# Thresholds from the GPU-selector design: >90 % used is red, >70 % yellow, else green.
MEMORY_RED_ABOVE = 90.0
MEMORY_YELLOW_ABOVE = 70.0
_BAR_COLOURS = {"red": "#ef4444", "yellow": "#eab308", "green": "#10b981"}


def memory_fraction(used: float | None, total: float | None) -> float | None:
    if used is None or not total:
        return None
    return max(0.0, min(1.0, used / total))


def memory_colour(used: float | None, total: float | None) -> str:
    """'red' | 'yellow' | 'green' (grey when unknown)."""
    frac = memory_fraction(used, total)
    if frac is None:
        return "grey"
    percent = frac * 100
    if percent > MEMORY_RED_ABOVE:
        return "red"
    if percent > MEMORY_YELLOW_ABOVE:
        return "yellow"
    return "green"


def memory_bar_html(used: float | None, total: float | None) -> str:
    """A thin coloured bar with `used / total` under it, for st.html/markdown."""
    frac = memory_fraction(used, total) or 0.0
    colour = _BAR_COLOURS.get(memory_colour(used, total), "#9ca3af")
    label = f"{format_bytes(used)} / {format_bytes(total)}"
    return (
        f'<div class="sae-membar" data-colour="{memory_colour(used, total)}" '
        'style="background:#e5e7eb;border-radius:4px;height:8px;overflow:hidden">'
        f'<div style="width:{frac * 100:.1f}%;height:8px;background:{colour}"></div></div>'
        f'<div style="font-size:0.8em;color:#6b7280">Memory {label}</div>'
    )


def badge(text: str, colour: str) -> str:
    """Streamlit markdown badge; brackets in `text` are escaped so names cannot break it."""
    safe = text.replace("[", "(").replace("]", ")")
    return f":{colour}-badge[{safe}]"


# --------------------------------------------------------------------------- access gate


def configured_password(env: Mapping[str, str], secrets_get: Callable[[str], Any] | None = None) -> str | None:
    """SAE_LAB_PASSWORD from the environment, else from st.secrets; None (or empty) = no gate."""
    value = env.get("SAE_LAB_PASSWORD")
    if not value and secrets_get is not None:
        try:
            value = secrets_get("SAE_LAB_PASSWORD")
        except Exception:  # no secrets.toml at all is the common case, not an error
            value = None
    return str(value) if value else None


def password_matches(given: str, expected: str) -> bool:
    """Constant-time compare, so response time does not leak how much of a guess was right."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


# --------------------------------------------------------------------------- datasets

DATASET_SUFFIXES = (".safetensors", ".npy")
TOY_DEFAULTS = {"tokens": 65_536, "d_in": 64, "features": 256, "seed": 0}
TOY_FILE_NAME = "toy.safetensors"


def list_datasets(datasets_dir: Path) -> list[Path]:
    """Activation sets in the datasets folder: files of a known kind, and shard directories."""
    if not datasets_dir.is_dir():
        return []
    found = []
    for entry in sorted(datasets_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix in DATASET_SUFFIXES:
            found.append(entry)
        elif entry.is_dir() and any(p.suffix in DATASET_SUFFIXES for p in entry.iterdir()):
            found.append(entry)
    return found


# --------------------------------------------------------------------------- training form


@dataclass
class FormValues:
    """What the Train page's widgets hold, before it is a TrainConfig."""

    activation_source: str
    architecture: str = "topk"
    size_mode: str = "d_sae"  # "d_sae" | "expansion"
    d_sae: int | None = 4096
    expansion_factor: float | None = 8.0
    d_in: int | None = None  # from the dataset, needed for the expansion factor
    k: int | None = 32
    l1_coefficient: float | None = 5.0
    batch_size: int | None = 4096
    total_steps: int | None = 1000
    lr: str = ""  # text: blank = the documented default
    lr_warmup_steps: str = ""
    lr_decay_steps: str = ""
    dtype: str = "float32"
    autocast: bool = False
    checkpoint_every: int | None = 1000
    device: str = "auto"
    extra: dict = field(default_factory=dict)


def _optional_number(text: str, name: str, kind: type, errors: list[str]) -> Any:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number such as 3e-4"
        errors.append(f"{name}: {text!r} is not {what} (leave blank for the default)")
        return None


def resolve_d_sae(values: FormValues, errors: list[str]) -> int | None:
    if values.size_mode == "d_sae":
        return values.d_sae
    if values.expansion_factor is None or values.expansion_factor <= 0:
        errors.append("expansion factor: must be greater than 0")
        return None
    if not values.d_in:
        errors.append("expansion factor: needs a readable dataset to know d_in; pick a dataset or give d_sae")
        return None
    return int(round(values.expansion_factor * values.d_in))


def form_to_config(values: FormValues) -> tuple[TrainConfig | None, list[str]]:
    """TrainConfig from the form, or the list of problems (each names its field and what is allowed)."""
    errors: list[str] = []
    if not values.activation_source.strip():
        errors.append("dataset: choose a dataset or enter the path of an activation file or shard directory")
    data: dict[str, Any] = {
        "activation_source": values.activation_source.strip(),
        "architecture": values.architecture,
        "d_sae": resolve_d_sae(values, errors),
        "batch_size": values.batch_size,
        "total_steps": values.total_steps,
        "lr": _optional_number(values.lr, "lr", float, errors),
        "lr_warmup_steps": _optional_number(values.lr_warmup_steps, "lr_warmup_steps", int, errors),
        "lr_decay_steps": _optional_number(values.lr_decay_steps, "lr_decay_steps", int, errors),
        "dtype": values.dtype,
        "autocast": "bf16" if values.autocast else None,
        "checkpoint_every": values.checkpoint_every,
        "device": values.device,
        **values.extra,
    }
    # Only the sparsity knob of the chosen architecture is sent; the other keeps its default.
    if values.architecture in ("topk", "batchtopk"):
        data["k"] = values.k
    else:
        data["l1_coefficient"] = values.l1_coefficient
    if errors:
        return None, errors
    try:
        return TrainConfig.from_dict(data), []
    except ConfigError as exc:
        return None, split_config_error(str(exc))


def split_config_error(message: str) -> list[str]:
    """ConfigError joins problems with '; ' — one line each for the page."""
    return [part.strip() for part in message.split("; ") if part.strip()]


def world_size_errors(cfg: TrainConfig, world_size: int) -> list[str]:
    try:
        cfg.per_rank_batch(world_size)
    except ConfigError as exc:
        return [f"batch_size: {exc}"]
    return []


# --------------------------------------------------------------------------- GPU selector rows


@dataclass(frozen=True)
class GpuChoice:
    """One row of the GPU selector, decided from the GPU's status and the per-GPU estimate."""

    index: int
    name: str
    memory_used: int | None
    memory_total: int | None
    memory_free: int | None
    util_gpu: float | None
    busy_reason: str | None
    low_memory: bool

    @property
    def selectable(self) -> bool:
        return self.busy_reason is None and not self.low_memory


def gpu_choice(
    index: int,
    name: str,
    memory_used: int | None,
    memory_total: int | None,
    memory_free: int | None,
    util_gpu: float | None,
    busy_reason: str | None,
    required_bytes: int | None,
) -> GpuChoice:
    low = required_bytes is not None and memory_free is not None and memory_free < required_bytes
    return GpuChoice(index, name, memory_used, memory_total, memory_free, util_gpu, busy_reason, low)


# --------------------------------------------------------------------------- jobs table


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


JOB_TABLE_COLUMNS = ["ID", "Name", "Status", "Progress", "Step", "ETA", "GPUs", "Tokens/s", "Submitted by", "Submitted"]


def jobs_table(jobs: Iterable[Any], now: float) -> pd.DataFrame:
    """One row per job (objects with the Job table's attributes), newest first as given."""
    rows = []
    for job in jobs:
        rows.append(
            {
                "ID": job.id,
                "Name": job.name,
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


# --------------------------------------------------------------------------- metric charts

CHART_METRICS = ("loss", "fvu", "l0", "dead_fraction", "lr")


def downsample_rows(frame: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """Every n-th row so at most ~max_points remain; the last row is always kept (the latest value)."""
    if len(frame) <= max_points:
        return frame
    stride = math.ceil(len(frame) / max_points)
    picked = frame.iloc[::stride]
    if picked.index[-1] != frame.index[-1]:
        picked = pd.concat([picked, frame.iloc[[-1]]])
    return picked


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


# --------------------------------------------------------------------------- logs


def tail_text(path: Path, max_bytes: int = 16_384) -> str:
    """The end of a (possibly huge) log without reading all of it."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes and "\n" in text:
        text = text.split("\n", 1)[1]  # drop the partial first line
    return text


# --------------------------------------------------------------------------- SAE files and downloads

SAE_ZIP_MEMBERS = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "eval.json")
SAE_REQUIRED = ("cfg.json", "sae_weights.safetensors")
ZIP_NAME = "sae.zip"


def is_trained_sae(directory: Path) -> bool:
    return all((directory / name).is_file() for name in SAE_REQUIRED)


def find_trained_saes(home: Path) -> list[Path]:
    """Every directory under `home` holding cfg.json + sae_weights.safetensors (checkpoints excluded)."""
    found = []
    for root, dirs, files in os.walk(home):
        # Checkpoint dirs hold intermediate states, logs and datasets hold no SAEs: don't descend.
        dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "logs", "datasets") and not d.startswith("."))
        if "cfg.json" in files and "sae_weights.safetensors" in files:
            found.append(Path(root))
    return sorted(found, key=_sae_sort_key)


def _sae_sort_key(path: Path) -> tuple:
    # jobs/<id> sorted numerically, newest (largest id) first; others by path after them.
    try:
        return (0, -int(path.name), str(path))
    except ValueError:
        return (1, 0, str(path))


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def zip_is_current(zip_path: Path, sae_dir: Path) -> bool:
    """The prepared zip exists and is newer than every file it packs."""
    if not zip_path.is_file():
        return False
    zip_mtime = zip_path.stat().st_mtime
    for name in SAE_ZIP_MEMBERS:
        member = sae_dir / name
        if member.is_file() and member.stat().st_mtime > zip_mtime:
            return False
    return True


def build_sae_zip(sae_dir: Path, zip_path: Path | None = None) -> Path:
    """Pack the SAE files into `sae_dir/sae.zip` without compression (weights don't compress, and
    ZIP_STORED copies in chunks so a multi-GB SAE never sits in memory). Written beside, then renamed,
    so a half-written zip is never offered."""
    if not is_trained_sae(sae_dir):
        raise FileNotFoundError(f"{sae_dir} holds no trained SAE (needs {' and '.join(SAE_REQUIRED)})")
    zip_path = zip_path or sae_dir / ZIP_NAME
    partial = zip_path.with_name(zip_path.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in SAE_ZIP_MEMBERS:
            member = sae_dir / name
            if member.is_file():
                zf.write(member, arcname=name)
    os.replace(partial, zip_path)
    return zip_path


def file_reader(path: Path) -> Callable[[], io.BufferedReader]:
    """A zero-argument callable for st.download_button's deferred `data`: the file is opened only
    when the user clicks, never during a rerun."""

    def open_file() -> io.BufferedReader:
        return open(path, "rb")

    return open_file


def metrics_csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode("utf-8")


# --------------------------------------------------------------------------- SAEs page

DEAD_LOG10 = -9.99  # train.py clamps frequencies at 1e-10 before log10: that value means "never fired"


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
    import numpy as np

    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    return counts.astype(int), edges


def dead_latents(log10_freq: Iterable[float], floor: float = DEAD_LOG10) -> int:
    values = pd.Series(list(log10_freq), dtype="float64")
    return int((values.isna() | (values <= floor)).sum())


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


# --------------------------------------------------------------------------- sidebar

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


def power_label(power_w: float | None, limit_w: float | None) -> str:
    if power_w is None:
        return "—"
    return f"{power_w:.0f} / {limit_w:.0f} W" if limit_w else f"{power_w:.0f} W"


# --------------------------------------------------------------------------- chart specs
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
    import altair as alt

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
    import altair as alt

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


def firing_histogram_spec() -> dict:
    return copy.deepcopy(_firing_histogram_spec())


@functools.cache
def _firing_histogram_spec() -> dict:
    import altair as alt

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


# --------------------------------------------------------------------------- train page extras

# Submit scans every value for NaN/Inf only up to this size; larger sets are scanned by rank 0
# when the job starts, so the page never blocks for minutes.
SCAN_ON_SUBMIT_BYTES = 2 * 1024**3


def path_mtime(path: str | Path) -> float:
    """Modification time, 0 when missing: a cache key that changes when a dataset is rewritten."""
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def breakdown_frame(breakdown: Mapping[str, int], labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Memory estimate terms, largest first, with readable names and sizes; zero terms are left out."""
    items = sorted(((k, v) for k, v in breakdown.items() if v), key=lambda kv: -kv[1])
    labels = labels or {}
    return pd.DataFrame({"part": [labels.get(k, k) for k, _ in items], "memory": [format_bytes(v) for _, v in items]})


def parse_job_param(value: str | None) -> int | None:
    """?job=12 → 12; anything else (missing, junk, negative) → None rather than an error."""
    try:
        job_id = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return job_id if job_id > 0 else None


def read_log10_frequency(path: Path):
    """The per-latent log10 firing frequency from sparsity.safetensors (numpy; None if absent/unreadable)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError):
        return None
    values = tensors.get("sparsity")
    if values is None and tensors:
        values = next(iter(tensors.values()))
    return None if values is None else values.astype("float64").ravel()


_EVAL_LABELS = {
    "fvu": ("FVU", "{:.4f}"),
    "l0": ("L0", "{:.1f}"),
    "dead_fraction": ("Dead fraction", "{:.1%}"),
    "mmcs": ("MMCS (feature recovery)", "{:.3f}"),
    "tokens_per_s": ("Tokens/s", "{:,.0f}"),
    "steps": ("Steps", "{:,}"),
}


def eval_figures(figures: Mapping[str, Any]) -> dict[str, str]:
    """eval.json → labelled, formatted figures in a fixed order; missing or odd values are skipped."""
    shown = {}
    for key, (label, fmt) in _EVAL_LABELS.items():
        value = figures.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            shown[label] = fmt.format(int(value) if fmt == "{:,}" else value)
    return shown
