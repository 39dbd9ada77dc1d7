"""The model evaluation of 8 SAEs in one pass against 8 separate evaluations (issue 23; target >= 4x).

Setup: the tiny GPT-2 of the tests (tests/hf_models.py, trained briefly so its predictions carry information),
an extraction from it at transformer.h.0, and 8 TopK SAEs (d_sae 64-512, k 4-16) trained on it with the same
held-out tail, laid out as a sweep's run folder (sweep.json + a folder per member). Then, on the same held-out
contexts:
- processes: 8 `python -m sae_core.evaluate` runs one after the other (one per SAE), against one run given the
  sweep's folder (every member in one pass); wall time each way, interpreter and imports included;
- in-process: `sae_core.model.evaluate.main` 8 times against once (what the pass itself saves: the clean and
  ablated forwards once per batch instead of once per SAE, the model loaded once).
Checks the figures of both ways agree exactly, and prints both timings and their ratios.

    .venv/bin/python -m bench.sweep_eval [--contexts 64] [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sae_core.engine.run import main as train_main
from sae_core.files import MODEL_EVAL_FILE, SWEEP_FILE
from sae_core.model.evaluate import main as evaluate_main
from sae_core.model.run import main as extract_main
from tests.hf_models import HOOKS, save_tiny_model, sequence_corpus, train_briefly, write_corpus

MEMBERS = [(64, 4), (64, 8), (128, 4), (128, 8), (256, 8), (256, 16), (512, 8), (512, 16)]  # (d_sae, k)


def write_json(path: Path, value: dict) -> Path:
    path.write_text(json.dumps(value))
    return path


def build(work: Path, contexts: int) -> Path:
    """The sweep folder of 8 SAEs on the tiny GPT-2's activations, holding out `contexts` whole contexts."""
    lm = train_briefly(save_tiny_model("gpt2", work / "gpt2-random"), work / "gpt2")
    text = write_corpus(work / "text.txt", documents=sequence_corpus(600, seed=1))
    context_size = 32
    acts = work / "acts"
    extract = {"model": str(lm), "hook": HOOKS["gpt2"], "dataset": str(text), "n_tokens": 12_000,
               "context_size": context_size, "batch_size": 16, "shard_rows": 2000, "storage_dtype": "float32",
               "device": "cpu"}  # fmt: skip
    assert extract_main(["--config", str(write_json(work / "extract.json", extract)), "--out", str(acts)]) == 0
    run = work / "sweep"
    members = []
    for d_sae, k in MEMBERS:
        name = f"d_sae={d_sae},k={k}"
        cfg = {"activation_source": str(acts), "architecture": "topk", "d_sae": d_sae, "k": k, "batch_size": 256,
               "total_steps": 60, "holdout_tokens": (contexts + 1) * context_size, "log_every": 30, "device": "cpu"}  # fmt: skip
        assert train_main(["--config", str(write_json(work / f"{name}.json", cfg)), "--out", str(run / name)]) == 0
        members.append({"name": name, "overrides": {"d_sae": d_sae, "k": k}})
    write_json(run / SWEEP_FILE, {"placement": "batch", "world_size": 1, "members": members})
    return run


def config(work: Path, sae: Path, contexts: int, tag: str) -> Path:
    return write_json(
        work / f"eval-{tag}.json", {"sae": str(sae), "contexts": contexts, "batch_size": 8, "device": "cpu"}
    )


def in_process(work: Path, run: Path, folders: list[Path], contexts: int, tag: str) -> tuple[float, float]:
    """(seconds for 8 single evaluations, seconds for one evaluation of all 8), in this process."""
    started = time.perf_counter()
    for i, folder in enumerate(folders):
        cfg = config(work, folder, contexts, f"{tag}-{i}")
        assert evaluate_main(["--config", str(cfg), "--out", str(work / f"out-{tag}-{i}")]) == 0
    separate = time.perf_counter() - started
    started = time.perf_counter()
    cfg = config(work, run, contexts, f"{tag}-all")
    assert evaluate_main(["--config", str(cfg), "--out", str(work / f"out-{tag}-all")]) == 0
    return separate, time.perf_counter() - started


def processes(work: Path, run: Path, folders: list[Path], contexts: int, threads: int) -> tuple[float, float]:
    """(wall of 8 `python -m sae_core.evaluate` processes one after the other, wall of one over the sweep)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}

    def one(cfg: Path, out: Path) -> None:
        argv = [sys.executable, "-m", "sae_core.evaluate", "--config", str(cfg), "--out", str(out)]
        child = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        assert child.returncode == 0, child.stderr[-3000:]

    started = time.perf_counter()
    for i, folder in enumerate(folders):
        one(config(work, folder, contexts, f"p{i}"), work / f"proc-{i}")
    separate = time.perf_counter() - started
    started = time.perf_counter()
    one(config(work, run, contexts, "pall"), work / "proc-all")
    together = time.perf_counter() - started
    # the same figures both ways
    shared = json.loads((work / "proc-all" / MODEL_EVAL_FILE).read_text())
    for i, entry in enumerate(shared["saes"]):
        alone = json.loads((work / f"proc-{i}" / MODEL_EVAL_FILE).read_text())
        assert entry["ce_loss_score"] == alone["ce_loss_score"] and entry["kl_spliced"] == alone["kl_spliced"]
    return separate, together


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run = build(work, args.contexts)
        folders = [run / f"d_sae={d},k={k}" for d, k in MEMBERS]
        print(f"8 TopK SAEs of the tiny GPT-2 at {HOOKS['gpt2']}, {args.contexts} held-out contexts of 32 tokens, "
              f"batch 8, {args.threads} threads")  # fmt: skip
        timings = [in_process(work, run, folders, args.contexts, f"r{r}") for r in range(args.repeats)]
        separate = statistics.median(t[0] for t in timings)
        together = statistics.median(t[1] for t in timings)
        print(f"in-process: 8 evaluations {separate:.2f} s, one pass over all 8 {together:.2f} s: "
              f"{separate / together:.2f}x (median of {args.repeats})")  # fmt: skip
        p_separate, p_together = processes(work, run, folders, args.contexts, args.threads)
        print(f"processes (python -m sae_core.evaluate): 8 jobs {p_separate:.1f} s, one job {p_together:.1f} s: "
              f"{p_separate / p_together:.2f}x (target >= 4x); figures identical")  # fmt: skip


if __name__ == "__main__":
    main()
