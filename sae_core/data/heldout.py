"""What a model evaluation or an inspection of an SAE runs on, found without torch: the SAE's width, the model
and hook, the contexts (the held-out ones of its training data, or text to pack), the rows to inspect.

Training on a set extracted from a model holds out the tail of the set (order.tail_holdout): the whole
contexts there were never trained on, and `contexts.safetensors` holds their exact tokens. The gate
(jobs/) and the evaluation job (model/evaluate.py) both plan through here, so they agree on every check.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..architectures import SAVED_TRANSCODERS
from ..config import MAX_EVAL_SAES, ConfigError, EvaluateConfig, ExtractConfig, InspectConfig, TrainConfig
from ..files import (
    CFG_FILE,
    CONTEXTS_FILE,
    EVAL_FILE,
    EXTRACT_CONFIG_FILE,
    HELDOUT_CONTEXTS_FILE,
    MANIFEST_FILE,
    SWEEP_FILE,
    TRAIN_CONFIG_FILE,
    WEIGHTS_FILE,
)
from ..model_source import activation_files
from ..outputs import sweep_members
from ..text import brief
from .activations import ActivationSet, open_activations
from .formats import DatasetError
from .stream_cache import cache_folder


@dataclass(frozen=True)
class EvalPlan:
    sae_dirs: tuple[Path, ...]  # every SAE evaluated in the one pass (one for a single evaluation)
    d_in: int  # the SAEs' input width: the hook's output must match it
    d_saes: tuple[int, ...]  # each SAE's width, as sae_dirs
    model: str
    hook: str
    context_size: int  # tokens per context evaluated
    activation_dir: Path | None  # the extraction whose held-out contexts are evaluated (None: cfg.dataset)
    context_ids: np.ndarray | None  # those contexts, at most cfg.contexts of them, ascending
    exclude_special_tokens: bool  # positions the SAE was not trained on keep the model's own activation
    special_token_ids: tuple[int, ...]
    contexts_file: Path | None = None  # the `tokens` [n, context_size] that context_ids index (None: cfg.dataset)

    @property
    def sae_dir(self) -> Path:
        return self.sae_dirs[0]

    @property
    def d_sae(self) -> int:
        return self.d_saes[0]


@dataclass(frozen=True)
class NamedSae:
    """An SAE folder to evaluate, with the field that named it and how a message names it."""

    folder: Path
    field: str  # "sae" or "saes"
    label: str  # the folder, or "member NAME of SWEEP"


def held_out_contexts(data: ActivationSet, holdout: int) -> np.ndarray:
    """The contexts whose every row is in the tail holdout of `data` (the first context of the tail is cut
    when the tail starts inside it), ascending. In a kept stream (data/stream_cache.py) only the last
    held_out_rows rows keep each context's rows together: the tail is looked for there."""
    if data.manifest is not None and "held_out_rows" in data.manifest.provenance:
        holdout = min(holdout, int(data.manifest.provenance["held_out_rows"]))
    if holdout <= 0:
        return np.empty(0, np.int64)
    start = data.n_rows - holdout
    ids = data.context_ids(start, data.n_rows)
    if start > 0 and data.context_ids(start - 1, start)[0] == ids[0]:
        ids = ids[ids != ids[0]]
    return np.unique(ids)


def sae_shape(sae_dir: Path) -> tuple[int, int]:
    """(d_in, d_sae) from the SAE's cfg.json (SAELens format), or ConfigError naming `sae`."""
    shown = brief(sae_dir)
    if not (sae_dir / CFG_FILE).is_file() or not (sae_dir / WEIGHTS_FILE).is_file():
        raise ConfigError(f"sae: {shown} holds no SAE (it needs {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads((sae_dir / CFG_FILE).read_text())
        sizes = cfg.get("d_in"), cfg.get("d_sae")
    except (OSError, ValueError, AttributeError):
        raise ConfigError(f"sae: {shown}/{CFG_FILE} is not a readable JSON object") from None
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ConfigError(f"sae: {shown}/{CFG_FILE} needs positive integers d_in and d_sae")
    return sizes


def plan_evaluation(cfg: EvaluateConfig) -> EvalPlan:
    """Every check that needs no model, for every SAE the evaluation names (`sae`, `saes`, a sweep folder's
    completed members): each folder, where the model and hook come from, the contexts. Several SAEs are
    evaluated in one pass, so they must share the model, the hook and the contexts; a problem of one names it."""
    named = evaluated_saes(cfg)
    if len(named) == 1:
        return _plan_one(cfg, named[0].folder)
    plans = [_plan_named(cfg, sae) for sae in named]
    first = plans[0]
    for sae, plan in zip(named[1:], plans[1:], strict=True):
        _require_same_pass(named[0], first, sae, plan)
    return replace(first, sae_dirs=tuple(p.sae_dir for p in plans), d_saes=tuple(p.d_sae for p in plans))


def evaluated_saes(cfg: EvaluateConfig) -> list[NamedSae]:
    """The SAE folders an evaluation names, in order: a sweep folder (one holding sweep.json) stands for its
    completed members; at most MAX_EVAL_SAES in all."""
    named: list[NamedSae] = []
    for field, path in [("sae", cfg.sae), *(("saes", p) for p in cfg.saes)]:
        folder = Path(path).expanduser()
        if not (folder / SWEEP_FILE).is_file():
            named.append(NamedSae(folder, field, brief(folder, 200)))
            continue
        members = sweep_members(folder)
        done = [m for m in members if m.status == "completed"]
        if not done:
            raise ConfigError(
                f"{field}: the sweep {brief(folder, 200)} has no completed member yet ({len(members)} listed in "
                f"{SWEEP_FILE}); evaluate it once its members have finished training"
            )
        named += [NamedSae(m.folder, field, f"member {brief(m.name, 200)} of {brief(folder, 200)}") for m in done]
    if len(named) > MAX_EVAL_SAES:
        raise ConfigError(
            f"saes: {len(named)} SAEs in all (a sweep counts its completed members); one evaluation takes at most "
            f"{MAX_EVAL_SAES}: split them across jobs"
        )
    real = [os.path.realpath(sae.folder) for sae in named]
    for i, where in enumerate(real):
        if where in real[:i]:
            raise ConfigError(
                f"{named[i].field}: {named[i].label} is named twice (once as {named[real.index(where)].label})"
            )
    return named


def _plan_named(cfg: EvaluateConfig, sae: NamedSae) -> EvalPlan:
    """One SAE's plan among several: its problem, if any, names it (under the field that named it)."""
    try:
        return _plan_one(cfg, sae.folder)
    except (ConfigError, DatasetError) as exc:
        raise type(exc)(f"{sae.field}: {sae.label}: {exc}") from None


def _require_same_pass(first_sae: NamedSae, first: EvalPlan, sae: NamedSae, plan: EvalPlan) -> None:
    """ConfigError naming `sae` unless it can share the one pass of `first`: same model, hook, width, contexts."""
    if (plan.model, plan.hook, plan.d_in) != (first.model, first.hook, first.d_in):
        raise ConfigError(
            f"{sae.field}: {sae.label} is an SAE of {brief(plan.model, 200)} at {plan.hook} (d_in {plan.d_in}), but "
            f"{first_sae.label} of {brief(first.model, 200)} at {first.hook} (d_in {first.d_in}): one evaluation "
            "runs one model and splices at one hook; evaluate them in separate jobs"
        )
    ids, first_ids = plan.context_ids, first.context_ids
    same_ids = (
        ids is None
        and first_ids is None
        or (ids is not None and first_ids is not None and np.array_equal(ids, first_ids))
    )
    if not same_ids or not _same_contexts_file(plan, first) or (
        plan.activation_dir, plan.context_size, plan.exclude_special_tokens
    ) != (first.activation_dir, first.context_size, first.exclude_special_tokens):  # fmt: skip
        raise ConfigError(
            f"{sae.field}: {sae.label} held out other contexts than {first_sae.label} (trained on other activations "
            "or another holdout_tokens), and each SAE is evaluated only on contexts it never saw; evaluate it in its "
            "own job, or give a text dataset (dataset) to evaluate all on the same text"
        )


def _same_contexts_file(plan: EvalPlan, first: EvalPlan) -> bool:
    """Whether two plans' contexts files hold the same contexts (a streamed sweep's members hold one copy each)."""
    if plan.activation_dir is not None or plan.contexts_file is None or first.contexts_file is None:
        return True  # an extraction's contexts are named by its folder (compared with activation_dir)
    return plan.contexts_file.read_bytes() == first.contexts_file.read_bytes()


def _plan_one(cfg: EvaluateConfig, sae_dir: Path) -> EvalPlan:
    """Every check of one SAE that needs no model: its folder, where the model and hook come from, the contexts."""
    d_in, d_sae = sae_shape(sae_dir)
    streamed = _streamed_training(sae_dir)
    if streamed is not None:
        return _plan_streamed(cfg, sae_dir, d_in, d_sae, streamed)
    trained = _training_source(sae_dir)
    provenance = trained[0].manifest.provenance if trained and trained[0].from_model else {}
    model, hook = cfg.model or provenance.get("model"), cfg.hook or provenance.get("hook")
    if model is None or hook is None:
        missing = "model" if model is None else "hook"
        raise ConfigError(
            f"{missing}: the SAE's training data names no {missing} (it was not extracted by SAE Lab); give the "
            f"model and hook it was trained on (--model, --hook)"
        )
    if cfg.dataset is not None:
        return EvalPlan((sae_dir,), d_in, (d_sae,), model, hook, cfg.context_size, None, None, True, ())
    if trained is None or not trained[0].from_model:
        raise ConfigError(
            "dataset: the SAE's training data holds no contexts to evaluate on (it was not extracted by SAE Lab "
            "from a model); give a text dataset (--dataset)"
        )
    data, holdout = trained
    if cfg.hook not in (None, provenance.get("hook")) or cfg.model not in (None, provenance.get("model")):
        raise ConfigError(
            "dataset: the held-out contexts come from the model and hook the SAE was trained on; give a text dataset "
            "(--dataset) to evaluate it at another model or hook"
        )
    ids = held_out_contexts(data, holdout)
    if not len(ids):
        raise DatasetError(
            f"contexts: the SAE's training held out no whole context (holdout_tokens {holdout:,}, context_size "
            f"{provenance.get('context_size')}); train with holdout_tokens of at least two contexts, or give a "
            "text dataset (--dataset)"
        )
    exclude = provenance.get("exclude_special_tokens")  # a kept stream says so; an extraction's config does
    if not isinstance(exclude, bool):
        exclude = ExtractConfig.from_json_file(data.source / EXTRACT_CONFIG_FILE).exclude_special_tokens
    return EvalPlan(
        (sae_dir,), d_in, (d_sae,), model, hook, int(provenance["context_size"]), data.source, ids[: cfg.contexts], exclude,
        tuple(int(i) for i in provenance.get("special_token_ids", ())), data.source / CONTEXTS_FILE,
    )  # fmt: skip


def _streamed_training(sae_dir: Path) -> TrainConfig | None:
    """The training config of an SAE SAE Lab trained straight from a model; None for any other SAE."""
    if not (sae_dir / TRAIN_CONFIG_FILE).is_file():
        return None
    try:
        train_cfg = TrainConfig.from_json_file(sae_dir / TRAIN_CONFIG_FILE)
    except ConfigError:
        return None  # _training_source names the problem
    return train_cfg if train_cfg.streamed else None


def _plan_streamed(cfg: EvaluateConfig, sae_dir: Path, d_in: int, d_sae: int, train_cfg: TrainConfig) -> EvalPlan:
    """An SAE trained from a model: its model and hook, and the held-out contexts its training wrote beside it
    (HELDOUT_CONTEXTS_FILE: the stream's held-out contexts whose every row the end-of-run evaluation read)."""
    model, hook = cfg.model or str(train_cfg.model), cfg.hook or str(train_cfg.hook)
    if cfg.dataset is not None:
        return EvalPlan((sae_dir,), d_in, (d_sae,), model, hook, cfg.context_size, None, None, True, ())
    if (model, hook) != (train_cfg.model, train_cfg.hook):
        raise ConfigError(
            "dataset: the held-out contexts come from the model and hook the SAE was trained on; give a text dataset "
            "(--dataset) to evaluate it at another model or hook"
        )
    held = read_heldout_contexts(sae_dir)
    if held is None:
        raise DatasetError(
            f"dataset: the SAE was trained from a model but {brief(sae_dir)} has no {HELDOUT_CONTEXTS_FILE} (its "
            "held-out contexts); give a text dataset (--dataset)"
        )
    tokens, specials = held
    if not len(tokens):
        raise DatasetError(
            f"contexts: the SAE's training held out no whole context (holdout_tokens {train_cfg.holdout_tokens:,}, "
            f"context_size {train_cfg.context_size}); train with holdout_tokens of at least two contexts, or give a "
            "text dataset (--dataset)"
        )
    ids = np.arange(min(len(tokens), cfg.contexts), dtype=np.int64)
    return EvalPlan(
        (sae_dir,), d_in, (d_sae,), model, hook, train_cfg.context_size, None, ids, train_cfg.exclude_special_tokens,
        tuple(int(i) for i in specials), sae_dir / HELDOUT_CONTEXTS_FILE,
    )  # fmt: skip


def read_heldout_contexts(sae_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """A streamed SAE's held-out contexts (`tokens` [n, context_size]) and the model's special token ids; None
    when the folder has no such file."""
    from safetensors.numpy import load_file

    path = sae_dir / HELDOUT_CONTEXTS_FILE
    if not path.is_file():
        return None
    try:
        found = load_file(str(path))
        return found["tokens"], found["special_token_ids"]
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(f"sae: {brief(path)} cannot be read ({brief(exc, 200)})") from None


def _training_source(sae_dir: Path) -> tuple[ActivationSet, int] | None:
    """The activations an SAE Lab SAE was trained on and its holdout size; None for an SAE from elsewhere.
    Held-out contexts exist only when that training held out the tail (eval.json says so)."""
    if not (sae_dir / TRAIN_CONFIG_FILE).is_file():
        return None
    try:
        train_cfg = TrainConfig.from_json_file(sae_dir / TRAIN_CONFIG_FILE)
        data = open_activations(activation_files(train_cfg), train_cfg.activation_key)
    except (ConfigError, DatasetError, OSError) as exc:
        raise DatasetError(f"sae: its training data cannot be opened ({brief(exc, 200)})") from None
    if not data.from_model:
        return data, 0
    if not (data.source / CONTEXTS_FILE).is_file():
        raise DatasetError(f"sae: its training data {brief(data.source)} has lost {CONTEXTS_FILE}")
    try:
        kind = json.loads((sae_dir / EVAL_FILE).read_text()).get("holdout_kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != "tail":
        raise DatasetError(
            "dataset: this SAE was trained before SAE Lab held out whole contexts, so every context of its data was "
            "trained on; give a text dataset (--dataset)"
        )
    return data, train_cfg.holdout_tokens


def kept_stream(train_cfg: TrainConfig) -> str:
    """The activation folder a streamed training kept of what its SAE reads (cache_to): its hook's output, or a
    transcoder's module input (`<hook>.input`); inspection reads its rows there (the held-out contexts last, as
    in an extraction). ConfigError naming what to give when it kept none."""
    key = str(train_cfg.input_key)
    folder = cache_folder(train_cfg.cache_to, key) if train_cfg.cache_to else None
    if folder is None or not (folder / MANIFEST_FILE).is_file():
        kept = f" ({brief(folder)} holds no complete copy)" if folder is not None else ""
        what = (
            f"the input of {train_cfg.hook} (--activations: a kept stream's {train_cfg.hook}.input folder)"
            if train_cfg.transcoder
            else "that model and hook (--activations: an extraction)"
        )
        raise ConfigError(
            f"activations: the SAE was trained straight from {brief(train_cfg.model, 200)} at {train_cfg.hook} and its "
            f"stream was not kept{kept}; give activations of {what} to inspect it on, or train with cache_to"
        )
    return str(folder)


def transcoder_module(sae_dir: Path) -> str | None:
    """The module a transcoder replaces (its cfg.json metadata `hook_name`; "" when unnamed); None for an SAE.
    A transcoder's latents are computed from that module's input."""
    try:
        cfg = json.loads((sae_dir / CFG_FILE).read_text())
        if cfg.get("architecture") not in SAVED_TRANSCODERS:
            return None
        metadata = cfg.get("metadata")
        return str(metadata.get("hook_name", "")) if isinstance(metadata, dict) else ""
    except (OSError, ValueError, AttributeError):
        return None  # sae_shape names an unreadable cfg.json


def _require_module_input(data: ActivationSet, module: str) -> None:
    """ConfigError when `data` is known to be the output of the transcoder's own module (not its input)."""
    provenance = data.manifest.provenance if data.from_model else {}
    if module and provenance.get("hook") == module and provenance.get("hook_side", "out") != "in":
        raise ConfigError(
            f"activations: {brief(data.source)} holds the output of {module}, but a transcoder's latents are "
            f"computed from its module's input: give the input (a kept stream's {module}.input folder)"
        )


@dataclass(frozen=True)
class InspectPlan:
    sae_dir: Path
    d_in: int
    d_sae: int
    data: ActivationSet
    first_row: int  # rows first_row .. data.n_rows are inspected: the tail, where the holdout is
    held_out: int  # how many of them training never saw (0 when not known)
    model: str | None  # the model the rows came from (logit effects, token text), when known
    hook: str | None
    transcoder: bool = False  # the rows are its module's input; its decoder writes to the module's output

    @property
    def rows(self) -> int:
        return self.data.n_rows - self.first_row


def plan_inspection(cfg: InspectConfig) -> InspectPlan:
    """The SAE, the activations (the SAE's own unless `activations` is given) and which rows: checked
    without torch, every error naming its field. A transcoder's rows are its module's input (the kept stream's
    `<hook>.input` folder), never the module's output."""
    sae_dir = Path(cfg.sae).expanduser()
    d_in, d_sae = sae_shape(sae_dir)
    module = transcoder_module(sae_dir)
    holdout, source, key = 0, cfg.activations, "activations"
    if source is None:
        if not (sae_dir / TRAIN_CONFIG_FILE).is_file():
            what = "the input of the module it replaces" if module is not None else "them"
            raise ConfigError(
                "activations: the SAE was not trained by SAE Lab, so its activations are not known; give "
                f"{what} (--activations)"
            )
        train_cfg = TrainConfig.from_json_file(sae_dir / TRAIN_CONFIG_FILE)
        files = kept_stream(train_cfg) if train_cfg.streamed else activation_files(train_cfg)
        source, key, holdout = files, train_cfg.activation_key, train_cfg.holdout_tokens
    try:
        data = open_activations(source, key)
    except (DatasetError, OSError) as exc:
        raise DatasetError(f"activations: {brief(exc, 300)}") from None
    if module is not None:
        _require_module_input(data, module)
    if data.d_in != d_in:
        raise ConfigError(f"activations: rows are {data.d_in} wide but the SAE's d_in is {d_in}")
    first = max(0, data.n_rows - cfg.tokens)
    provenance = data.manifest.provenance if data.from_model else {}
    held_out = min(holdout, data.n_rows - first)
    return InspectPlan(
        sae_dir, d_in, d_sae, data, first, held_out, provenance.get("model"), provenance.get("hook"), module is not None
    )
