"""Train: the run's settings, where it runs (GPUs with a memory estimate, or CPU processes), and Submit.

Whether a submission may be queued is decided by the same gate as the CLI's (`jobs.submission`): the page
shows its problems as the person types (without the full value scan) and submits through it.
"""

from __future__ import annotations

import streamlit as st

from sae_core import db, paths
from sae_core.architectures import ARCHITECTURE_NAMES, architecture
from sae_core.data.activations import open_activations
from sae_core.data.catalog import OUTSIDE_ROOTS, in_data_roots, list_datasets
from sae_core.data.formats import DatasetError
from sae_core.gpu import memory, scaling
from sae_core.gpu.availability import recommend
from sae_core.gpu.history import latest_probe
from sae_core.jobs import submission
from sae_core.jobs.gpus import gpu_statuses
from sae_core.text import format_bytes, format_percent
from sae_core.ui import frames, html, labels
from sae_core.ui.forms import FormValues, form_to_config, gpu_choice, path_mtime

OTHER_PATH = "Other path…"


@st.cache_resource(ttl=60, max_entries=16, show_spinner=False)
def open_dataset(path: str, key: str, mtime: float):  # noqa: ARG001  (mtime: part of the cache key)
    """Memory-maps the set (header reads only); `mtime` in the key re-opens a rewritten file."""
    return open_activations(path, key)


def dataset_widgets() -> tuple[str, object | None, list[str]]:
    """The chosen activation source, the opened set (for d_in and rows) and any problem with it."""
    names = [p.name for p in list_datasets(paths.datasets_dir())]
    choice = st.selectbox("Dataset", [*names, OTHER_PATH], key="train_dataset", help="Sets in SAE_LAB_HOME/datasets")
    typed = st.text_input(
        "…or the path of an activation file / shard folder",
        key="train_dataset_path",
        placeholder="/data/acts/layer12",
        disabled=choice != OTHER_PATH,
    )
    source = str(paths.datasets_dir() / choice) if choice != OTHER_PATH else (typed or "").strip()
    if not source:
        return "", None, []
    if not in_data_roots(source, paths.lab_home()):
        return source, None, [f"dataset: {OUTSIDE_ROOTS}"]
    try:
        dataset = open_dataset(source, "activations", path_mtime(source))
    except DatasetError as exc:
        return source, None, [f"dataset: {exc}"]
    st.caption(html.md_text(dataset.describe()))
    return source, dataset, []


def model_widgets(d_in: int | None) -> FormValues:
    arch = st.selectbox("Architecture", ARCHITECTURE_NAMES, index=ARCHITECTURE_NAMES.index("topk"), key="train_arch")
    c1, c2 = st.columns(2)
    size_mode = c1.radio(
        "Size by",
        ["d_sae", "expansion"],
        key="train_size_mode",
        horizontal=True,
        format_func={"d_sae": "d_sae", "expansion": "expansion factor × d_in"}.get,
    )
    if size_mode == "d_sae":
        d_sae = c2.number_input("d_sae (latents)", value=4096, step=1024, key="train_d_sae")
        expansion = None
    else:
        expansion = c2.number_input("Expansion factor", value=8.0, step=1.0, key="train_expansion")
        d_sae = None
        if d_in:
            c2.caption(f"d_sae = {expansion:g} × {d_in} = {round(expansion * d_in):,}")
    spec = architecture(arch)
    if spec.uses_k:
        k = st.number_input("k (active latents per token)", value=32, step=1, key="train_k")
        l1 = None
    else:
        l1 = st.number_input(f"{spec.penalty} coefficient", value=5.0, step=0.5, format="%g", key="train_l1")
        k = None
    c1, c2 = st.columns(2)
    batch = c1.number_input("Global batch (tokens per step)", value=4096, step=512, key="train_batch")
    steps = c2.number_input("Steps", value=1000, step=100, key="train_steps")
    c1, c2, c3 = st.columns(3)
    lr = c1.text_input("Learning rate", key="train_lr", placeholder="auto: 2e-4/√(d_sae/16384)")
    warmup = c2.text_input("Warm-up steps", key="train_warmup", placeholder="auto: 1% of steps")
    decay = c3.text_input("Decay steps (linear to 0)", key="train_decay", placeholder="auto: last 20%")
    c1, c2, c3 = st.columns(3)
    dtype = c1.selectbox("Weights dtype", ["float32", "bfloat16"], key="train_dtype")
    autocast = c2.checkbox("bf16 autocast (CUDA)", key="train_autocast")
    ckpt = c3.number_input("Checkpoint every (steps)", value=1000, step=100, key="train_ckpt")
    return FormValues(
        activation_source="",
        architecture=arch,
        size_mode=size_mode,
        d_sae=d_sae,
        expansion_factor=expansion,
        d_in=d_in,
        k=k,
        l1_coefficient=l1,
        batch_size=batch,
        total_steps=steps,
        lr=lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        dtype=dtype,
        autocast=autocast,
        checkpoint_every=ckpt,
    )


def recommend_gpus(statuses, required: int, count: int) -> None:
    picks = recommend(required, count, statuses)
    for status in statuses:
        st.session_state[f"gpu_pick_{status.index}"] = status.index in picks
    st.session_state["train_recommend_note"] = (
        None if len(picks) == count else f"Only {len(picks)} GPU(s) are free with room for {format_bytes(required)}."
    )


def per_gpu_bytes(cfg, world: int, d_in: int | None) -> int | None:
    """The estimate for `world` GPUs, or None while the config, dataset or batch split is not valid."""
    if cfg is None or d_in is None or cfg.batch_size % world:
        return None
    return memory.estimate(cfg, world, d_in=d_in).total_bytes


def recommend_row(statuses, cfg, d_in: int | None, required: int | None) -> None:
    if cfg is None or d_in is None:
        return
    c1, c2 = st.columns([1, 2], vertical_alignment="bottom")
    count = c1.number_input("How many GPUs", min_value=1, max_value=len(statuses), value=1, key="train_gpu_count")
    need = per_gpu_bytes(cfg, count, d_in) or required
    c2.button(
        "Recommend",
        key="train_recommend",
        on_click=recommend_gpus,
        args=(statuses, need or 0, count),
        icon=":material/auto_awesome:",
        help="Tick the idle GPUs with room for the estimate, closest together",
    )
    if note := st.session_state.get("train_recommend_note"):
        st.caption(note)


def gpu_row(status, required: int | None) -> bool:
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
    key = f"gpu_pick_{status.index}"
    if not row.selectable and st.session_state.get(key):
        st.session_state[key] = False  # a GPU that became busy/too full is unticked, not silently used
    with st.container(border=True):
        c1, c2 = st.columns([2, 3], vertical_alignment="center")
        picked = c1.checkbox(f"GPU {status.index}", key=key, disabled=not row.selectable)
        c1.caption(f"{status.name} · util {format_percent(status.util_gpu)}")
        badges = []
        if row.busy_reason:
            badges.append(html.badge(f"Busy: {row.busy_reason}", "orange"))
        if status.queue_note:
            badges.append(html.badge(status.queue_note.capitalize(), "blue"))
        if row.low_memory:
            badges.append(html.badge(f"Low memory: {format_bytes(status.memory_free)} free", "red"))
        if badges:
            c2.markdown(" ".join(badges))
        c2.markdown(html.memory_bar_html(status.memory_used, status.memory_total), unsafe_allow_html=True)
    return picked and row.selectable


def gpu_selector(statuses, cfg, d_in: int | None) -> list[int]:
    """Recommend, then one row per GPU. Returns the ticked (and tickable) indices."""
    ticked_before = [s.index for s in statuses if st.session_state.get(f"gpu_pick_{s.index}")]
    # Low memory is judged against the estimate for the GPUs ticked so far (one when none is).
    required = per_gpu_bytes(cfg, max(1, len(ticked_before)), d_in)
    recommend_row(statuses, cfg, d_in, required)
    return [s.index for s in statuses if gpu_row(s, required)]


def estimate_panel(cfg, world: int, d_in: int, gpus) -> None:
    estimate = memory.estimate(cfg, world, d_in=d_in)
    st.metric("Estimated memory per GPU", format_bytes(estimate.total_bytes))
    st.caption(
        f"{world} rank(s) × {estimate.per_rank_batch:,} tokens per rank per step · peak during {estimate.peak_phase}"
    )
    if speedups := scaling.speedup_labels(cfg, d_in, gpus):
        st.caption("Predicted speed-up: " + " · ".join(speedups), help=scaling.__doc__)
    with st.expander("Breakdown"):
        st.dataframe(frames.breakdown_frame(estimate.breakdown, memory.TERM_LABELS), hide_index=True, width="stretch")


def placement(statuses, probe, cfg, d_in: int | None) -> tuple[list[int], int | None, list[str]]:
    """GPU rows, or a number of CPU processes on a machine without GPUs → (gpu_ids, cpu_procs, errors)."""
    if statuses:
        gpu_ids = gpu_selector(statuses, cfg, d_in)
        if not gpu_ids:
            return [], None, ["GPUs: tick at least one free GPU (or press Recommend)"]
        return gpu_ids, None, []
    st.caption(f"No NVIDIA GPU ({html.md_text(labels.no_gpu_reason(probe))}): the job runs as CPU processes (gloo).")
    cpu_procs = int(st.number_input("CPU processes", min_value=1, max_value=64, value=2, key="train_cpu_procs"))
    return [], cpu_procs, []


def submit(engine, cfg, gpu_ids: list[int], cpu_procs: int | None, name: str, user: str) -> None:
    try:
        with st.spinner("Checking the activations…"):
            job, _ = submission.submit(cfg, gpu_ids or None, cpu_procs, name=name, submitted_by=user, engine=engine)
    except submission.SubmissionRejected as exc:
        for problem in exc.problems:
            st.error(html.md_text(problem), icon=":material/error:")
    else:
        st.session_state["train_submitted"] = job.id


st.title("Train an SAE")
engine = db.get_engine()
probe = latest_probe(engine)
statuses = gpu_statuses(engine, snapshot=probe) if probe is not None and probe.gpus else []
form_col, place_col = st.columns([3, 2], gap="large")

with form_col:
    source, dataset, errors = dataset_widgets()
    d_in = dataset.d_in if dataset is not None else None
    values = model_widgets(d_in)
    values.activation_source = source
    values.device = "auto" if statuses else "cpu"
    c1, c2 = st.columns(2)
    job_name = c1.text_input("Job name", key="train_name", placeholder="e.g. l12-topk-16k")
    user = c2.text_input("Your name", key="train_user", value=st.session_state.get("user_name", ""))
    st.session_state["user_name"] = user  # survives leaving the page (widget state does not)
    submit_box = st.container()

cfg, config_errors = form_to_config(values)
errors += config_errors
if not user.strip():
    errors.append("your name: enter it so colleagues can see whose job this is")

with place_col:
    st.subheader("Where it runs")
    estimate_box = st.container()  # filled once the ticked GPUs are known
    gpu_ids, cpu_procs, placement_errors = placement(statuses, probe, cfg, d_in)
errors += placement_errors
world = len(gpu_ids) or cpu_procs or 1
notes: list[str] = []
if cfg is not None and dataset is not None and not placement_errors:
    # The gate, without the full value scan (Submit does that): every rule the CLI applies.
    verdict = submission.check(
        cfg,
        gpu_ids or None,
        cpu_procs,
        name=job_name,
        submitted_by=user.strip(),
        scan_values=False,
        statuses=statuses,
        engine=engine,
    )
    errors += [str(problem) for problem in verdict.problems]
    notes = verdict.notes

with estimate_box:
    if cfg is not None and d_in is not None and cfg.batch_size % world == 0:
        if statuses:
            estimate_panel(cfg, world, d_in, probe.gpus)
        else:
            st.caption(f"{world} process(es) × {cfg.batch_size // world:,} tokens each per step")

with submit_box:
    for message in errors:
        st.error(html.md_text(message), icon=":material/error:")
    for note in notes:
        st.info(html.md_text(note), icon=":material/schedule:")
    if st.button("Submit", key="train_submit", type="primary", disabled=bool(errors), icon=":material/send:"):
        submit(engine, cfg, gpu_ids, cpu_procs, job_name, user.strip())
    if job_id := st.session_state.get("train_submitted"):
        st.success(f"Job {job_id} queued.")
        st.page_link(
            "views/jobs.py",
            label=f"Open job {job_id}",
            query_params={"job": str(job_id)},
            icon=":material/arrow_forward:",
        )
