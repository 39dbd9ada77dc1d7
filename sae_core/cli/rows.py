"""`python -m sae_core rows MODEL DATASET --needed N [--json]`: how many rows (kept token positions) a text gives
a model's tokenizer, packed into contexts as an extraction or a streamed training packs them."""

from __future__ import annotations

import argparse
import json
import sys


def _bos(value: str) -> bool | None:
    return {"auto": None, "true": True, "false": False}[value]


def cli_rows(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sae_core rows",
        description="Count the rows a text gives a model (tokenized and packed into contexts), stopping at --needed. "
        "Only the tokenizer is loaded; nothing is downloaded.",
    )
    parser.add_argument("model", help="a local Hugging Face model folder, or a hub name in the local cache")
    parser.add_argument("dataset", help="the text (as ExtractConfig's dataset)")
    parser.add_argument("--needed", type=int, required=True, help="stop counting once the text gives this many rows")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--split", default="train")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--prepend-bos", choices=("auto", "true", "false"), default="auto")
    parser.add_argument("--keep-special-tokens", action="store_true", help="count special tokens' positions too")
    parser.add_argument("--json", action="store_true", help="print the count as JSON")
    args = parser.parse_args(argv)
    from ..data.text import TextError
    from ..model.loading import ModelError  # transformers: only for this command
    from ..model.text_rows import count_rows

    try:
        found = count_rows(
            args.model,
            args.dataset,
            text_field=args.text_field,
            split=args.split,
            context_size=args.context_size,
            prepend_bos=_bos(args.prepend_bos),
            exclude_special_tokens=not args.keep_special_tokens,
            needed=args.needed,
        )
    except (ModelError, TextError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(found.to_dict()))
    else:
        more = "" if found.exhausted else " (counting stopped there)"
        print(f"{found.rows:,} rows in {found.contexts:,} contexts of {args.context_size}{more}")
    return 0
