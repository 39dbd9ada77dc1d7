"""`python -m sae_core.evaluate --config EVALUATE.json --out DIR`, alone or under torchrun.

The entry that wires the model evaluation (`model/evaluate.py`) to the job store: a run the launcher
started (SAE_LAB_JOB_ID set) also sends its progress to lab.db, so the Jobs page shows it live.
"""

from __future__ import annotations

from .engine.run import exit_now
from .model.evaluate import main as run_evaluation
from .paths import use_private_files
from .train import job_sinks


def main(argv: list[str] | None = None) -> int:
    use_private_files()
    code = run_evaluation(argv, extra_sinks=job_sinks)  # torchrun's @record types it as optional
    return 0 if code is None else code


if __name__ == "__main__":
    exit_now(main())
