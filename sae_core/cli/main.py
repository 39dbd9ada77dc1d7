"""The command table of `python -m sae_core`: routes a command to its module, imported only when run.

Each command module exposes `cli_<command>(argv) -> exit code`; `gpus` must not pay for torch, so
nothing is imported before the command is known.
"""

from __future__ import annotations

import importlib
import sys

from ..db.health import LabDatabaseError
from ..paths import use_private_files

COMMANDS: dict[str, tuple[str, str]] = {
    "toy": ("sae_core.cli.toy", "Write a toy activation set with ground-truth features."),
    "gpus": ("sae_core.cli.gpus", "List GPUs, their processes and the host figures."),
    "estimate": ("sae_core.cli.estimate", "Estimate GPU memory per rank for a config."),
    "submit": ("sae_core.cli.jobs", "Queue a training job."),
    "jobs": ("sae_core.cli.jobs", "List jobs."),
    "cancel": ("sae_core.cli.jobs", "Cancel a job."),
    "resume": ("sae_core.cli.jobs", "Queue a job that resumes a failed or cancelled one."),
    "logs": ("sae_core.cli.jobs", "Show a job's log."),
    "serve": ("sae_core.cli.serve", "Run the launcher daemon (queue + GPU sampler)."),
    "hooks": ("sae_core.cli.hooks", "List a model's hookable modules and their widths."),
    "rows": ("sae_core.cli.rows", "Count the rows a text gives a model (tokenized, packed into contexts)."),
    "extract": ("sae_core.cli.jobs", "Queue an extraction job (and a training on its output, and its evaluation)."),
    "evaluate": ("sae_core.cli.jobs", "Queue a model evaluation of an SAE (CE loss and KL recovered)."),
    "inspect": ("sae_core.cli.jobs", "Queue an inspection of an SAE's latents (for the Explore page)."),
}


def usage() -> str:
    lines = ["usage: python -m sae_core COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`python -m sae_core COMMAND --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    use_private_files()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(getattr(module, f"cli_{name}")(rest) or 0)
    except LabDatabaseError as exc:  # one message saying what is wrong with lab.db and what to do
        print(f"error: {exc}", file=sys.stderr)
        return 1
