"""What the gate and the pages know of a model without loading torch: `python -m sae_core hooks MODEL --json`
run in a child process (transformers and torch stay out of the app and the daemon), remembered per model
folder until its settings change: its facts, and a refusal too (a model that cannot be read is not
read again on every rerun of a page). The child gets no stdin and an offline environment: nothing can
prompt it, nothing makes it wait on the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..access import without_secrets
from ..data.catalog import hub_snapshot, offline_env
from ..files import MODEL_SETTINGS_FILES
from ..text import brief
from .errors import UNEXPECTED, JobError, log

FACTS_TIMEOUT_S = 180.0  # tracing a large model's modules on the meta device takes seconds, not minutes
_MISSING_TTL_S = 60.0  # a folder without a config.json may get one: look again after a minute
_cache: dict[tuple[str, str, tuple[float | None, ...]], tuple[float, ModelFacts | ModelProblem]] = {}


@dataclass(frozen=True)
class ModelFacts:
    model_dir: str
    cls: str
    parameters: int
    dtype: str  # as saved
    hidden_size: int
    heads: int
    hooks: dict[str, int]  # module path -> output width, in model order
    vocab_size: int = 0
    causal_lm: bool = False  # predicts the next token (what a model evaluation needs)

    @classmethod
    def from_json(cls, data: dict) -> ModelFacts:
        return cls(
            model_dir=data["model_dir"],
            cls=data["class"],
            parameters=int(data["parameters"]),
            dtype=data["dtype"],
            hidden_size=int(data.get("hidden_size") or 0),
            heads=int(data.get("heads") or 0),
            hooks={h["path"]: int(h["width"]) for h in data["hooks"]},
            vocab_size=int(data.get("vocab_size") or 0),
            causal_lm=bool(data.get("causal_lm")),
        )


class ModelProblem(JobError):
    """The model or hook cannot be used; `field` is the config field to change."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def _key(model: str) -> tuple[str, str, tuple[float | None, ...]]:
    """The name, the folder it stands for (a hub name's snapshot changes with each new revision) and the
    mtimes of the settings the hooks command reads (None: that file is missing)."""
    folder = hub_snapshot(model, "model") or Path(model).expanduser()
    return model, str(folder), tuple(_mtime(folder / name) for name in MODEL_SETTINGS_FILES)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except (OSError, ValueError):
        return None


def model_facts(model: str, timeout_s: float = FACTS_TIMEOUT_S) -> ModelFacts:
    """The model's class, size, saved dtype and hookable modules; ModelProblem with the child's message."""
    key = _key(model)
    cached = _cache.get(key)
    if cached is None or (key[2][0] is None and time.monotonic() - cached[0] >= _MISSING_TTL_S):
        cached = (time.monotonic(), _read_facts(model, timeout_s))
        _cache[key] = cached
    if isinstance(cached[1], ModelProblem):
        raise ModelProblem(cached[1].field, str(cached[1]))
    return cached[1]


def _read_facts(model: str, timeout_s: float) -> ModelFacts | ModelProblem:
    """What the hooks command says of `model`: its facts, or the problem it named. A child that ran out of
    time raises (that answer is not remembered)."""
    try:
        child = _run_child(["hooks", model, "--json"], timeout_s)
    except subprocess.TimeoutExpired:
        raise ModelProblem("model", f"model: listing its modules took over {timeout_s:.0f} s; try again") from None
    if child.returncode != 0:
        return _refusal(child.stderr, "hooks", ("model:", "hook:"))
    try:
        return ModelFacts.from_json(json.loads(child.stdout))
    except (ValueError, KeyError, TypeError):
        log.error("the hooks command for %s printed no model facts:\n%s", model, child.stdout[-4000:])
        return ModelProblem("model", f"model: {UNEXPECTED}")


def _run_child(args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """`python -m sae_core ARGS` with no stdin, offline, without the app's secrets."""
    return subprocess.run(
        [sys.executable, "-m", "sae_core", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=offline_env(without_secrets(os.environ)),
        check=False,
    )


def _refusal(stderr: str, command: str, fields: tuple[str, ...]) -> ModelProblem:
    """A command's own refusal (its last line, `error: model: ...`; the field is the message's first word when it
    is one of `fields`); a crash (a traceback, whose last line is the exception) is one line for the person and
    the whole of it for the server log."""
    last = (stderr.strip().splitlines() or [""])[-1]
    if not last.startswith("error: "):
        log.error("the %s command failed:\n%s", command, stderr[-4000:])
        return ModelProblem("model", f"model: {UNEXPECTED}")
    message = last.removeprefix("error: ")
    field = message.split(":", 1)[0] if message.startswith(fields) else "model"
    return ModelProblem(field, brief(message, 400))


# --- how many rows a text gives a model's tokenizer (`python -m sae_core rows`)
ROWS_TIMEOUT_S = 120.0  # counting stops here: the job counts again before it trains
_ROWS_FIELDS = ("model:", "dataset:", "text_field:", "split:", "prepend_bos:")
_rows_cache: dict[tuple, tuple[int, bool]] = {}  # (rows, the whole text counted)


@dataclass(frozen=True)
class TextQuery:
    """What the rows command is asked: the model's tokenizer over a text, packed as a training or extraction
    packs it."""

    model: str
    dataset: str
    text_field: str
    split: str
    context_size: int
    prepend_bos: bool | None
    exclude_special_tokens: bool

    def argv(self, needed: int) -> list[str]:
        bos = {None: "auto", True: "true", False: "false"}[self.prepend_bos]
        argv = ["rows", self.model, self.dataset, "--needed", str(needed), "--json", "--text-field", self.text_field]
        argv += ["--split", self.split, "--context-size", str(self.context_size), "--prepend-bos", bos]
        return argv + ([] if self.exclude_special_tokens else ["--keep-special-tokens"])


def text_rows(query: TextQuery, needed: int, timeout_s: float = ROWS_TIMEOUT_S) -> int:
    """The rows the text gives, counted until `needed` (fewer: all the text gives); ModelProblem naming the
    field the rows command refused; subprocess.TimeoutExpired when counting took over `timeout_s`. Remembered
    per query while the model's settings and the text's file stay as they are (a count of the whole text
    answers any `needed`)."""
    key = (_key(query.model), query, _mtime(Path(query.dataset).expanduser()))
    cached = _rows_cache.get(key)
    if cached is not None and (cached[1] or cached[0] >= needed):
        return cached[0]
    child = _run_child(query.argv(needed), timeout_s)
    if child.returncode != 0:
        raise _refusal(child.stderr, "rows", _ROWS_FIELDS)
    try:
        found = json.loads(child.stdout)
        counted = (int(found["rows"]), bool(found["exhausted"]))
    except (ValueError, KeyError, TypeError):
        log.error("the rows command for %s printed no count:\n%s", query.dataset, child.stdout[-4000:])
        raise ModelProblem("dataset", f"dataset: {UNEXPECTED}") from None
    _rows_cache[key] = counted
    return counted[0]


def loaded_dtype(facts: ModelFacts, model_dtype: str, on_gpu: bool) -> str:
    """The dtype a job loads the weights in: `model_dtype`, or for "auto" the saved one, which a CPU widens
    from half precision to float32 (model/loading.py does the same)."""
    if model_dtype != "auto":
        return model_dtype
    return "float32" if not on_gpu and facts.dtype in ("float16", "bfloat16") else facts.dtype
