"""Widgets shared by several pages (not a page itself: the router in app.py lists the pages)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path

import streamlit as st
from streamlit.runtime.scriptrunner import get_script_run_ctx

from sae_core import db, paths
from sae_core.architectures import ARCHITECTURE_NAMES, DEFAULT_ARCHITECTURE, architecture
from sae_core.config import ConfigError, JobConfig
from sae_core.data.catalog import list_models, list_texts, model_roots
from sae_core.db.health import DATABASE_ERRORS
from sae_core.files import SAE_ZIP_FILE
from sae_core.gpu.availability import recommend
from sae_core.gpu.history import latest_probe
from sae_core.jobs import submission
from sae_core.jobs.gpus import gpu_statuses
from sae_core.jobs.models import ModelFacts, ModelProblem, model_facts
from sae_core.jobs.submission import Submission, SubmissionRejected
from sae_core.outputs import build_sae_zip, zip_is_current
from sae_core.text import format_bytes, format_percent
from sae_core.ui import html, labels
from sae_core.ui.downloads import file_reader
from sae_core.ui.forms import OptionField, gpu_choice, option_fields, parse_option_text

NeedPerGpu = Callable[[int], int | None]  # GPUs → bytes each one needs (None: not known yet)


def live_fragment(body: Callable, run_every: float | None = 2):
    """`st.fragment(body, run_every=...)` for a part of a page that refreshes itself. It refreshes without
    app.py, whose router turns a database error into the database-problem page; so a database error during
    such a refresh reruns the whole app, where the router meets it again."""

    @functools.wraps(body)
    def guarded(*args, **kwargs):
        try:
            return body(*args, **kwargs)
        except DATABASE_ERRORS:
            ctx = get_script_run_ctx()
            if ctx is None or not ctx.fragment_ids_this_run:  # a whole run: the router is already around
                raise
            st.rerun(scope="app")

    return st.fragment(guarded, run_every=run_every)


def sae_download(container, sae_dir: Path, file_name: str, download_key: str, prepare_key: str) -> None:
    """Download button for the SAE zip, or a button that builds it first.

    The zip is built only when asked and opened only when the download is clicked (deferred data),
    so a multi-GB SAE is never read on a rerun."""
    zip_path = sae_dir / SAE_ZIP_FILE
    if zip_is_current(zip_path, sae_dir):
        container.download_button(
            f"Download SAE ({format_bytes(zip_path.stat().st_size)} zip)",
            data=file_reader(zip_path),
            file_name=file_name,
            mime="application/zip",
            on_click="ignore",
            key=download_key,
            icon=":material/download:",
            help=html.md(
                "On this machine: {} (for files too large for a browser download, copy it from there)", zip_path
            ),
        )
    elif container.button("Prepare SAE download", key=prepare_key, icon=":material/folder_zip:"):
        with st.spinner("Packing cfg.json, weights, sparsity and eval into a zip…"):
            build_sae_zip(sae_dir)
        st.rerun()


# --------------------------------------------------------------------------- where a job runs
def recommend_gpus(statuses, required: int, count: int, prefix: str) -> None:
    picks = recommend(required, count, statuses)
    for status in statuses:
        st.session_state[f"{prefix}_gpu_pick_{status.index}"] = status.index in picks
    st.session_state[f"{prefix}_recommend_note_md"] = (
        None
        if len(picks) == count
        else html.md("Only {} GPU(s) are free with room for {}.", len(picks), format_bytes(required))
    )


def recommend_row(statuses, need: NeedPerGpu, prefix: str) -> None:
    c1, c2 = st.columns([1, 2], vertical_alignment="bottom")
    count = c1.number_input("How many GPUs", min_value=1, max_value=len(statuses), value=1, key=f"{prefix}_gpu_count")
    c2.button(
        "Recommend",
        key=f"{prefix}_recommend",
        on_click=recommend_gpus,
        args=(statuses, need(count) or 0, count, prefix),
        icon=":material/auto_awesome:",
        help="Tick the idle GPUs with room for the estimate, closest together",
    )
    if note_md := st.session_state.get(f"{prefix}_recommend_note_md"):
        st.caption(note_md)


def gpu_row(status, required: int | None, prefix: str) -> bool:
    """One GPU: checkbox (disabled when busy, lost or too full), badges, memory bar. True if ticked."""
    row = gpu_choice(
        status.index,
        status.name,
        status.memory_used,
        status.memory_total,
        status.memory_free,
        status.util_gpu,
        None if status.available else (status.reason or "not available"),
        required,
    )
    key = f"{prefix}_gpu_pick_{status.index}"
    if not row.selectable and st.session_state.get(key):
        st.session_state[key] = False  # a GPU that became busy/too full is unticked, not silently used
    with st.container(border=True):
        c1, c2 = st.columns([2, 3], vertical_alignment="center")
        picked = c1.checkbox(html.md("GPU {}", status.index), key=key, disabled=not row.selectable)
        c1.caption(html.md("{} · util {}", status.name, format_percent(status.util_gpu)))
        badges_md = []
        if row.busy_reason:
            badges_md.append(html.badge(f"Busy: {row.busy_reason}", "orange"))
        if status.queue_note:
            badges_md.append(html.badge(status.queue_note.capitalize(), "blue"))
        if row.low_memory:
            badges_md.append(html.badge(f"Low memory: {format_bytes(status.memory_free)} free", "red"))
        if badges_md:
            c2.markdown(" ".join(badges_md))
        c2.markdown(html.memory_bar_html(status.memory_used, status.memory_total), unsafe_allow_html=True)
    return picked and row.selectable


def gpu_selector(statuses, need: NeedPerGpu | None, prefix: str) -> list[int]:
    """Recommend, then one row per GPU. Returns the ticked (and tickable) indices."""
    ticked_before = [s.index for s in statuses if st.session_state.get(f"{prefix}_gpu_pick_{s.index}")]
    # Low memory is judged against the estimate for the GPUs ticked so far (one when none is).
    required = need(max(1, len(ticked_before))) if need is not None else None
    if need is not None:
        recommend_row(statuses, need, prefix)
    return [s.index for s in statuses if gpu_row(s, required, prefix)]


def placement(statuses, probe, need: NeedPerGpu | None, prefix: str) -> tuple[list[int], int | None, list[str]]:
    """GPU rows, or a number of CPU processes on a machine without GPUs → (gpu_ids, cpu_procs, missing): what
    is still to choose (no GPU ticked). `need(world)`: the memory per GPU the job needs on `world` GPUs (None
    while it is not known)."""
    if statuses:
        gpu_ids = gpu_selector(statuses, need, prefix)
        if not gpu_ids:
            return [], None, [GPUS_MISSING]
        return gpu_ids, None, []
    st.caption(html.md("No NVIDIA GPU ({}): the job runs as CPU processes.", labels.no_gpu_reason(probe)))
    cpu_procs = int(st.number_input("CPU processes", min_value=1, max_value=64, value=2, key=f"{prefix}_cpu_procs"))
    return [], cpu_procs, []


# --------------------------------------------------------------------------- submitting
GPUS_MISSING = "GPUs: tick at least one free GPU (or press Recommend)"
NAME_MISSING = "your name: enter it so colleagues can see whose job this is"


def problems_and_submit(prefix: str, errors: list[str], missing: list[str], label_md: str, icon: str) -> bool:
    """A form's problems above its Submit button; True when it was pressed with nothing wrong or missing.

    A wrong value is an error at once and disables Submit. What is only missing (nothing chosen or typed
    yet) is a neutral hint until Submit is pressed, then an error: a page never opens in red."""
    tried = f"{prefix}_submit_tried"
    for message in errors + (missing if st.session_state.get(tried) else []):
        st.error(html.md_text(message), icon=":material/error:")
    if missing and not st.session_state.get(tried):
        st.info("\n".join(["To submit:", *(f"- {html.md_text(m)}" for m in missing)]), icon=":material/info:")
    if not st.button(label_md, key=f"{prefix}_submit", type="primary", disabled=bool(errors), icon=icon):
        return False
    if missing:
        st.session_state[tried] = True
        st.rerun()
    st.session_state.pop(tried, None)
    return True


def queued_link(job_id: int) -> None:
    st.page_link("views/jobs.py", label=html.md("Open job {}", job_id), query_params={"job": str(job_id)},
                 icon=":material/arrow_forward:")  # fmt: skip


# Queue a job from a page: (gpu_ids or None, cpu_procs, who, on_gpu) → the queued job (or the gate's refusal).
JobToQueue = Callable[[bool], JobConfig]  # on GPUs or not -> the config of the job


def queue_job_form(prefix: str, label_md: str, icon: str, noun: str, name: str, config: JobToQueue) -> None:
    """Where the job runs, who asks, and the button that queues the job `config` gives, named `name`, through
    the gate: every problem shown beside it, or a link to the queued job."""
    engine = db.get_engine()
    probe = latest_probe(engine)
    statuses = gpu_statuses(engine, snapshot=probe) if probe is not None and probe.gpus else []
    user = st.text_input("Your name", key=f"{prefix}_user", value=st.session_state.get("user_name", ""))
    gpu_ids, cpu_procs, missing = placement(statuses, probe, None, prefix)
    if not user.strip():
        missing.append(NAME_MISSING)
    if not problems_and_submit(prefix, [], missing, label_md, icon):
        return
    st.session_state["user_name"] = user
    try:
        where = Submission(gpu_ids or None, cpu_procs, name=name, submitted_by=user.strip())
        job, _ = submission.submit(config(bool(statuses)), where)
    except (ConfigError, SubmissionRejected) as exc:
        for problem in getattr(exc, "problems", None) or [exc]:
            st.error(html.md_text(problem), icon=":material/error:")
        return
    st.success(html.md("{} job {} queued.", noun, job.id))
    queued_link(job.id)


def architecture_picker(prefix: str) -> str:
    """The architecture selector (its description beside it), every registered architecture offered."""
    arch = st.selectbox(
        "Architecture", ARCHITECTURE_NAMES, index=ARCHITECTURE_NAMES.index(DEFAULT_ARCHITECTURE), key=f"{prefix}_arch",
        format_func=lambda name: f"{name}: {architecture(name).description}",
    )  # fmt: skip
    return arch


def architecture_options(prefix: str, arch: str) -> tuple[dict, list[str]]:
    """The widgets of `arch`'s options, rendered from its options model (the advanced ones in an expander):
    (the values the person gave, problems with what was typed). A blank optional field keeps the default."""
    fields = option_fields(arch)
    values: dict = {}
    problems: list[str] = []
    main = [f for f in fields if not f.advanced]
    columns = st.columns(max(1, min(3, len(main)))) if main else []
    for i, option in enumerate(main):
        _option_widget(columns[i % len(columns)], prefix, option, values, problems)
    advanced = [f for f in fields if f.advanced]
    if advanced:
        with st.expander(html.md("More {} options", arch)):
            for option in advanced:
                _option_widget(st, prefix, option, values, problems)
    return values, problems


def _option_widget(where, prefix: str, option: OptionField, values: dict, problems: list[str]) -> None:
    key = f"{prefix}_{option.name}"
    label_md, tip_md = (
        html.md_text(option.label),
        html.md_text(option.help),
    )  # our words, but shown as text all the same
    if option.kind == "choice":
        values[option.name] = where.selectbox(
            label_md, option.choices, index=option.choices.index(option.default), key=key, help=tip_md
        )
    elif option.kind == "bool":
        values[option.name] = where.checkbox(label_md, value=bool(option.default), key=key, help=tip_md)
    elif option.optional or option.kind == "ints":
        placeholder = "default" if option.default is None else f"default {option.default}"
        typed = where.text_input(label_md, key=key, placeholder=placeholder, help=tip_md)
        value, problem = parse_option_text(option, typed)
        if problem:
            problems.append(problem)
        elif value is not None:
            values[option.name] = value
    else:
        kind = int if option.kind == "int" else float  # Streamlit wants every number of one type
        low, high = (None if bound is None else kind(bound) for bound in (option.minimum, option.maximum))
        number = where.number_input(
            label_md, value=kind(option.default), min_value=low, max_value=high,
            step=1 if kind is int else None, format=None if kind is int else "%g", key=key, help=tip_md,
        )  # fmt: skip
        values[option.name] = number


# --------------------------------------------------------------------------- a model and a text (Extract, Train)
OTHER = "Other…"
_LAYER = re.compile(r"\.(layers|h|layer|blocks)\.(\d+)$")


def picker(label_md: str, options: list[str], key: str, placeholder: str, help_md: str) -> str:
    """A choice among known entries, or a typed path/name."""
    choice = st.selectbox(label_md, [*options, OTHER], key=key, help=help_md)
    typed = st.text_input(
        f"…or another {label_md.lower()}", key=f"{key}_typed", placeholder=placeholder, disabled=choice != OTHER
    )
    return (typed or "").strip() if choice == OTHER else choice


def default_hook(hooks: list[str]) -> int:
    """The middle block of the model (a residual stream output), else the first module."""
    layers = [i for i, path in enumerate(hooks) if _LAYER.search(path)]
    return layers[len(layers) // 2] if layers else 0


def model_picker(prefix: str) -> tuple[str, ModelFacts | None, str | None]:
    """The model (known ones, or typed), read by the gate's own means: (name, facts, the problem reading it)."""
    home = paths.lab_home()
    found = list_models(home)
    models_dir, cache_dir = model_roots(home)[:2]
    model = picker(
        "Model", found, f"{prefix}_model", "/models/gemma-2-2b or org/name",
        "Folders in SAE_LAB_HOME/models and models in the local Hugging Face cache",
    )  # fmt: skip
    where_md = html.md_text(labels.model_sources(found, models_dir, cache_dir))
    if found:
        st.caption(where_md)
    else:
        st.info(where_md, icon=":material/info:")
    if not model:
        return model, None, None
    try:
        with st.spinner("Reading the model's modules…"):
            facts = model_facts(model)
    except ModelProblem as exc:
        return model, None, str(exc)
    st.caption(html.md_text(f"{facts.cls}, {facts.parameters:,} parameters ({facts.dtype})"))
    return model, facts, None


def text_picker(prefix: str) -> tuple[str, str, str]:
    """The text dataset (known ones, or typed), its text field and split."""
    texts = [str(p) for p in list_texts(paths.datasets_dir())]
    dataset = picker(
        "Text dataset", texts, f"{prefix}_dataset", "/data/corpus.jsonl or org/dataset",
        "Text files and folders in SAE_LAB_HOME/datasets (.txt, .jsonl, .json, .parquet, datasets.save_to_disk)",
    )  # fmt: skip
    c1, c2 = st.columns(2)
    field = c1.text_input("Text field", value="text", key=f"{prefix}_field")
    split = c2.text_input("Split", value="train", key=f"{prefix}_split")
    return dataset, field, split
