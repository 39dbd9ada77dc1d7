"""SAE Lab core: configuration, SAE architectures, data, training, GPUs, store and launcher.

Nothing here imports Streamlit; the pages are thin views over these functions. Heavy modules
(torch, SQLModel) are imported lazily so `python -m sae_core gpus` stays quick.
"""

from __future__ import annotations

import importlib

from .config import ConfigError, TrainConfig

_LAZY = {
    "SparseAutoencoder": "sae_core.sae",
    "load": "sae_core.sae",
    "save": "sae_core.sae",
    "open_activations": "sae_core.data",
    "check_dataset": "sae_core.data",
    "DatasetError": "sae_core.data",
    "RankBatches": "sae_core.data",
    "Prefetcher": "sae_core.data",
    "write_toy": "sae_core.data",
    "evaluate": "sae_core.evaluation",
    "probe": "sae_core.gpus",
    "Probe": "sae_core.gpus",
    "estimate": "sae_core.memory",
    "MemoryEstimate": "sae_core.memory",
    "gpu_statuses": "sae_core.availability",
    "recommend": "sae_core.availability",
    "validate": "sae_core.availability",
    "query_series": "sae_core.history",
    "Sampler": "sae_core.history",
}

__all__ = ["TrainConfig", "ConfigError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sae_core' has no attribute {name!r}")
