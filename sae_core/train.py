"""`python -m sae_core.train --config CFG.json --out DIR [--resume DIR]`, alone or under torchrun.

The entry that wires the training engine (`engine/run.py`) to the job store: a run the launcher started
(SAE_LAB_JOB_ID set) also sends its metrics to lab.db, so the pages chart it live.
"""

from __future__ import annotations

import os

from .engine.run import exit_now
from .engine.run import main as run_training
from .engine.sinks import MetricsSink
from .paths import use_private_files


def job_sinks() -> list[MetricsSink]:
    """The store's metrics sink for a launcher job; a plain run writes metrics.jsonl only."""
    job_id = os.environ.get("SAE_LAB_JOB_ID")
    if not job_id:
        return []
    # Imported here so that plain runs never load SQLModel (about 0.3 s per rank).
    from .jobs.metrics import SqliteMetricsSink

    return [SqliteMetricsSink(job_id=int(job_id))]


def open_stream(cfg, keys: list[str], device, rank: int, ranks: int):
    """A model's stream for `cfg` (model/stream.py), its problems as the engine's bad-input errors."""
    from .data.formats import DatasetError
    from .data.text import TextError
    from .model.loading import ModelError
    from .model.stream import open_stream as open_model_stream

    try:
        return open_model_stream(cfg, keys, device, rank, ranks)
    except (ModelError, TextError) as exc:
        raise DatasetError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    use_private_files()
    code = run_training(argv, extra_sinks=job_sinks, open_stream=open_stream)  # torchrun's @record: optional
    return 0 if code is None else code


if __name__ == "__main__":
    exit_now(main())
