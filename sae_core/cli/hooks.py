"""`python -m sae_core hooks MODEL [--json]`: the module paths of a model whose output can be extracted."""

from __future__ import annotations

import argparse
import json
import sys


def cli_hooks(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sae_core hooks",
        description="List a model's hookable modules (output [batch, tokens, width]) with their widths. "
        "No weights are loaded and nothing is downloaded.",
    )
    parser.add_argument("model", help="a local Hugging Face model folder, or a hub name in the local cache")
    parser.add_argument("--json", action="store_true", help="print the model's facts and hooks as JSON")
    args = parser.parse_args(argv)
    from ..model.hooks import list_hooks, model_facts  # torch and transformers: only for this command
    from ..model.loading import ModelError, resolve_model

    try:
        model_dir = resolve_model(args.model)
        facts, hooks = model_facts(model_dir), list_hooks(model_dir)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**facts, "hooks": [h.to_dict() for h in hooks]}, indent=1))
        return 0
    print(f"{facts['model_dir']}: {facts['class']}, {facts['parameters']:,} parameters ({facts['dtype']})")
    width = max(len(h.path) for h in hooks)
    for hook in hooks:
        print(f"  {hook.path:<{width}}  {hook.width:>6}  {hook.module}")
    return 0
