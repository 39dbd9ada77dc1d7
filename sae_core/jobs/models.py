"""What the gate and the pages know of a model without loading torch: `python -m sae_core hooks MODEL --json`
run in a child process (transformers and torch stay out of the app and the daemon), remembered per model
folder until its config.json changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..access import without_secrets
from ..text import brief
from .errors import UNEXPECTED, JobError, log

FACTS_TIMEOUT_S = 180.0  # tracing a large model's modules on the meta device takes seconds, not minutes
_HUB_NAME_TTL_S = 60.0  # a hub name's cache entry may change under us: look again after a minute
_cache: dict[tuple[str, float | None], tuple[float, ModelFacts]] = {}


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


def _key(model: str) -> tuple[str, float | None]:
    config = Path(model).expanduser() / "config.json"
    try:
        return model, config.stat().st_mtime
    except OSError:
        return model, None


def model_facts(model: str, timeout_s: float = FACTS_TIMEOUT_S) -> ModelFacts:
    """The model's class, size, saved dtype and hookable modules; ModelProblem with the child's message."""
    key = _key(model)
    cached = _cache.get(key)
    if cached is not None and (key[1] is not None or time.monotonic() - cached[0] < _HUB_NAME_TTL_S):
        return cached[1]
    argv = [sys.executable, "-m", "sae_core", "hooks", model, "--json"]
    try:
        child = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, env=without_secrets(os.environ), check=False
        )
    except subprocess.TimeoutExpired:
        raise ModelProblem("model", f"model: listing its modules took over {timeout_s:.0f} s; try again") from None
    if child.returncode != 0:
        raise _refusal(child.stderr)
    try:
        facts = ModelFacts.from_json(json.loads(child.stdout))
    except (ValueError, KeyError, TypeError):
        log.error("the hooks command for %s printed no model facts:\n%s", model, child.stdout[-4000:])
        raise ModelProblem("model", f"model: {UNEXPECTED}") from None
    _cache[key] = (time.monotonic(), facts)
    return facts


def _refusal(stderr: str) -> ModelProblem:
    """The hooks command's own refusal (its last line, `error: model: ...`); a crash (a traceback, whose last
    line is the exception) is one line for the person and the whole of it for the server log."""
    last = (stderr.strip().splitlines() or [""])[-1]
    if not last.startswith("error: "):
        log.error("the hooks command failed:\n%s", stderr[-4000:])
        return ModelProblem("model", f"model: {UNEXPECTED}")
    message = last.removeprefix("error: ")
    field = message.split(":", 1)[0] if message.startswith(("model:", "hook:")) else "model"
    return ModelProblem(field, brief(message, 400))


def loaded_dtype(facts: ModelFacts, model_dtype: str, on_gpu: bool) -> str:
    """The dtype a job loads the weights in: `model_dtype`, or for "auto" the saved one, which a CPU widens
    from half precision to float32 (model/loading.py does the same)."""
    if model_dtype != "auto":
        return model_dtype
    return "float32" if not on_gpu and facts.dtype in ("float16", "bfloat16") else facts.dtype
