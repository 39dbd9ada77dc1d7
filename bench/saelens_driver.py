"""SAELens's side of the quality bench: trains one SAE with sae_lens's own trainer and writes its weights.

Runs in the side environment (`make saelens-check` builds .venv-saelens), never imports sae_core:

    .venv-saelens/bin/python bench/saelens_driver.py SPEC.json DATA.safetensors OUT.safetensors

DATA holds `train` [N, d_in] (the rows SAE Lab trains on) and `holdout` [H, d_in]. SPEC names the
architecture, sizes, steps, batch, lr, seed, threads and the sparsity options. The rows are fed in a
seeded random order, reshuffled each epoch. OUT gets W_enc, b_enc, W_dec, b_dec (and threshold) in the
form every architecture's inference rule reads directly (decoder norms folded into the encoder), plus
`timing` [train seconds, steps, tokens, train CPU seconds of the process] and `own_fvu`: the SAE's own forward pass on the holdout, which the
bench checks its shared evaluation against.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from sae_lens import LoggingConfig  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig  # noqa: E402
from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig  # noqa: E402
from sae_lens.saes.matryoshka_batchtopk_sae import (  # noqa: E402
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig  # noqa: E402
from sae_lens.training.sae_trainer import SAETrainer  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def build_sae(spec: dict, d_in: int):
    common = {"d_in": d_in, "d_sae": spec["d_sae"], "dtype": "float32", "device": "cpu"}
    common["normalize_activations"] = spec.get("normalize_activations", "none")
    arch = spec["architecture"]
    if arch == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=spec["k"], **common))
    if arch == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=spec["k"], **common))
    if arch == "matryoshka_batchtopk":
        widths = list(spec["matryoshka_widths"])
        return MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(k=spec["k"], matryoshka_widths=widths, **common)
        )
    if arch == "gated":
        options = {name: spec[name] for name in ("l1_coefficient", "l1_warm_up_steps") if spec.get(name) is not None}
        return GatedTrainingSAE(GatedTrainingSAEConfig(**options, **common))
    if arch == "jumprelu":
        names = (
            "l0_coefficient", "l0_warm_up_steps", "jumprelu_init_threshold", "jumprelu_bandwidth",
            "jumprelu_sparsity_loss_mode", "target_l0", "pre_act_loss_coefficient",
        )  # fmt: skip
        options = {name: spec[name] for name in names if spec.get(name) is not None}
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(**options, **common))
    raise SystemExit(f"unknown architecture {arch!r}")


def batches(train: torch.Tensor, batch: int, seed: int):
    """Endless batches: a fresh permutation of the rows each epoch (an incomplete last batch is dropped)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(order) - batch + 1, batch):
            yield train[order[start : start + batch]]


@torch.no_grad()
def inference_tensors(sae, arch: str) -> dict[str, torch.Tensor]:
    """The weights with decoder norms folded in, so `(x - b_dec) @ W_enc + b_enc` is what each rule compares."""
    batch_rule = arch in ("batchtopk", "matryoshka_batchtopk")
    if arch == "topk" or batch_rule:
        threshold = float(sae.topk_threshold) if batch_rule else None
        sae.fold_W_dec_norm()  # with rescale_acts_by_decoder_norm: pre-activations times norms, decoder unit rows
        sae.cfg.rescale_acts_by_decoder_norm = False
    else:
        sae.fold_W_dec_norm()
        threshold = None
    names = (
        ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")
        if arch == "gated"
        else ("W_enc", "b_enc", "W_dec", "b_dec")
    )
    out = {name: getattr(sae, name).detach().clone().contiguous() for name in names}
    if batch_rule:
        out["threshold"] = torch.full((sae.cfg.d_sae,), threshold)
    elif arch == "jumprelu":
        out["threshold"] = sae.threshold.detach().clone().contiguous()
    return out


@torch.no_grad()
def own_fvu(sae, holdout: torch.Tensor, arch: str) -> float:
    """FVU through sae_lens's own inference path (BatchTopK through its saved JumpReLU rule)."""
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        return float("nan")  # the training class applies the batch rule; the bench's shared rule is the saved one
    sae.eval()
    x_hat = sae.decode(sae.encode(holdout))
    return float((holdout - x_hat).double().pow(2).sum() / (holdout - holdout.mean(0)).double().pow(2).sum())


def main() -> None:
    spec_path, data_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec.get("threads", 2))
    torch.manual_seed(spec["seed"])
    data = load_file(data_path)
    train, holdout = data["train"], data["holdout"]
    sae = build_sae(spec, train.shape[1])
    steps, batch = spec["steps"], spec["batch_size"]
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        lr=spec["lr"],
        lr_end=spec["lr"],
        lr_scheduler_name="constant",
        device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=batches(train, batch, spec["seed"]))
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    arch = spec["architecture"]
    tensors = inference_tensors(sae, arch)
    tensors["timing"] = torch.tensor(
        [seconds, float(trainer.n_training_steps), float(trainer.n_training_samples), cpu_seconds]
    )
    tensors["own_fvu"] = torch.tensor([own_fvu(sae, holdout, arch)])
    save_file(tensors, out_path)


if __name__ == "__main__":
    main()
