"""`python -m sae_core toy OUT.safetensors --tokens N --d-in D --features M --seed S [--json]`."""

from __future__ import annotations

import argparse
import json
import sys

from ..data.toy import write_toy


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def cli_toy(argv: list[str]) -> int:
    """`python -m sae_core toy OUT.safetensors --tokens N --d-in D --features M --seed S [--json]`."""
    parser = argparse.ArgumentParser(
        prog="python -m sae_core toy",
        description="Write a toy activation set whose ground-truth features are known (tensors `activations`, "
        "`features`): each token is a sparse non-negative mix of unit feature directions plus small noise.",
    )
    parser.add_argument("out", metavar="OUT.safetensors", help="file to write")
    parser.add_argument("--tokens", type=_int_at_least(1), default=65536, help="rows (default 65536)")
    parser.add_argument("--d-in", type=_int_at_least(1), default=64, help="activation width (default 64)")
    parser.add_argument("--features", type=_int_at_least(1), default=256, help="ground-truth features (default 256)")
    parser.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and bad flags (2); return the code instead
        return exc.code if isinstance(exc.code, int) else 2
    try:
        summary = write_toy(args.out, args.tokens, args.d_in, args.features, args.seed)
    except ValueError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{parser.prog}: error: could not write {args.out}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary.to_dict()) if args.json else summary.describe())
    return 0
