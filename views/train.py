"""Train: the run's settings, where it runs (GPUs with a memory estimate, or CPU processes), and Submit.

Whether a submission may be queued is decided by the same gate as the CLI's (`jobs.submission`): the page
shows its problems as the person types (without the full value scan) and submits through it. With "Train a grid
of SAEs" on, the settings are the base of a sweep (every combination of the values typed), queued as one job.
"From a model" streams the activations from a model's hooks over a text instead of activation files (the Extract
page's pickers); several hooks are a sweep over `hook`, fed by one forward.
"""

from __future__ import annotations

import streamlit as st

from sae_core import db, paths
from sae_core.architectures import ARCHITECTURE_NAMES
from sae_core.data.activations import open_activations
from sae_core.data.catalog import OUTSIDE_ROOTS, in_data_roots, list_datasets, list_extracted
from sae_core.data.formats import DatasetError
from sae_core.data.manifest import read_manifest
from sae_core.gpu import memory, scaling
from sae_core.gpu.history import latest_probe
from sae_core.jobs import submission
from sae_core.jobs.gpus import gpu_statuses
from sae_core.jobs.stream_checks import keys_of, stream_source
from sae_core.jobs.submission import Submission
from sae_core.model_source import DEFAULT_MIXING_CONTEXTS
from sae_core.sweep import PLACEMENTS, Sweep
from sae_core.text import format_bytes
from sae_core.ui import frames, html
from sae_core.ui.forms import (
    MISSING,
    FormValues,
    StreamValues,
    SweepValues,
    form_to_config,
    form_to_sweep,
    path_mtime,
    suggested_cache_to,
    sweep_fields,
    sweep_layouts,
    sweep_need,
)
from views.widgets import (
    NAME_MISSING,
    architecture_options,
    architecture_picker,
    default_hook,
    model_picker,
    placement,
    problems_and_submit,
    queued_link,
    text_picker,
)

OTHER_PATH = "Other path…"


@st.cache_resource(ttl=60, max_entries=16, show_spinner=False)
def open_dataset(path: str, key: str, mtime: float):  # noqa: ARG001  (mtime: part of the cache key)
    """Memory-maps the set (header reads only); `mtime` in the key re-opens a rewritten file."""
    return open_activations(path, key)


def dataset_options() -> dict[str, str]:
    """label → path: the sets in SAE_LAB_HOME/datasets, then the lab's extractions with their provenance."""
    options = {str(p.relative_to(paths.datasets_dir())): str(p) for p in list_datasets(paths.datasets_dir())}
    for folder in list_extracted(paths.lab_home()):
        try:
            manifest = read_manifest(folder)
        except DatasetError:
            continue  # a broken manifest: the folder is not offered (typing its path shows why)
        if manifest is not None:
            origin = manifest.provenance
            model = str(origin.get("model", "?")).rstrip("/").rsplit("/", 1)[-1]
            job = folder.relative_to(paths.jobs_dir())
            options[f"job {job}: {model} · {origin.get('hook', '?')} · {manifest.n_rows:,} rows"] = str(folder)
    return options


def dataset_widgets() -> tuple[str, object | None, list[str]]:
    """The chosen activation source, the opened set (for d_in and rows) and any problem with it."""
    options = dataset_options()
    choice = st.selectbox(
        "Dataset", [*options, OTHER_PATH], key="train_dataset",
        help="Sets in SAE_LAB_HOME/datasets, then the lab's extractions (model · hook · rows)",
    )  # fmt: skip
    typed = st.text_input(
        "…or the path of an activation file / shard folder",
        key="train_dataset_path",
        placeholder="/data/acts/layer12",
        disabled=choice != OTHER_PATH,
    )
    source = options[choice] if choice != OTHER_PATH else (typed or "").strip()
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


SOURCES = ("Activation files", "From a model")


def stream_widgets() -> tuple[StreamValues, object | None, list[str]]:
    """ "From a model": the Extract page's model and text pickers, transcoder or not, the hooks (several: a sweep
    over hook), the context size, contexts per forward, the mixing window, where the stream is kept and how many
    held-out contexts the model evaluates on after training. (values, the model's facts, problems)."""
    model, facts, problem = model_picker("train")
    hooks: list[str] = []
    t1, t2 = st.columns(2)
    transcoder = t1.checkbox(
        "Transcoder", key="train_transcoder",
        help="Each SAE reads the input of the module a hook names and predicts that module's output",
    )  # fmt: skip
    skip = t2.checkbox("Skip term", key="train_transcoder_skip", disabled=not transcoder,
                       help="A learned linear map from the module's input to its output (a skip transcoder)")  # fmt: skip
    if transcoder:
        st.caption("The hooks name the modules whose input is read and output predicted: MLP blocks such as "
                   "transformer.h.N.mlp or model.layers.N.mlp.")  # fmt: skip
    if facts is not None:
        names = list(facts.hooks)
        hooks = st.multiselect(
            "Hooks (several: one SAE per hook, one forward feeds them all)", names,
            default=[names[default_hook(names)]] if names else [], key="train_hooks",
            format_func=lambda path: f"{path} · width {facts.hooks[path]}",
        )  # fmt: skip
    dataset, field, split = text_picker("train_text")
    c1, c2, c3 = st.columns(3)
    context = c1.number_input("Context size", value=128, step=32, min_value=2, key="train_context")
    per_forward = c2.number_input("Contexts per forward", value=32, step=8, min_value=1, key="train_model_batch")
    mixing = c3.number_input(
        "Mixing window (contexts)", value=DEFAULT_MIXING_CONTEXTS, step=64, min_value=1, key="train_mixing",
        help="The activations of this many contexts are shuffled together before they form batches; memory: "
        "2 × window × context size × d_in × 4 bytes per hook",
    )  # fmt: skip
    k1, k2 = st.columns([2, 1])
    cache_to = k1.text_input(
        "Keep the stream in", key="train_cache_to", placeholder=suggested_cache_to(paths.datasets_dir(), model),
        help="A folder (blank: the stream is not kept) that gets one activation folder per hook, in the extraction's "
        "format: train on it again, or inspect the SAE's latents on it",
    )  # fmt: skip
    evaluate = k2.number_input(
        "Evaluate with the model after training", value=0, step=64, min_value=0, key="train_evaluate_contexts",
        help="Held-out contexts to score the SAE spliced into the model on (CE loss and KL recovered); 0: none",
    )  # fmt: skip
    values = StreamValues(
        model, hooks, dataset, field, split, int(context), int(per_forward), int(mixing), cache_to, int(evaluate),
        transcoder, transcoder and skip,
    )  # fmt: skip
    return values, facts, [problem] if problem else []


def model_widgets(d_in: int | None) -> tuple[FormValues, list[str]]:
    """The run's settings: the architecture and its own options, the size, the schedule (and typing problems)."""
    arch = architecture_picker("train")
    options, problems = architecture_options("train", arch)
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
            c2.caption(html.md("d_sae = {:g} × {} = {:,}", expansion, d_in, round(expansion * d_in)))
    c1, c2 = st.columns(2)
    batch = c1.number_input("Global batch (tokens per step)", value=4096, step=512, key="train_batch")
    steps = c2.number_input("Steps", value=1000, step=100, key="train_steps")
    c1, c2, c3 = st.columns(3)
    lr = c1.text_input("Learning rate", key="train_lr", placeholder="auto: 8e-4/√(d_sae/16384)")
    warmup = c2.text_input("Warm-up steps", key="train_warmup", placeholder="auto: 1% of steps")
    decay = c3.text_input("Decay steps (linear to 0)", key="train_decay", placeholder="auto: last 10%")
    c1, c2, c3 = st.columns(3)
    dtype = c1.selectbox("Weights dtype", ["float32", "bfloat16"], key="train_dtype")
    autocast = c2.checkbox("bf16 autocast (CUDA)", key="train_autocast")
    ckpt = c3.number_input("Checkpoint every (steps)", value=1000, step=100, key="train_ckpt")
    values = FormValues(
        activation_source="",
        architecture=arch,
        size_mode=size_mode,
        d_sae=d_sae,
        expansion_factor=expansion,
        d_in=d_in,
        options=options,
        batch_size=batch,
        total_steps=steps,
        lr=lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        dtype=dtype,
        autocast=autocast,
        checkpoint_every=ckpt,
    )
    return values, problems


PLACEMENT_HELP = (
    "How several GPUs share the sweep. batch: every GPU trains every member on its share of each batch (as a "
    "single run). members: each GPU trains its share of the members on whole batches (no gradient all-reduce). "
    "auto: batch when it fits, else members."
)


def sweep_widgets(arch: str) -> SweepValues | None:
    """The sweep section: values per field, the architectures, the placement (None while it is off)."""
    if not st.toggle("Train a grid of SAEs (sweep)", key="train_sweep"):
        return None
    st.caption(
        "Every combination of the values below is one SAE; all of them train on one read of the data. "
        "A blank field keeps the setting above."
    )
    archs = st.multiselect("Architectures", ARCHITECTURE_NAMES, default=[arch], key="train_sweep_architecture")
    texts = {}
    columns = st.columns(2)
    for i, spec in enumerate(sweep_fields(arch)):
        label_md = spec.label_md
        texts[spec.name] = columns[i % 2].text_input(
            label_md, key=f"train_sweep_{spec.name}", placeholder=spec.placeholder
        )
    placement_choice = st.radio(
        "Placement on several GPUs", PLACEMENTS, key="train_sweep_placement", horizontal=True, help=PLACEMENT_HELP
    )
    return SweepValues(texts, archs, placement_choice)


def per_gpu_bytes(cfg, world: int, d_in: int | None, stream=None) -> int | None:
    """The estimate for `world` GPUs, or None while the config, dataset or batch split is not valid."""
    if cfg is None or d_in is None:
        return None
    if isinstance(cfg, Sweep):
        return sweep_need(cfg, world, d_in, stream)
    if cfg.batch_size % world:
        return None
    return memory.estimate(cfg, world, d_in=d_in, stream=stream).total_bytes


def sweep_panel(sweep: Sweep, world: int, d_in: int, gpus, chosen: str | None, stream=None) -> None:
    """A sweep's per-GPU estimate in both layouts, the one the gate chose, and their predicted speed-up."""
    layouts = sweep_layouts(sweep, world, d_in, stream)
    figure = layouts.get(chosen) if chosen else None
    if isinstance(figure, int):
        st.metric("Estimated memory per GPU", format_bytes(figure))
    rows_md = [
        html.md(
            "placement {}: {}{}", layout, format_bytes(value) if isinstance(value, int) else "cannot run",
            " (chosen)" if layout == chosen else "",
        )
        for layout, value in layouts.items()
    ]  # fmt: skip
    st.caption(" · ".join(rows_md))
    if speedups := scaling.sweep_speedup_labels(sweep, d_in, gpus):
        st.caption("Predicted speed-up: " + " · ".join(html.md_text(s) for s in speedups), help=scaling.__doc__)


def estimate_panel(cfg, world: int, d_in: int, gpus, stream=None) -> None:
    estimate = memory.estimate(cfg, world, d_in=d_in, stream=stream)
    st.metric("Estimated memory per GPU", format_bytes(estimate.total_bytes))
    st.caption(
        html.md(
            "{} rank(s) × {:,} tokens per rank per step · peak during {}",
            world, estimate.per_rank_batch, estimate.peak_phase,
        )
    )  # fmt: skip
    if speedups := scaling.speedup_labels(cfg, d_in, gpus):
        st.caption("Predicted speed-up: " + " · ".join(html.md_text(s) for s in speedups), help=scaling.__doc__)
    with st.expander("Breakdown"):
        st.dataframe(frames.breakdown_frame(estimate.breakdown, memory.TERM_LABELS), hide_index=True, width="stretch")


def submit(engine, cfg, where: Submission) -> None:
    try:
        with st.spinner("Checking the activations (or the model and counting its text's rows)…"):
            job, _ = submission.submit(cfg, where, engine)
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
    from_model = st.radio("Activations", SOURCES, key="train_source_kind", horizontal=True) == SOURCES[1]
    stream_values, facts, dataset = None, None, None
    if from_model:
        stream_values, facts, errors = stream_widgets()
        widths = [facts.hooks[h] for h in stream_values.hooks] if facts is not None else []
        d_in = max(widths) if widths else None  # a sweep over hooks: its SAEs' memory at the widest
        source = ""
    else:
        source, dataset, errors = dataset_widgets()
        d_in = dataset.d_in if dataset is not None else None
    values, option_problems = model_widgets(d_in)
    errors += option_problems
    sweep_values = sweep_widgets(values.architecture)
    values.activation_source = source
    values.stream = stream_values
    values.device = "auto" if statuses else "cpu"
    c1, c2 = st.columns(2)
    job_name = c1.text_input("Job name", key="train_name", placeholder="e.g. l12-topk-16k")
    user = c2.text_input("Your name", key="train_user", value=st.session_state.get("user_name", ""))
    st.session_state["user_name"] = user  # survives leaving the page (widget state does not)
    submit_box = st.container()

cfg, config_errors = form_to_config(values) if sweep_values is None else form_to_sweep(values, sweep_values)
missing = [e for e in config_errors if e in MISSING]  # nothing chosen yet: a hint, not an error
errors += [e for e in config_errors if e not in MISSING]
stream = None  # what a run streamed from a model holds on each GPU, for the estimates
if cfg is not None and facts is not None and stream_values is not None:
    shared = cfg.shared if isinstance(cfg, Sweep) else cfg
    stream = stream_source(shared, facts, stream_values.hooks, on_gpu=True, keys=keys_of(cfg))
if not user.strip():
    missing.append(NAME_MISSING)

with place_col:
    st.subheader("Where it runs")
    estimate_box = st.container()  # filled once the ticked GPUs are known
    need = None if cfg is None or d_in is None else (lambda world: per_gpu_bytes(cfg, world, d_in, stream))
    gpu_ids, cpu_procs, placement_missing = placement(statuses, probe, need, "train")
missing += placement_missing
world = len(gpu_ids) or cpu_procs or 1
where = Submission(gpu_ids or None, cpu_procs, name=job_name, submitted_by=user.strip())
notes: list[str] = []
chosen = None  # a sweep's layout, as the gate chose it
if cfg is not None and (dataset is not None or stream is not None) and not placement_missing:
    # The gate, without the full value scan (Submit does that): every rule the CLI applies.
    verdict = submission.check(cfg, where, scan_values=False, statuses=statuses, engine=engine)
    errors += [str(problem) for problem in verdict.problems]
    notes = verdict.notes
    chosen = verdict.config.placement if isinstance(verdict.config, Sweep) else None

with estimate_box:
    if isinstance(cfg, Sweep):
        st.caption(html.md("Sweep: {} SAEs", len(cfg.members)))
        if d_in is not None and statuses:
            sweep_panel(cfg, world, d_in, probe.gpus, chosen, stream)
    elif cfg is not None and d_in is not None and cfg.batch_size % world == 0:
        if statuses:
            estimate_panel(cfg, world, d_in, probe.gpus, stream)
        else:
            st.caption(html.md("{} process(es) × {:,} tokens each per step", world, cfg.batch_size // world))

with submit_box:
    for note in notes:
        st.info(html.md_text(note), icon=":material/schedule:")
    if problems_and_submit("train", errors, missing, "Submit", ":material/send:"):
        submit(engine, cfg, where)
    if job_id := st.session_state.get("train_submitted"):
        st.success(html.md("Job {} queued.", job_id))
        queued_link(job_id)
