"""Extract: a model's activations at one hook over a text dataset, as a job on the GPUs (or CPU processes),
optionally followed by a training on the result.

The model is read by the gate's own means (the hooks command in a child process: no torch in the app), and
the submission goes through the same gate as `python -m sae_core extract`.
"""

from __future__ import annotations

import streamlit as st

from sae_core import db
from sae_core.config import ConfigError, EvaluateConfig, ExtractConfig, TrainConfig
from sae_core.gpu.history import latest_probe
from sae_core.jobs import submission
from sae_core.jobs.extract_checks import memory_per_rank
from sae_core.jobs.gpus import gpu_statuses
from sae_core.jobs.submission import Submission
from sae_core.text import format_bytes
from sae_core.ui import html
from sae_core.ui.forms import MODEL_MISSING, TEXT_MISSING
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


def model_section():
    model, facts, problem = model_picker("extract")
    if facts is None:
        return model, None, None, problem
    hooks = list(facts.hooks)
    hook = st.selectbox(
        "Hook (module whose output is extracted)", hooks, index=default_hook(hooks), key="extract_hook",
        format_func=lambda path: f"{path} · width {facts.hooks[path]}",
    )  # fmt: skip
    return model, facts, hook, None


def numbers_section() -> dict:
    c1, c2, c3 = st.columns(3)
    values = {
        "n_tokens": c1.number_input("Tokens (rows)", value=1_000_000, step=100_000, min_value=1, key="extract_tokens"),
        "context_size": c2.number_input("Context size", value=128, step=32, min_value=2, key="extract_context"),
        "batch_size": c3.number_input("Contexts per forward", value=32, step=8, min_value=1, key="extract_batch"),
    }
    c1, c2 = st.columns(2)
    values["model_dtype"] = c1.selectbox(
        "Model dtype", ["auto", "float32", "bfloat16", "float16"], key="extract_mdtype"
    )
    values["storage_dtype"] = c2.selectbox("Stored as", ["bfloat16", "float16", "float32"], key="extract_sdtype")
    return values


def then_train_section(width: int | None, rows: int) -> TrainConfig | None | str:
    """The optional training on the result: its config, None when not asked for, or an error message."""
    if not st.checkbox("Then train an SAE on the result", key="extract_then_train"):
        return None
    arch = architecture_picker("extract")
    options, problems = architecture_options("extract", arch)
    c1, c2, c3 = st.columns(3)
    expansion = c1.number_input("Expansion factor", value=8.0, step=1.0, min_value=0.1, key="extract_expansion")
    steps = c2.number_input("Steps", value=1000, step=100, min_value=1, key="extract_steps")
    batch = c3.number_input("Global batch", value=4096, step=512, min_value=1, key="extract_train_batch")
    if problems:
        return f"then train: {problems[0]}"
    if width is None:
        return "then train: pick a model and a hook first"
    d_sae = max(1, round(expansion * width))
    holdout = min(4096, rows // 10)  # evaluation rows kept out of training: a tenth, at most the usual 4,096
    st.caption(
        html.md("d_sae = {:g} × {} = {:,} · {:,} rows held out for evaluation", expansion, width, d_sae, holdout)
    )
    try:
        return TrainConfig.from_dict({
            "activation_source": "(the extraction)", "architecture": arch, "d_sae": d_sae, **options,
            "total_steps": int(steps), "batch_size": int(batch), "holdout_tokens": holdout,
        })  # fmt: skip
    except ConfigError as exc:
        return f"then train: {exc}"


def then_evaluate_section(facts, then_train) -> EvaluateConfig | None | str:
    """The optional model evaluation after the training: its config, None when not asked for, or an error."""
    if not isinstance(then_train, TrainConfig):
        return None
    causal = facts is not None and facts.causal_lm
    help_md = None if causal else "Only a causal language model predicts the next token: CE loss needs one."
    if not st.checkbox("Then evaluate it with the model (CE loss and KL recovered)", key="extract_then_evaluate",
                       disabled=not causal, help=help_md):  # fmt: skip
        return None
    contexts = st.number_input("Held-out contexts to evaluate on", value=256, min_value=1, key="extract_eval_contexts")
    return EvaluateConfig(sae="(the training)", contexts=int(contexts))


def estimate_panel(verdict) -> None:
    if verdict.memory:
        st.metric("Estimated memory per rank", format_bytes(sum(verdict.memory.values())))
        st.caption(" · ".join(html.md("{} {}", name.replace("_", " "), format_bytes(value))
                              for name, value in verdict.memory.items()))  # fmt: skip
    if verdict.disk_bytes is not None:
        st.metric("Disk needed", format_bytes(verdict.disk_bytes))


st.title("Extract activations")
engine = db.get_engine()
probe = latest_probe(engine)
statuses = gpu_statuses(engine, snapshot=probe) if probe is not None and probe.gpus else []
form_col, place_col = st.columns([3, 2], gap="large")
errors: list[str] = []  # wrong values: shown at once
missing: list[str] = []  # nothing chosen or typed yet: hints until Submit is pressed

with form_col:
    model, facts, hook, model_problem = model_section()
    dataset, text_field, split = text_picker("extract")
    numbers = numbers_section()
    width = facts.hooks.get(hook) if facts is not None and hook else None
    then_train = then_train_section(width, int(numbers["n_tokens"]))
    then_evaluate = then_evaluate_section(facts, then_train)
    c1, c2 = st.columns(2)
    job_name = c1.text_input("Job name", key="extract_name", placeholder="e.g. gemma-l12-1M")
    user = c2.text_input("Your name", key="extract_user", value=st.session_state.get("user_name", ""))
    st.session_state["user_name"] = user
    submit_box = st.container()

cfg = None
errors += [model_problem] if model_problem else []
missing += ([] if model else [MODEL_MISSING]) + ([] if dataset else [TEXT_MISSING])
if model and hook and dataset:
    try:
        cfg = ExtractConfig.from_dict({
            "model": model, "hook": hook, "dataset": dataset, "text_field": text_field, "split": split,
            "device": "auto" if statuses else "cpu", **{k: int(v) if isinstance(v, float) else v for k, v in numbers.items()},
        })  # fmt: skip
    except ConfigError as exc:
        errors.append(str(exc))
if isinstance(then_train, str):  # without a model's hook width it only waits for the model
    (errors if width is not None else missing).append(then_train)
if not user.strip():
    missing.append(NAME_MISSING)

verdict = None
with place_col:
    st.subheader("Where it runs")
    estimate_box = st.container()
    need = None
    if cfg is not None and facts is not None:
        need_bytes = sum(memory_per_rank(cfg, facts, on_gpu=True).values())
        need = lambda _world: need_bytes  # noqa: E731  (each rank holds the whole model)
    gpu_ids, cpu_procs, placement_missing = placement(statuses, probe, need, "extract")
missing += placement_missing
if cfg is not None and not placement_missing:
    where = Submission(gpu_ids or None, cpu_procs, name=job_name, submitted_by=user.strip())
    verdict = submission.check(cfg, where, statuses=statuses, engine=engine)
    errors += [str(p) for p in verdict.problems]
    with estimate_box:
        estimate_panel(verdict)

with submit_box:
    if problems_and_submit("extract", errors, missing, "Submit", ":material/send:"):
        try:
            extraction, training, verdict_after = submission.submit_extract(
                cfg, Submission(gpu_ids or None, cpu_procs, name=job_name, submitted_by=user.strip()),
                then_train if isinstance(then_train, TrainConfig) else None, then_evaluate, engine,
            )  # fmt: skip
        except submission.SubmissionRejected as exc:
            for problem in exc.problems:
                st.error(html.md_text(problem), icon=":material/error:")
        else:
            later = [job.id for job in (training, verdict_after.then_evaluation) if job is not None]
            st.session_state["extract_submitted"] = (extraction.id, later)
    if submitted := st.session_state.get("extract_submitted"):
        extraction_id, later = submitted
        what = ["training", "evaluation"]
        st.success(
            html.md("Extraction job {} queued", extraction_id)
            + "".join(html.md(", then {} job {}", what[i], job_id) for i, job_id in enumerate(later))
            + "."
        )
        queued_link(extraction_id)
