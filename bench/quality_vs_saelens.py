"""SAE quality, SAE Lab against SAELens at equal tokens (and at equal wall time), side by side.

Both tools train on the same rows and are judged on the same holdout rows (SAE Lab's fixed holdout for
seed 0), for the same number of optimizer steps at the same batch. SAE Lab runs in this process with its
own defaults (its automatic lr unless a row fixes one); SAELens runs in the side environment
(`make saelens-check` builds .venv-saelens) through `bench/saelens_driver.py`, with its trainer at constant
lr (its default schedule): the row's lr, or Gao et al.'s width rule (`saelens_lr`). Each tool's weights
are scored by one function here (`score`): FVU on the holdout, L0, the share of latents that never fire
on the holdout, and, on the toy set, mmcs against the ground-truth features.

    PYTHONPATH=. .venv/bin/python -m bench.quality_vs_saelens [--quick] [--cache DIR] [--rows T1,A1]

Data sets: the toy generator (512 ground-truth features in d_in 128) and activations of two layers of the
pretrained all-MiniLM-L6-v2 (d_in 384), extracted by SAE Lab's own entry (`bench/quality_data.py`). Data
and SAELens results are cached under --cache (SAELens runs do not depend on SAE Lab's code). The
equal-time section matches CPU seconds (bench/RESULTS.md says why) and reruns SAELens when its cached
result has no CPU time.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bench.quality_data import Dataset, minilm_set, toy_set
from sae_core.config import TrainConfig
from sae_core.data.checks import check_dataset
from sae_core.data.order import holdout_rows_for
from sae_core.engine.distributed import DistEnv
from sae_core.engine.evaluation import mean_max_cosine
from sae_core.engine.trainer import Trainer

HOLDOUT = 8192
GAO_LR_AT_16K = 2e-4  # Gao et al. (2024): SAELens's lr when a row fixes none (>= its own 3e-4 default here)
SEED = 0
SIDE_PYTHON = Path(__file__).resolve().parent.parent / ".venv-saelens" / "bin" / "python"
DRIVER = Path(__file__).with_name("saelens_driver.py")


@dataclass(frozen=True)
class Row:
    label: str
    dataset: str
    architecture: str
    d_sae: int
    k: int | None
    steps: int
    batch: int
    lr: float | None = None  # None: SAE Lab's automatic lr, and saelens_lr(row) for SAELens
    saelab: dict = field(default_factory=dict)  # TrainConfig fields this row sets for SAE Lab
    saelens: dict = field(default_factory=dict)  # driver options (JumpReLU's sparsity settings)
    equal_wall: bool = False  # also run SAE Lab for SAELens's wall time
    saelens_same_lr: bool = False  # give SAELens SAE Lab's automatic lr instead of the Gao et al. rule
    # "gao_lr": instead of SAELens, SAE Lab itself at Gao et al.'s lr rule (the long-run check of the defaults)
    versus: str = "saelens"


# JumpReLU: the same objective for both tools. SAELens normalises inputs as SAE Lab does (E‖x‖² = d_in),
# so SAE Lab's default L0 coefficient, initial threshold and bandwidth mean the same thing in both.
JUMPRELU_SAELENS = {
    "normalize_activations": "expected_average_only_in",
    "l0_coefficient": 5.0,
    "jumprelu_init_threshold": 0.01,
    "jumprelu_bandwidth": 0.05,
}


def at_l0(target: float) -> tuple[dict, dict]:
    """(SAE Lab's, SAELens's) JumpReLU settings aiming at one L0: SAE Lab's target_l0 (its coefficient adapts);
    SAELens's own way to an L0, Gemma Scope 2's quadratic sparsity loss around the same target."""
    saelens = {**JUMPRELU_SAELENS, "jumprelu_sparsity_loss_mode": "quadratic", "target_l0": target}
    return {"target_l0": target}, saelens


# Matryoshka's nested prefixes, the same for both tools (SAELens needs them given; the last is d_sae).
MATRYOSHKA_1024 = {"matryoshka_widths": [64, 256, 1024]}
# Gated: both tools at one L1 coefficient, SAELens normalising inputs as SAE Lab does (E‖x‖² = d_in).
GATED = {"l1_coefficient": 1.0}
GATED_SAELENS = {"normalize_activations": "expected_average_only_in", **GATED}

ROWS = [
    # toy: d_in 128, 512 ground-truth features
    Row("T1", "toy", "topk", 1024, 8, 400, 4096, lr=4e-4),  # issue 14's row: lr fixed for both
    Row("T2", "toy", "topk", 1024, 8, 200, 4096, equal_wall=True),
    Row("T3", "toy", "topk", 512, 16, 100, 4096),
    Row("T4", "toy", "topk", 4096, 8, 100, 2048),
    Row("T5", "toy", "topk", 512, 32, 5000, 256),
    Row("T6", "toy", "batchtopk", 1024, 8, 200, 4096),
    Row("T7", "toy", "jumprelu", 1024, None, 200, 4096, saelens=JUMPRELU_SAELENS),
    # MiniLM layer 1 (d_in 384)
    Row("A1", "minilm-l1", "topk", 3072, 32, 200, 1024, equal_wall=True),
    Row("A2", "minilm-l1", "topk", 1536, 128, 200, 1024),
    Row("A3", "minilm-l1", "batchtopk", 1536, 32, 200, 1024),
    Row("A4", "minilm-l1", "jumprelu", 1536, None, 200, 1024, saelens=JUMPRELU_SAELENS),
    # MiniLM layer 4
    Row("B1", "minilm-l4", "topk", 1536, 32, 300, 1024),
    Row("B2", "minilm-l4", "topk", 6144, 16, 100, 512),
    Row("B3", "minilm-l4", "topk", 1536, 8, 100, 2048),
    # SAELens at SAE Lab's (4x higher) automatic lr: does the lr alone close the gap?
    Row("T3=", "toy", "topk", 512, 16, 100, 4096, saelens_same_lr=True),
    Row("B3=", "minilm-l4", "topk", 1536, 8, 100, 2048, saelens_same_lr=True),
    # issue 22: the new architectures against SAELens's own trainer for the same architecture, equal tokens
    Row("T8", "toy", "matryoshka_batchtopk", 1024, 8, 200, 4096, saelab=MATRYOSHKA_1024, saelens=MATRYOSHKA_1024),
    Row("T9", "toy", "gated", 1024, None, 200, 4096, saelab=GATED, saelens=GATED_SAELENS),
    # JumpReLU at equal L0: SAE Lab's target_l0 against SAELens's quadratic loss around the same target, and
    # TopK at k = that L0 (T10k, A5k)
    Row("T10", "toy", "jumprelu", 1024, None, 1000, 4096, saelab=at_l0(8)[0], saelens=at_l0(8)[1]),
    Row("T10k", "toy", "topk", 1024, 8, 1000, 4096),
    Row("A5", "minilm-l1", "jumprelu", 1536, None, 1000, 1024, saelab=at_l0(32)[0], saelens=at_l0(32)[1]),
    Row("A5k", "minilm-l1", "topk", 1536, 32, 1000, 1024),
    # the long run: today's default lr rule against Gao et al.'s, both SAE Lab, 20,000 steps
    Row("L1", "toy", "topk", 1024, 8, 20_000, 4096, versus="gao_lr"),
]
QUICK = ["T3", "T6", "B3"]


def load_dataset(ds: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(all rows float32, the holdout rows' indices, ground-truth features or None) through SAE Lab's reader."""
    cfg = TrainConfig(activation_source=str(ds.source), d_sae=1, k=1, total_steps=1, holdout_tokens=HOLDOUT)
    data = check_dataset(cfg, scan_values=False)
    rows = np.asarray(data.read(np.arange(data.n_rows)), dtype=np.float32)
    features = None if data.features is None else np.asarray(data.features)
    return rows, holdout_rows_for(data.n_rows, HOLDOUT, SEED), features


def split_file(cache: Path, ds: Dataset, rows: np.ndarray, holdout: np.ndarray) -> Path:
    """The rows handed to SAELens: every row SAE Lab may train on, and the holdout."""
    path = cache / f"{ds.name}_{ds.rows}_split.safetensors"
    if not path.exists():
        train = np.delete(np.arange(len(rows)), holdout)
        save_file({"train": torch.from_numpy(rows[train]), "holdout": torch.from_numpy(rows[holdout])}, str(path))
    return path


def saelab_config(row: Row, ds: Dataset, steps: int) -> TrainConfig:
    options = {"lr": row.lr} if row.lr is not None and "lr" not in row.saelab else {}
    return TrainConfig(
        activation_source=str(ds.source),
        architecture=row.architecture,
        d_sae=row.d_sae,
        **({"k": row.k} if row.k is not None else {}),
        batch_size=row.batch,
        total_steps=steps,
        holdout_tokens=HOLDOUT,
        seed=SEED,
        device="cpu",
        log_every=10**9,
        checkpoint_every=10**9,
        **options,
        **row.saelab,
    )


def saelens_lr(row: Row) -> float:
    """The row's lr, or Gao et al.'s width rule (what SAE Lab used before issue 14; at these widths at least
    SAELens's own 3e-4 default, so SAELens is not handicapped by its default)."""
    if row.lr is not None:
        return row.lr
    if row.saelens_same_lr:
        return TrainConfig(activation_source="-", d_sae=row.d_sae, k=1, total_steps=1).effective_lr
    return GAO_LR_AT_16K / math.sqrt(row.d_sae / 2**14)


def run_saelab(row: Row, ds: Dataset, steps: int) -> dict:
    cfg = saelab_config(row, ds, steps)
    data = check_dataset(cfg, scan_values=False)
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(cfg, Path(out), DistEnv(device=torch.device("cpu")), data)
        cpu_start = time.process_time()
        figures = trainer.run()  # its CPU time includes the final holdout evaluation and file writing: against us
        cpu_seconds = time.process_time() - cpu_start
    seconds = figures["tokens"] / figures["tokens_per_s"]
    return {
        "tensors": trainer.sae.export_tensors(),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "tokens": figures["tokens"],
        "lr": cfg.effective_lr,
    }


def run_saelens(row: Row, split: Path, lr: float, cache: Path, threads: int, need_cpu: bool = False) -> dict:
    """SAELens's run of `row` (cached); `need_cpu` reruns a cached result that lacks the CPU time."""
    spec = {
        "architecture": row.architecture,
        "d_sae": row.d_sae,
        "k": row.k,
        "steps": row.steps,
        "batch_size": row.batch,
        "lr": lr,
        "seed": SEED,
        "threads": threads,
        **row.saelens,
    }
    key = hashlib.sha256(json.dumps([spec, split.name], sort_keys=True).encode()).hexdigest()[:16]
    out = cache / f"saelens_{row.label}_{key}.safetensors"
    if out.exists() and need_cpu and len(load_file(str(out))["timing"]) < 4:
        out.unlink()
    if not out.exists():
        spec_path = cache / f"saelens_{key}.json"
        spec_path.write_text(json.dumps(spec))
        subprocess.run([str(SIDE_PYTHON), str(DRIVER), str(spec_path), str(split), str(out)], check=True)
    tensors = load_file(str(out))
    seconds, _steps, tokens, *cpu = tensors.pop("timing").tolist()
    own = float(tensors.pop("own_fvu"))
    return {
        "tensors": tensors,
        "seconds": seconds,
        "cpu_seconds": cpu[0] if cpu else None,
        "tokens": int(tokens),
        "own_fvu": own,
    }


@torch.no_grad()
def score(tensors: dict, architecture: str, k: int | None, x: torch.Tensor, features: np.ndarray | None) -> dict:
    """One evaluation for both tools, on raw holdout rows x [H, d_in] and SAELens-named inference weights:
    TopK keeps each row's k largest pre-activations (ReLU'd); the threshold rule (JumpReLU, and BatchTopK as
    saved) keeps pre-activations above the per-latent threshold."""
    x_cent = x - tensors["b_dec"]
    if architecture == "gated":  # the gate decides which latents fire, the magnitude path how strongly
        gate = x_cent @ tensors["W_enc"] + tensors["b_gate"] > 0
        z = gate * (x_cent @ (tensors["W_enc"] * tensors["r_mag"].exp()) + tensors["b_mag"]).relu()
    elif architecture == "topk":
        pre = x_cent @ tensors["W_enc"] + tensors["b_enc"]  # [H, d_sae]
        vals, idx = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    elif architecture == "standard":
        z = (x_cent @ tensors["W_enc"] + tensors["b_enc"]).relu()
    else:
        pre = x_cent @ tensors["W_enc"] + tensors["b_enc"]
        z = pre.relu() * (pre > tensors["threshold"])
    x_hat = z @ tensors["W_dec"] + tensors["b_dec"]
    x64 = x.double()
    fvu = float((x64 - x_hat.double()).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())
    fired = (z > 0).any(0)
    figures = {"fvu": fvu, "l0": float((z > 0).sum(-1).float().mean()), "dead": float((~fired).float().mean())}
    if features is not None:
        figures["mmcs"] = mean_max_cosine(torch.from_numpy(features), tensors["W_dec"])
    return figures


def fmt(figures: dict, seconds: float, tokens: int) -> str:
    mmcs = f"{figures['mmcs']:.3f}" if "mmcs" in figures else "-"
    return (
        f"{figures['fvu']:.4f} | {figures['l0']:.1f} | {figures['dead']:.3f} | {mmcs} | "
        f"{tokens / seconds:,.0f} | {seconds:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only rows {', '.join(QUICK)}")
    parser.add_argument("--rows", help="comma-separated row labels (default: all, or the quick ones)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "sae-lab-quality"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-equal-wall", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--saelens-only", action="store_true", help="only fill the cache of SAELens runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    wanted = args.rows.split(",") if args.rows else (QUICK if args.quick else [r.label for r in ROWS])
    rows = [r for r in ROWS if r.label in wanted]
    loaded: dict[str, tuple] = {}
    results = []
    print(
        "| row | dataset | arch | d_in | d_sae (×) | k | steps | batch | lr (Lab / Lens) | SAE Lab FVU | L0 | dead | MMCS | tok/s | "
        "train s | SAELens FVU | L0 | dead | MMCS | tok/s | train s | FVU ratio |"
    )
    print("|" + "---|" * 22)
    for row in rows:
        if row.dataset not in loaded:
            ds = toy_set(cache, 2**19 + HOLDOUT) if row.dataset == "toy" else minilm_set(cache, row.dataset, 2**18)
            rows_np, holdout, features = load_dataset(ds)
            loaded[row.dataset] = (
                ds,
                split_file(cache, ds, rows_np, holdout),
                torch.from_numpy(rows_np[holdout]),
                features,
            )
            del rows_np
        ds, split, x, features = loaded[row.dataset]
        if args.saelens_only:
            lr = saelens_lr(row)
            theirs = run_saelens(row, split, lr, cache, args.threads)
            print(f"{row.label}: SAELens {score(theirs['tensors'], row.architecture, row.k, x, features)}", flush=True)
            continue
        mine = run_saelab(row, ds, row.steps)
        equal_wall = row.equal_wall and not args.no_equal_wall
        if row.versus == "gao_lr":
            gao = replace(row, saelab={**row.saelab, "lr": GAO_LR_AT_16K / math.sqrt(row.d_sae / 2**14)})
            theirs = {**run_saelab(gao, ds, row.steps), "own_fvu": float("nan")}
        else:
            theirs = run_saelens(row, split, saelens_lr(row), cache, args.threads, need_cpu=equal_wall)
        a = score(mine["tensors"], row.architecture, row.k, x, features)
        b = score(theirs["tensors"], row.architecture, row.k, x, features)
        if math.isfinite(theirs["own_fvu"]) and abs(b["fvu"] - theirs["own_fvu"]) > 1e-3 * max(1.0, b["fvu"]):
            raise SystemExit(f"{row.label}: shared FVU {b['fvu']:.5f} != SAELens's own {theirs['own_fvu']:.5f}")
        d_in = x.shape[1]
        print(
            f"| {row.label} | {row.dataset} | {row.architecture} | {d_in} | {row.d_sae} ({row.d_sae // d_in}×) | "
            f"{row.k or '-'} | {row.steps} | {row.batch} | {mine['lr']:.2g} / {saelens_lr(row):.2g} | "
            f"{fmt(a, mine['seconds'], mine['tokens'])} | {fmt(b, theirs['seconds'], theirs['tokens'])} | "
            f"{a['fvu'] / b['fvu']:.3f} |",
            flush=True,
        )
        result = {
            "row": asdict(row),
            "saelab": a,
            "saelens": b,
            "saelab_s": mine["seconds"],
            "saelens_s": theirs["seconds"],
        }
        if equal_wall:
            # Matched on CPU seconds, a stand-in for wall time on a quiet machine (both use the same threads):
            # on this shared VM the wall clock of two runs minutes apart is not comparable.
            steps = max(row.steps, int(row.steps * theirs["cpu_seconds"] / mine["cpu_seconds"]))
            wall = run_saelab(row, ds, steps)
            result["equal_wall"] = {"steps": steps, **score(wall["tensors"], row.architecture, row.k, x, features),
                                    "seconds": wall["seconds"], "cpu_seconds": wall["cpu_seconds"],
                                    "saelens_cpu_seconds": theirs["cpu_seconds"]}  # fmt: skip
        results.append(result)
    walls = [r for r in results if "equal_wall" in r]
    if walls:
        print("\nEqual time: SAE Lab trains for SAELens's training CPU seconds (more steps, same batch).\n")
        print("| row | SAELens steps | CPU s | wall s | FVU | SAE Lab steps | CPU s | wall s | FVU | FVU lower by |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in walls:
            w, b = r["equal_wall"], r["saelens"]
            print(
                f"| {r['row']['label']} | {r['row']['steps']} | {w['saelens_cpu_seconds']:.1f} | {r['saelens_s']:.1f} | "
                f"{b['fvu']:.4f} | {w['steps']} | {w['cpu_seconds']:.1f} | {w['seconds']:.1f} | {w['fvu']:.4f} | "
                f"{1 - w['fvu'] / b['fvu']:.1%} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
