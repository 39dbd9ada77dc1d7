"""Where a streamed training keeps its stream (`cache_to`), checked without torch: one activation folder per
stream key, and what the gate asks before such a training starts (`cache_to_problems`).

The folder is an extraction's (manifest last, shards of `activations`, `token_ids`, `context_ids`,
`positions`, `contexts.safetensors`): first one shard per mixing window, its rows in the order training read
them (mixed across the window's contexts), then one shard of the held-out contexts, whole and in context order.
The manifest's `held_out_rows` says how many rows that last shard holds: only within them are a context's rows
together, so a training on the folder holds out whole contexts (and the model evaluation reruns them) as long
as its holdout_tokens is at most held_out_rows; the same holdout_tokens as the stream holds out the very rows
the stream evaluated on.
"""

from __future__ import annotations

from pathlib import Path

from ..files import MANIFEST_FILE
from ..model_source import STREAM_KEY_PREFIX
from ..text import brief
from .catalog import OUTSIDE_ROOTS, in_data_roots

INPUT_SUFFIX = ".input"  # the folder of a module's input (a transcoder's): `<cache_to>/<hook>.input`


def cache_folder(cache_to: str | Path, key: str) -> Path:
    """The folder of stream key `key` (`out:<hook>` -> `<cache_to>/<hook>`, `in:<hook>` -> `<hook>.input`)."""
    side, _, hook = key.partition(":")
    name = hook if f"{side}:" == STREAM_KEY_PREFIX else hook + INPUT_SUFFIX
    return Path(cache_to).expanduser() / name


def cache_to_problems(cache_to: str, keys: list[str], home: Path) -> list[str]:
    """What is wrong with keeping the stream of `keys` (`out:<hook>`, `in:<hook>`) in `cache_to`: it must lie inside
    the lab's data roots (so the Train page lists it and a training may read it) and hold no kept stream there yet."""
    if not in_data_roots(cache_to, home):
        return [f"cache_to: {brief(cache_to)} is outside the data roots; {OUTSIDE_ROOTS}"]
    root = Path(cache_to).expanduser()
    if root.exists() and not root.is_dir():
        return [f"cache_to: {brief(cache_to)} is a file; name a folder"]
    taken = [cache_folder(root, key) for key in keys if (cache_folder(root, key) / MANIFEST_FILE).exists()]
    return [
        f"cache_to: {brief(folder)} already holds activations; train on it (activation_source) or choose another folder"
        for folder in taken
    ]
