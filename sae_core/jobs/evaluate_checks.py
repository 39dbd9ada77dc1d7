"""The submission gate's checks of a model evaluation and of an inspection (called through their JobKind rows
by submission.py, the one gate): where the SAE, the model, the text and the activations come from, the plan (data/heldout.py: the same
checks the job makes), the model being a causal LM whose hook is as wide as the SAE, and the memory per rank.

No torch: the model is read by `python -m sae_core hooks` in a child process (models.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import Engine

from ..config import ConfigError, EvaluateConfig, InspectConfig
from ..data.catalog import OUTSIDE_MODEL_ROOTS, OUTSIDE_ROOTS, in_data_roots, model_allowed, text_allowed
from ..data.formats import DatasetError
from ..data.heldout import EvalPlan, InspectPlan, plan_evaluation, plan_inspection
from ..gpu.availability import GpuStatus
from ..gpu.model_memory import evaluation_bytes, inspection_bytes
from ..latents import WINDOW
from ..text import brief
from . import store
from .errors import guarded
from .gate import Verdict, check_model_memory, outside_roots, start_verdict
from .models import ModelFacts, ModelProblem, loaded_dtype, model_facts
from .placement import Submission


def check_evaluate(
    cfg: EvaluateConfig,
    submission: Submission,
    *,
    statuses: Sequence[GpuStatus] | None = None,
    engine: Engine | None = None,
    planned: bool = False,
) -> Verdict:
    """Every problem of queueing the model evaluation `cfg` as `submission`: names, placement, where the SAE,
    model and text come from, what it runs on (the job's own plan), the model and its hook, the memory.
    `planned`: the SAE does not exist yet (a training queued before it will write it); its checks are then
    the job's."""
    verdict = start_verdict(cfg, submission)
    if verdict.placement_failed or planned:
        return verdict
    if outside_roots(verdict, locations(cfg, store.engine_home(store.engine_or_default(engine)))):
        return verdict
    verdict.evaluation, problems = plan(cfg)
    if verdict.evaluation is not None:
        verdict.model, problems = model_problems(verdict.evaluation)
    verdict.add(problems)
    if verdict.ok and verdict.model is not None and verdict.evaluation is not None:
        verdict.memory = memory_per_rank(cfg, verdict.model, verdict.evaluation, bool(verdict.gpus))
        check_model_memory(verdict, "evaluation", submission, statuses, engine)
    return verdict


def check_inspect(
    cfg: InspectConfig,
    submission: Submission,
    *,
    statuses: Sequence[GpuStatus] | None = None,
    engine: Engine | None = None,
) -> Verdict:
    """Every problem of queueing the inspection `cfg` as `submission`: names, placement, where the SAE and its
    activations come from, what it runs on (the job's own plan), the memory per rank."""
    verdict = start_verdict(cfg, submission)
    if verdict.placement_failed:
        return verdict
    if outside_roots(verdict, inspect_locations(cfg, store.engine_home(store.engine_or_default(engine)))):
        return verdict
    inspection, problems = inspect_plan(cfg)
    verdict.add(problems)
    if inspection is not None:
        verdict.memory = inspection_memory(cfg, inspection, on_gpu=bool(verdict.gpus))
        check_model_memory(verdict, "inspection", submission, statuses, engine)
    return verdict


def locations(cfg: EvaluateConfig, home: Path) -> list[tuple[str, str]]:
    """(field, message) for an SAE, model or text outside the lab's roots (hub names in the local cache are fine)."""
    problems = []
    if not in_data_roots(cfg.sae, home):
        problems.append(("sae", f"sae: {OUTSIDE_ROOTS}"))
    outside = [path for path in cfg.saes if not in_data_roots(path, home)]
    if outside:
        problems.append(("saes", f"saes: {brief(outside[0], 200)}: {OUTSIDE_ROOTS}"))
    if cfg.model is not None and not model_allowed(cfg.model, home):
        problems.append(("model", f"model: {OUTSIDE_MODEL_ROOTS}"))
    if cfg.dataset is not None and not text_allowed(cfg.dataset, home):
        problems.append(("dataset", f"dataset: {OUTSIDE_ROOTS}"))
    return problems


@guarded("sae", with_value=True)
def plan(cfg: EvaluateConfig) -> tuple[EvalPlan | None, list[tuple[str, str]]]:
    try:
        return plan_evaluation(cfg), []
    except (ConfigError, DatasetError) as exc:
        message = str(exc)
        return None, [(message.split(":", 1)[0], message)]


@guarded("model", with_value=True)
def model_problems(evaluation: EvalPlan) -> tuple[ModelFacts | None, list[tuple[str, str]]]:
    """The model as the hooks command reads it; whether it predicts the next token and has the SAE's width
    at the hook."""
    try:
        facts = model_facts(evaluation.model)
    except ModelProblem as exc:
        return None, [(exc.field, str(exc))]
    if not facts.causal_lm:
        return facts, [("model", f"model: {facts.cls} is not a causal language model; the CE evaluation needs one")]
    width = facts.hooks.get(evaluation.hook)
    if width is None:
        return facts, [("hook", f"hook: {evaluation.hook!r} is not a module of this model with a [batch, tokens, width] output")]  # fmt: skip
    if width != evaluation.d_in:
        return facts, [("hook", f"hook: {evaluation.hook} outputs width {width} but the SAE's d_in is {evaluation.d_in}")]  # fmt: skip
    return facts, []


def memory_per_rank(cfg: EvaluateConfig, facts: ModelFacts, evaluation: EvalPlan, on_gpu: bool) -> dict[str, int]:
    """The estimate's terms for one rank; the weights in the dtype the job will load them in. Several SAEs in
    one pass are all held at once, one's latents at a time: the widest one's term, plus the others' weights."""
    widest = max(evaluation.d_saes)
    terms = evaluation_bytes(
        facts.parameters, loaded_dtype(facts, cfg.model_dtype, on_gpu), cfg.batch_size, evaluation.context_size,
        facts.hidden_size, facts.heads, facts.vocab_size, evaluation.d_in, widest,
    )  # fmt: skip
    others = sum(evaluation.d_saes) - widest
    terms["sae"] += (2 * evaluation.d_in * others + others) * 4 + (len(evaluation.d_saes) - 1) * evaluation.d_in * 4
    if not on_gpu:
        terms.pop("cuda_context")
    return terms


def inspect_locations(cfg: InspectConfig, home: Path) -> list[tuple[str, str]]:
    problems = []
    if not in_data_roots(cfg.sae, home):
        problems.append(("sae", f"sae: {OUTSIDE_ROOTS}"))
    if cfg.activations is not None and not in_data_roots(cfg.activations, home):
        problems.append(("activations", f"activations: {OUTSIDE_ROOTS}"))
    return problems


@guarded("sae", with_value=True)
def inspect_plan(cfg: InspectConfig) -> tuple[InspectPlan | None, list[tuple[str, str]]]:
    try:
        return plan_inspection(cfg), []
    except (ConfigError, DatasetError) as exc:
        message = str(exc)
        return None, [(message.split(":", 1)[0], message)]


def inspection_memory(cfg: InspectConfig, plan: InspectPlan, on_gpu: bool) -> dict[str, int]:
    terms = inspection_bytes(plan.d_in, plan.d_sae, cfg.chunk_rows, cfg.top_k, WINDOW)
    if not on_gpu:
        terms.pop("cuda_context")
    return terms
