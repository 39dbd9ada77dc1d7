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


def main(argv: list[str] | None = None) -> int:
    use_private_files()
    code = run_training(argv, extra_sinks=job_sinks)  # torchrun's @record types it as optional
    return 0 if code is None else code


if __name__ == "__main__":
    exit_now(main())
