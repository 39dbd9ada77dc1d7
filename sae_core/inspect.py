"""`python -m sae_core.inspect --config INSPECT.json --out DIR`, alone or under torchrun.

The entry that wires the inspection (`model/inspect.py`) to the job store: a run the launcher
started (SAE_LAB_JOB_ID set) also sends its progress to lab.db, so the Jobs page shows it live.
"""

from __future__ import annotations

from .engine.run import exit_now
from .model.inspect import main as run_inspection
from .paths import use_private_files
from .train import job_sinks


def main(argv: list[str] | None = None) -> int:
    use_private_files()
    code = run_inspection(argv, extra_sinks=job_sinks)  # torchrun's @record types it as optional
    return 0 if code is None else code


if __name__ == "__main__":
    exit_now(main())
