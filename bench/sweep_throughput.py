"""A sweep of 8 SAEs on one read against the 8 single runs one after the other, cold and warm.

On a float16 activation folder at d_in 2304 (bench/data_throughput.py's, --gb GB), for each case:
- the sweep's wall time (construction, loop, evaluation and files: what a job costs), cold (the set's pages
  dropped first) and warm;
- the sum of the members' own step times measured inside the sweep, against the sweep's loop time: what the
  shared read and the loop cost on top (target <= 1.15x);
- the 8 single runs one after the other, each cold (every run reads the set from the disk) and warm.
Cases: "mixed" is the issue's member mix scaled to a 2-core CPU (TopK and BatchTopK, d_sae 512-1024, k 16-64); on a
GPU pass --d-sae 1024,8192. "read-bound" has d_sae 64, where reading and converting a batch costs about as much as
a step: there the sweep's saving is the reads it does not repeat (8 (R + S) / (R + 8 S) for a read R and a step S:
1.78x at R = S, 2x needs R >= 4/3 S).

    .venv/bin/python -m bench.sweep_throughput [--dir /var/tmp/sae-bench-sweep] [--gb 1] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.data_throughput import build_set, drop_cache
from sae_core.data.checks import check_dataset
from sae_core.engine.distributed import DistEnv
from sae_core.engine.sweep_trainer import SweepTrainer
from sae_core.engine.trainer import Trainer
from sae_core.sweep import sweep_from_dict


def sweep_of(source: Path, steps: int, widths: list[int], ks: list[int]):
    base = {
        "activation_source": str(source),
        "batch_size": 4096,
        "total_steps": steps,
        "holdout_tokens": 4096,
        "log_every": 10,
        "checkpoint_every": steps,
        "device": "cpu",
    }
    grid = {"architecture": ["topk", "batchtopk"], "d_sae": widths, "k": ks}
    return sweep_from_dict({**base, "sweep": grid}).with_placement("batch")


def timed(make, source: Path, cold: bool):
    if cold:
        drop_cache(source)
    started = time.perf_counter()
    trainer = make()
    trainer.run()
    return time.perf_counter() - started, trainer


def run_case(name: str, source: Path, steps: int, widths: list[int], ks: list[int]) -> dict:
    sweep = sweep_of(source, steps, widths, ks)
    env = DistEnv(device=torch.device("cpu"))
    data = check_dataset(sweep.shared, 1, scan_values=False)
    figures: dict = {"case": name, "members": len(sweep.members), "steps": steps}
    with tempfile.TemporaryDirectory() as out:
        for temperature in ("cold", "warm"):
            folder = Path(out) / temperature
            make_sweep = lambda f=folder: SweepTrainer(sweep, f, env, data)  # noqa: E731
            wall, trainer = timed(make_sweep, source, temperature == "cold")
            figures[f"sweep_{temperature}_s"] = wall
            if temperature == "warm":
                figures["members_step_s"] = sum(trainer.step_seconds.values())
                figures["sweep_loop_s"] = trainer.loop_seconds
            singles = 0.0
            for member in sweep.members:
                make = lambda m=member, t=temperature: Trainer(m.config, Path(out) / f"{t}_{m.name}", env, data)  # noqa: E731
                singles += timed(make, source, temperature == "cold")[0]
            figures[f"singles_{temperature}_s"] = singles
            figures[f"speedup_{temperature}"] = singles / figures[f"sweep_{temperature}_s"]
    figures["loop_over_member_steps"] = figures["sweep_loop_s"] / figures["members_step_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/sae-bench-sweep"))
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--d-sae", default="512,1024", help="the mixed case's widths")
    parser.add_argument("--cases", default="mixed,read-bound")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    source = build_set(args.dir, args.gb)
    cases = {"mixed": ([int(w) for w in args.d_sae.split(",")], [16, 64]), "read-bound": ([64], [4, 8, 12, 16])}
    results = []
    for name in args.cases.split(","):
        widths, ks = cases[name]
        figures = run_case(name, source, args.steps, widths, ks)
        results.append(figures)
        print(
            f"{name}: {figures['members']} members x {figures['steps']} steps | sweep cold {figures['sweep_cold_s']:.1f} s, "
            f"warm {figures['sweep_warm_s']:.1f} s | {figures['members']} singles cold {figures['singles_cold_s']:.1f} s, warm "
            f"{figures['singles_warm_s']:.1f} s | speed-up cold {figures['speedup_cold']:.2f}x, warm "
            f"{figures['speedup_warm']:.2f}x | sweep loop / members' own steps {figures['loop_over_member_steps']:.3f}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
