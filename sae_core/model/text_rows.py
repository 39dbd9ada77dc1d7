"""How many rows a text gives a model: its documents tokenized and packed into contexts as an extraction packs
them, counting the kept positions (special tokens left out when asked) until there are enough. The gate asks
this of a training streamed from a model through `python -m sae_core rows` (a child process: the tokenizer
stays out of the app)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..data.text import Specials, iter_pieces, kept_positions, pack_contexts
from .loading import load_tokenizer, resolve_model


@dataclass(frozen=True)
class TextRows:
    rows: int  # kept rows counted (all of the text's when `exhausted`, else at least `needed`)
    contexts: int
    exhausted: bool  # the text ran out before `needed` rows

    def to_dict(self) -> dict:
        return asdict(self)


def count_rows(
    model: str,
    dataset: str,
    *,
    text_field: str = "text",
    split: str = "train",
    context_size: int = 128,
    prepend_bos: bool | None = None,
    exclude_special_tokens: bool = True,
    needed: int,
) -> TextRows:
    """The rows the text gives at `context_size`, counted until `needed` (ModelError, TextError as the
    extraction raises them)."""
    tokenizer = load_tokenizer(resolve_model(model))
    specials = Specials.of(tokenizer)
    bos = specials.adds_start if prepend_bos is None else prepend_bos
    rows = contexts = 0

    def enough(newest) -> bool:
        nonlocal rows, contexts
        rows += int(kept_positions(newest, specials, exclude_special_tokens).sum())
        contexts += len(newest)
        return rows >= needed

    pack_contexts(tokenizer, iter_pieces(dataset, text_field, split), context_size, bos, enough, specials)
    return TextRows(rows, contexts, rows < needed)
