"""What the gate checks of a model and a text, for every kind that runs a model over text (an extraction, a
training streamed from a model): where they may come from, the model and the hooks asked of it (closest names
for a wrong one), the text's first document, and whether the text gives enough rows.

No torch: the model and the tokenizer are read by `python -m sae_core hooks` and `rows` in child processes
(models.py)."""

from __future__ import annotations

import difflib
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ..data.catalog import OUTSIDE_MODEL_ROOTS, OUTSIDE_ROOTS, model_allowed, text_allowed
from ..data.text import TextError, iter_pieces
from .errors import guarded
from .models import ROWS_TIMEOUT_S, ModelFacts, ModelProblem, TextQuery, model_facts, text_rows


def locations(model: str, dataset: str, home: Path) -> list[tuple[str, str]]:
    """(field, message) for a model or dataset path outside the lab's roots (hub names in the local cache are
    fine; any other name is a path)."""
    problems = []
    if not model_allowed(model, home):
        problems.append(("model", f"model: {OUTSIDE_MODEL_ROOTS}"))
    if not text_allowed(dataset, home):
        problems.append(("dataset", f"dataset: {OUTSIDE_ROOTS}"))
    return problems


@guarded("model", with_value=True)
def model_and_hooks(model: str, hooks: Sequence[str]):
    """(facts, problems): the model as the hooks command reads it, and whether each hook is one of its modules."""
    try:
        facts = model_facts(model)
    except ModelProblem as exc:
        return None, [(exc.field, str(exc))]
    return facts, [problem for hook in dict.fromkeys(hooks) if (problem := hook_problem(facts, hook))]


def hook_problem(facts: ModelFacts, hook: str) -> tuple[str, str] | None:
    """("hook", message) when `hook` is not one of the model's hookable modules, naming the closest ones."""
    if hook in facts.hooks:
        return None
    close = difflib.get_close_matches(hook, list(facts.hooks), n=5, cutoff=0.5)
    hint = f"; close: {', '.join(close)}" if close else ""
    message = f"hook: {hook!r} is not a module of this model with a [batch, tokens, width] output{hint}"
    return "hook", f"{message} (`python -m sae_core hooks MODEL` lists them)"


@guarded("dataset")
def first_document(dataset: str, text_field: str, split: str) -> list[tuple[str, str]]:
    """The text can be opened and holds at least one document of the field asked for."""
    try:
        next(iter(iter_pieces(dataset, text_field, split)))
    except StopIteration:
        return [("dataset", "dataset: it holds no documents")]
    except TextError as exc:
        field = str(exc).split(":", 1)[0] if str(exc).startswith(("text_field:", "split:")) else "dataset"
        return [(field, str(exc))]
    return []


@guarded("dataset", with_value=True)
def enough_rows(query: TextQuery, needed: int, asked: str, lower: str):
    """(note, problems): whether the text gives `needed` rows at the query's context size (`asked` says what
    needs them, `lower` which fields ask for fewer). Counting that takes too long is a note, not a problem:
    the job counts again before it starts."""
    try:
        rows = text_rows(query, needed)
    except ModelProblem as exc:
        return None, [(exc.field, str(exc))]
    except subprocess.TimeoutExpired:
        note = (
            f"dataset: the text's rows were not all counted within {ROWS_TIMEOUT_S:.0f} s (the run needs "
            f"{needed:,}); the job counts them before it trains"
        )
        return note, []
    if rows >= needed:
        return None, []
    what = "is empty" if rows == 0 else f"gives only {rows:,} rows in contexts of {query.context_size}"
    return None, [("dataset", f"dataset: {asked} needs {needed:,} rows, but the text {what}; {lower}")]
