"""`python -m sae_core serve`: run the launcher daemon of this SAE_LAB_HOME (the app starts it for you)."""

from __future__ import annotations

import argparse
import logging
import os

from ..jobs.daemon import serve
from ..jobs.daemon_control import POLL_S
from ..jobs.lifecycle import GRACE_S


def cli_serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_core serve", description="Run the launcher daemon.")
    parser.add_argument("--interval", type=float, default=POLL_S, help="Seconds between queue passes.")
    parser.add_argument("--once", action="store_true", help="One pass (adopt/settle, start runnable), then exit.")
    parser.add_argument(
        "--grace",
        type=float,
        default=float(os.environ.get("SAE_LAB_CANCEL_GRACE_S", GRACE_S)),
        help="Seconds between SIGTERM and SIGKILL when cancelling.",
    )
    parser.add_argument(
        "--cpu-budget",
        type=int,
        default=None,
        help="Total gloo processes of concurrent CPU jobs (default: SAE_LAB_CPU_BUDGET, else the CPU cores).",
    )
    parser.add_argument("--sample-interval", type=float, default=1.0, help="GPU sampler period; 0 disables it.")
    args = parser.parse_args(argv)
    if args.interval <= 0 or args.grace < 0:
        parser.error("--interval must be > 0 and --grace >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(
        interval_s=args.interval,
        once=args.once,
        grace_s=args.grace,
        cpu_budget=args.cpu_budget,
        sampler_interval_s=args.sample_interval or None,
    )
