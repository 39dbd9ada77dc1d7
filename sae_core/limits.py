"""Upper bounds of the numbers a config may hold (documented in README): far beyond any real run, well inside
int64 and float64. One place, so that TrainConfig and every architecture's options bound alike."""

from __future__ import annotations

MAX_STEPS = 10**9  # optimizer steps, and every step count (warm-ups, decay, log and checkpoint intervals)
MAX_TOKENS = 2**24  # tokens per step (batch_size, micro_batch_size)
MAX_HOLDOUT = 2**31
MAX_WIDTH = 2**24  # latents (d_sae)
MAX_K = 2**16  # k and aux_k
MAX_SEED = 2**63 - 1
MAX_COEFFICIENT = 1e6
MAX_PATH_CHARS = 4096  # a path or a hub name
MAX_CONTEXT = 2**17  # tokens per context
HOOK_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$"  # a module path: model.layers.12, transformer.h.6.mlp
