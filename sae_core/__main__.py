"""`python -m sae_core COMMAND ...`: the command line, mirroring the web pages.

Each command lives beside the code it drives and parses its own arguments; this
table only routes, and imports lazily so `gpus` does not pay for torch.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "toy": ("sae_core.data", "Write a toy activation set with ground-truth features."),
    "gpus": ("sae_core.gpus", "List GPUs, their processes and the host figures."),
    "estimate": ("sae_core.memory", "Estimate GPU memory per rank for a config."),
    "submit": ("sae_core.cli_jobs", "Queue a training job."),
    "jobs": ("sae_core.cli_jobs", "List jobs."),
    "cancel": ("sae_core.cli_jobs", "Cancel a job."),
    "resume": ("sae_core.cli_jobs", "Queue a job that resumes a failed or cancelled one."),
    "logs": ("sae_core.cli_jobs", "Show a job's log."),
    "serve": ("sae_core.launcher", "Run the launcher daemon (queue + GPU sampler)."),
}


def usage() -> str:
    lines = ["usage: python -m sae_core COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`python -m sae_core COMMAND --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    # Each module exposes `cli_<command>(argv) -> exit code`.
    return int(getattr(module, f"cli_{name}")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
