"""SAE Lab core: the library behind the web app and the CLI, in layers (see README's architecture map).

    config, architectures, paths, files, outputs, access    facts and files every layer shares
    engine/  data/                                           torch: training, evaluation; activation data
    gpu/     jobs/                                           no torch: GPUs; the queue and its processes
    cli/     ui/                                             the command line; pure helpers of the pages

The names below are re-exported lazily, so `import sae_core` stays quick and torch-free until a torch
name is used.
"""

from __future__ import annotations

import importlib

from .config import ConfigError, TrainConfig

_LAZY = {
    "SparseAutoencoder": "sae_core.engine.saes",
    "make_sae": "sae_core.engine.saes",
    "load": "sae_core.engine.saelens",
    "save": "sae_core.engine.saelens",
    "evaluate": "sae_core.engine.evaluation",
    "open_activations": "sae_core.data.activations",
    "check_dataset": "sae_core.data.checks",
    "DatasetError": "sae_core.data.formats",
    "BlockOrder": "sae_core.data.order",
    "Loader": "sae_core.data.loader",
    "write_toy": "sae_core.data.toy",
    "probe": "sae_core.gpu.nvml",
    "Probe": "sae_core.gpu.types",
    "estimate": "sae_core.gpu.memory",
    "MemoryEstimate": "sae_core.gpu.memory",
    "recommend": "sae_core.gpu.availability",
    "query_series": "sae_core.gpu.history",
    "Sampler": "sae_core.gpu.history",
    "gpu_statuses": "sae_core.jobs.gpus",
    "submit": "sae_core.jobs.submission",
}

__all__ = ["ConfigError", "TrainConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sae_core' has no attribute {name!r}")
