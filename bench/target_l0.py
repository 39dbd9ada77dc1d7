"""Does `target_l0` end a run at the L0 asked for, as well as TopK reconstructs at that L0? (issue 22)

MiniLM-L6's layer-4 hidden states (the quality bench's set, `bench/quality_data.py`), 1,500 steps of 4,096
tokens, d_sae 1,536: a JumpReLU with `target_l0` 32 and a standard SAE with `target_l0` 32 against TopK at
k = 32, scored on the same holdout rows. Targets: holdout L0 within ±25 % of 32, FVU no worse than TopK's
+10 %.

    PYTHONPATH=. .venv/bin/python -m bench.target_l0 [--steps 1500] [--batch 4096] [--cache DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.quality_data import minilm_set
from sae_core.config import TrainConfig
from sae_core.data.checks import check_dataset
from sae_core.engine.distributed import DistEnv
from sae_core.engine.trainer import Trainer

TARGET = 32
RUNS = {
    "topk (k 32)": {"architecture": "topk", "k": TARGET},
    "jumprelu (target_l0 32)": {"architecture": "jumprelu", "target_l0": TARGET},
    "standard (target_l0 32)": {"architecture": "standard", "target_l0": TARGET},
}


def train(source: Path, steps: int, batch: int, options: dict) -> dict:
    """One run of SAE Lab's trainer: its holdout figures and the sparsity coefficient's path."""
    cfg = TrainConfig(
        activation_source=str(source), d_sae=1536, batch_size=batch, total_steps=steps, holdout_tokens=8192,
        device="cpu", log_every=100, checkpoint_every=10**9, **options,
    )  # fmt: skip
    data = check_dataset(cfg, scan_values=False)
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        figures = Trainer(cfg, Path(out), DistEnv(device=torch.device("cpu")), data).run()
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    path = [
        (r["step"], round(r["l0"], 1), r.get("stats", {}).get("sparsity_coefficient")) for r in records if "step" in r
    ]
    return {**figures, "seconds": time.perf_counter() - start, "path": path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "sae-lab-quality"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    source = minilm_set(cache, "minilm-l4", 2**18).source
    results = {label: train(source, args.steps, args.batch, options) for label, options in RUNS.items()}
    topk_fvu = results["topk (k 32)"]["fvu"]
    print(f"MiniLM layer 4, d_sae 1536, {args.steps} steps of {args.batch} tokens, holdout 8192 rows\n")
    print("| run | holdout L0 | within ±25 % of 32 | holdout FVU | FVU / TopK's | ≤ 1.10 | seconds |")
    print("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        within = abs(r["l0"] - TARGET) <= 0.25 * TARGET
        ratio = r["fvu"] / topk_fvu
        print(f"| {label} | {r['l0']:.1f} | {'yes' if within else 'no'} | {r['fvu']:.4f} | {ratio:.3f} | "
              f"{'yes' if ratio <= 1.10 else 'no'} | {r['seconds']:.0f} |")  # fmt: skip
    for label, r in results.items():
        if "target" in label:
            print(f"\n{label}: (step, batch L0, sparsity coefficient) every 100 steps: {r['path']}")


if __name__ == "__main__":
    main()
