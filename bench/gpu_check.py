"""The GPU check's steps, one function each; `bench/gpu_check.sh` runs them (see its header).

    python -m bench.gpu_check --plan [--dry-run]                  # "STEP SECONDS" lines, most valuable first
    python -m bench.gpu_check --environment --out DIR             # python, torch, CUDA, missing modules
    python -m bench.gpu_check --step STEP --out DIR [--dry-run]   # one step (the driver wraps it in `timeout`)
    python -m bench.gpu_check --summary --out DIR                 # DIR/summary.md from every step's files
    python -m bench.gpu_check --requirements                      # the pinned packages it needs (to carry)

Each step writes DIR/STEP/result.json as it goes (status, headline figures against their targets, tables), so
a step stopped by its time box keeps what it had measured; the driver adds DIR/STEP/log.txt and run.json (exit
code, seconds, time box). `--dry-run` runs every step on the CPU at tiny sizes, with fake NVML GPUs, and judges
no targets: CI runs it to prove the check still runs. The measuring itself lives in the benches this reuses
(train_throughput, memory_accuracy, data_throughput, extract_throughput); what is written, in gpu_check_report.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.gpu_check_report import GiB, Record, environment, log_tail, requirements, size_text, summary

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- sizes: a GPU's, and the dry run's
@dataclass(frozen=True)
class Sizes:
    d_in: int  # width of the activations (gemma-2-2b's residual stream on a GPU)
    d_saes: tuple[int, ...]
    batches: tuple[int, ...]
    k: int
    warmup: int  # training steps before the timed ones
    timed: int
    holdout: int
    sampler_s: float
    set_gb: float  # the shared float16 activation set at d_in
    matmul: int  # side of the square bf16 matmul whose rate is the peak
    feed_batches: int
    wait_steps: int
    model: dict  # tests.hf_models.save_tiny_model's arguments
    hook: str
    context: int
    extract_tokens: int
    extract_batch: int
    extract_repeats: int
    eval_contexts: int
    eval_batch: int


GPU_SIZES = Sizes(
    d_in=2304, d_saes=(16384, 65536), batches=(4096, 16384), k=64, warmup=2, timed=8, holdout=8192, sampler_s=30,
    set_gb=0.6, matmul=8192, feed_batches=100, wait_steps=100,
    # ~770 M parameters: a Llama of gemma-2-2b's width, 8 layers, GQA, a 32k vocabulary; bf16 weights
    model={"family": "llama", "width": 2304, "layers": 8, "heads": 18, "kv_heads": 6, "intermediate": 9216,
           "vocab_size": 32000, "dtype": "bfloat16"},
    hook="model.layers.4", context=128, extract_tokens=2**19, extract_batch=64, extract_repeats=2, eval_contexts=64, eval_batch=16,
)  # fmt: skip
DRY_SIZES = Sizes(
    d_in=64, d_saes=(256,), batches=(256,), k=8, warmup=1, timed=2, holdout=1024, sampler_s=3,
    set_gb=0.004, matmul=256, feed_batches=5, wait_steps=10,
    model={"family": "llama", "width": 64, "layers": 2}, hook="model.layers.1",
    context=32, extract_tokens=2048, extract_batch=16, extract_repeats=1, eval_contexts=8, eval_batch=4,
)  # fmt: skip

# The targets the summary judges (GPU runs only).
TOPK_FLOOR_RATIO = 2.0  # TopK step ÷ encoder matmul, bf16 autocast, at the first d_sae
MEMORY_ERROR = 0.10  # estimate within ±10 % of the measured peak
DATA_WAIT = 0.05  # share of the step spent waiting for data
EXTRACTION_RATIO = 0.85  # extraction ÷ the model's own forward to the hook (the extraction issue's target)
SAMPLES_PER_S = 0.8  # sampler rows per GPU per second (it ticks at 1 Hz)


class Context:
    """What every step knows: where to write, dry run or not, the device, the sizes, the shared work folder."""

    def __init__(self, out: Path, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        self.sizes = DRY_SIZES if dry_run else GPU_SIZES
        # Shared inputs (the activation set, the model, the corpus: GBs on a GPU run), outside `out`: the
        # driver makes a temporary folder and deletes it at the end.
        self.work = Path(os.environ.get("GPU_CHECK_WORK") or out / "work")
        self.work.mkdir(parents=True, exist_ok=True)

    @property
    def cuda(self) -> bool:
        import torch

        return not self.dry_run and torch.cuda.is_available()

    @property
    def device(self):
        import torch

        return torch.device("cuda", 0) if self.cuda else torch.device("cpu")

    @property
    def config_device(self) -> str:
        # "auto" in a dry run: the configs accept bf16 autocast, and CUDA_VISIBLE_DEVICES="" keeps it on the CPU
        return "cuda" if self.cuda else "auto"


def run_logged(argv: list[str], log: Path, env: dict | None = None, timeout: float | None = None) -> int:
    """Run a child with its output appended to `log`; its exit code."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        return subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode


# --------------------------------------------------------------------------- shared inputs (built once per run)
def shared_set(ctx: Context) -> Path:
    """The warm float16 activation set at d_in (random rows, a manifest like an extraction's)."""
    from bench.data_throughput import build_set

    return build_set(ctx.work / "activations", ctx.sizes.set_gb, d_in=ctx.sizes.d_in)


def shared_corpus(ctx: Context) -> Path:
    from tests.hf_models import write_corpus

    path = ctx.work / "corpus.txt"
    if not path.exists():  # ~22 tokens a document: enough for the extraction's tokens
        write_corpus(path, n_documents=ctx.sizes.extract_tokens // 12 + 200)
    return path


def shared_model(ctx: Context) -> Path:
    """The largest model the project builds without a download, at random initialisation (on the GPU, where
    initialising hundreds of millions of weights takes a moment)."""
    from tests.hf_models import save_tiny_model

    folder = ctx.work / "model"
    if not (folder / "config.json").exists():
        spec = dict(ctx.sizes.model)
        save_tiny_model(spec.pop("family"), folder, **spec, device="cuda" if ctx.cuda else None)
        if ctx.cuda:
            import torch

            torch.cuda.empty_cache()  # the steps measure other processes' memory; give this one's back
    return folder


def shared_sae(ctx: Context) -> Path:
    """A random TopK SAE for the model's hook, in SAELens's format (what an evaluation reads)."""
    import torch

    from sae_core.architectures import ARCHITECTURES
    from sae_core.engine.saelens import save
    from sae_core.engine.saes import make_sae

    folder = ctx.work / "sae"
    if not (folder / "cfg.json").exists():
        torch.manual_seed(0)
        options = ARCHITECTURES["topk"].options(k=ctx.sizes.k)
        save(make_sae("topk", ctx.sizes.model["width"], ctx.sizes.d_saes[0], options), folder)
    return folder


# --------------------------------------------------------------------------- step 1: NVML and the sampler
HOLD = """
import sys, time
if sys.argv[1] == "cuda":
    import torch
    block = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.readline()
"""


def step_nvml(ctx: Context, rec: Record, d: Path) -> None:
    """`python -m sae_core gpus --json` (the real device through NVML), then the launcher daemon's GPU sampler
    for sampler_s seconds into a fresh lab home, while a process holding 1 GiB on the GPU should be listed."""
    home = ctx.out / "lab"
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "SAE_LAB_HOME": str(home)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "cuda" if ctx.cuda else "cpu"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        holder.stdout.readline()
        if ctx.dry_run:  # fake GPUs, the holder listed on GPU 0 as a real one would list it
            from tests.fakes import fake_pynvml as fake

            scenario = fake.scenario(2, overrides={0: {"processes": [fake.process(holder.pid, GiB)]}})
            env.update(fake.env_for(fake.write_scenario(d / "fake_gpus.json", scenario)))
            rec.note("dry run: fake NVML (2 GPUs from tests/fakes), not a device")
        gpus = subprocess.run([sys.executable, "-m", "sae_core", "gpus", "--json"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=60, check=True).stdout  # fmt: skip
        (d / "gpus.json").write_text(gpus)
        probe = json.loads(gpus)
        report_probe(rec, probe, holder.pid)
        sample_with_the_daemon(ctx, rec, d, env, home, holder.pid, n_gpus=len(probe["gpus"]))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def report_probe(rec: Record, probe: dict, holder: int) -> None:
    gpus = probe["gpus"]
    names = sorted({g["name"] or "?" for g in gpus})
    rec.figure("GPUs (NVML)", f"{len(gpus)}: {', '.join(names)}; driver {probe['driver_version']}" if gpus
               else f"none: {probe['reason']}", "at least 1", bool(gpus))  # fmt: skip
    unanswered = sorted({name for g in gpus for name, value in g.items() if value is None and name != "error"})
    rec.figure("fields NVML left n/a", ", ".join(unanswered) or "none")
    listed = any(p["pid"] == holder for g in gpus for p in g["processes"] or [])
    rec.figure("a process holding 1 GiB is listed with its pid", "yes" if listed else "no", "yes", listed)


def sample_with_the_daemon(ctx: Context, rec: Record, d: Path, env: dict, home: Path, holder: int, n_gpus: int):
    from sqlalchemy import text

    from sae_core.gpu import history

    with (d / "serve.log").open("w") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "sae_core", "serve", "--sample-interval", "1"], env=env,
                                  cwd=REPO, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        started, first_sample, seen = time.monotonic(), None, False
        try:  # sampler_s seconds from the first sample (the daemon's start-up is not the sampler's)
            while first_sample is None or time.monotonic() - first_sample < ctx.sizes.sampler_s:
                time.sleep(0.5)
                probe = None
                if (home / "lab.db").exists():
                    with db_engine(home) as engine:
                        probe = history.latest_probe(engine)
                if probe is not None:
                    first_sample = first_sample or time.monotonic()
                    seen = seen or any(p.pid == holder for g in probe.gpus for p in g.processes or [])
                elif time.monotonic() - started > 60:
                    raise RuntimeError("the daemon wrote no GPU sample within 60 s (see serve.log)")
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=30)
    with db_engine(home) as engine:
        counts = history.row_counts(engine)
        series = history.query_series(engine, "5m", aggregate=False, now=time.time())
        with engine.connect() as conn:  # the first and last sample: the daemon's start-up is not the sampler's
            first, last = conn.execute(text("SELECT MIN(t), MAX(t) FROM gpu_sample")).one()
    (d / "sampler.json").write_text(json.dumps({"rows": counts, "series": series.to_dict("records")}, default=str))
    span = (last - first) if first is not None else 0.0
    per_second = (counts["gpu_sample"] / max(n_gpus, 1) - 1) / span if span > 0 else 0.0
    rec.figure("sampler rows per GPU per second", f"{per_second:.2f} ({counts['gpu_sample']} rows over {span:.0f} s)",
               f">= {SAMPLES_PER_S}", per_second >= SAMPLES_PER_S)  # fmt: skip
    rec.figure("the sampler's snapshot lists the holder", "yes" if seen else "no", "yes", seen)
    rec.figure("daemon stopped by SIGTERM", f"exit code {code}", "0", code == 0)


@contextlib.contextmanager
def db_engine(home: Path):
    """An engine on the lab's lab.db, disposed after use (the daemon owns the file)."""
    from sae_core import db

    try:
        yield db.get_engine(home)
    finally:
        db.dispose_engines()


# --------------------------------------------------------------------------- step 2: pytest -m gpu
def step_pytest_gpu(ctx: Context, rec: Record, d: Path) -> None:
    """Every CUDA test (`pytest -m gpu` over the test files that use the marker: the others need modules, such
    as Streamlit's, that a GPU box may lack); on the CPU they must all skip cleanly."""
    junit = d / "junit.xml"
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text())
    rec.note(f"CUDA tests in {', '.join(files)}")
    argv = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
            "--continue-on-collection-errors", f"--junitxml={junit}", *files]  # fmt: skip
    code = run_logged(argv, d / "pytest.log")
    if not junit.exists():
        rec.finish("failed", f"pytest exit code {code}, no report: {log_tail(d / 'pytest.log')}")
        return
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    outcome = {"failed": [], "error": [], "skipped": [], "passed": []}
    for case in cases:
        kind = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        outcome[{"failure": "failed"}.get(kind, kind)].append(f"{case.get('classname')}::{case.get('name')}")
    broken = outcome["failed"] + outcome["error"]
    summary = ", ".join(f"{len(v)} {k}" for k, v in outcome.items())
    if ctx.dry_run:
        rec.figure("CUDA tests on the CPU", summary, "all skip, none fail", not broken)
    else:
        rec.figure("CUDA tests", summary, "none fail, some pass", not broken and bool(outcome["passed"]))
    for name in broken[:8]:
        rec.note(f"failed: {name}")
    rec.finish("failed" if broken or code not in (0, 5) else None, f"pytest exit code {code}" if code else None)


# --------------------------------------------------------------------------- step 3: training throughput
def k_architectures() -> list[str]:
    from sae_core.architectures import ARCHITECTURES

    return [name for name, arch in ARCHITECTURES.items() if "k" in arch.options.model_fields]


def bf16_matmul_rate(ctx: Context, n: int) -> float:
    """FLOP/s of a square bf16 matmul: what the device's tensor cores give (the peak the steps are held to)."""
    import statistics

    import torch

    from bench.train_throughput import sync

    a, b = (torch.randn(n, n, device=ctx.device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for _ in range(13):
        sync(ctx.device)
        started = time.perf_counter()
        a @ b
        sync(ctx.device)
        times.append(time.perf_counter() - started)
    return 2 * n**3 / statistics.median(times[3:])


def step_train_throughput(ctx: Context, rec: Record, d: Path) -> None:
    """Every TopK-family architecture of the registry at each d_sae × precision × batch: step ÷ the encoder matmul
    measured in the same run, tokens/s, the encoder's FLOP/s as a share of the measured bf16 matmul rate."""
    import gc

    import torch

    from bench.train_throughput import measure
    from sae_core.config import TrainConfig
    from sae_core.data.checks import check_dataset

    s = ctx.sizes
    source = shared_set(ctx)
    rate = bf16_matmul_rate(ctx, s.matmul)
    rec.figure("bf16 matmul rate", f"{rate / 1e12:.3g} TFLOP/s ({s.matmul}^3)")
    precision = torch.get_float32_matmul_precision()
    rec.note(f"fp32 matmul precision '{precision}' ('highest', torch's default: full fp32, no TF32)")
    columns = ["architecture", "d_sae", "batch", "precision", "step ms", "floor ms", "step / floor", "tokens/s",
               "share of bf16 rate", "data wait"]  # fmt: skip
    data, failures = None, 0
    # the target's rows first (TopK in bf16 at the first width), the widest SAE last
    for d_sae, precision, arch, batch in itertools.product(s.d_saes, ("bf16", "fp32"), k_architectures(), s.batches):
        label = [arch, d_sae, batch, precision]
        try:
            cfg = TrainConfig(
                activation_source=str(source), architecture=arch, d_sae=d_sae, k=s.k, batch_size=batch,
                total_steps=s.warmup + s.timed + 1, holdout_tokens=s.holdout, log_every=10**6,
                checkpoint_every=10**6, autocast="bf16" if precision == "bf16" else None, device=ctx.config_device,
            )  # fmt: skip
            data = data if data is not None else check_dataset(cfg)
            got = measure(cfg, ctx.device, s.timed, warmup=s.warmup, data=data)
        except Exception as exc:  # one configuration's failure is reported, the others still run
            traceback.print_exc()
            failures += 1
            rec.note(f"{arch} d_sae {d_sae} B {batch} {precision} failed: {type(exc).__name__}: {exc}")
            rec.row("training throughput", columns, [*label, "failed"] + [None] * 5)
            continue
        finally:
            gc.collect()
            if ctx.cuda:
                torch.cuda.empty_cache()
        share = 2 * batch * s.d_in * d_sae / (got["step_ms"] / 1e3) / rate  # the encoder's FLOP/s ÷ the peak
        rec.row("training throughput", columns, [*label, got["step_ms"], got["floor_ms"], f"{got['ratio']:.2f}x",
                got["tokens_per_s"], f"{share:.1%}", f"{got['data_wait']:.1%}"])  # fmt: skip
        if arch == "topk" and precision == "bf16" and d_sae == s.d_saes[0]:
            ok = got["ratio"] <= TOPK_FLOOR_RATIO
            rec.figure(f"TopK bf16 d_sae {d_sae} B {batch}: step / floor", f"{got['ratio']:.2f}x ({got['step_ms']:.1f}"
                       f" / {got['floor_ms']:.1f} ms)", f"<= {TOPK_FLOOR_RATIO}x", ok)  # fmt: skip
    rec.finish("failed" if failures else None, f"{failures} configuration(s) failed" if failures else None)


# --------------------------------------------------------------------------- step 4: the memory estimate
MEASURED_KINDS = ("train", "evaluate")  # what memory_accuracy can run; the others are not built yet
LATER_KINDS = {"sweep": "a sweep of 8 members", "streaming": "training on a model's stream"}


def memory_specs(ctx: Context) -> list[dict]:
    """What the memory step measures, most telling first: every architecture of the registry, then the
    variants that change the estimate's terms (autocast, bf16 weights, micro-batches, the widest SAE and
    batch), a model evaluation; the job kinds not built yet, listed so that the summary names them."""
    s = ctx.sizes
    d_sae, wide, batch, big = s.d_saes[0], s.d_saes[-1], s.batches[0], s.batches[-1]
    from sae_core.architectures import ARCHITECTURES

    train = {"kind": "train", "d_in": s.d_in, "k": s.k, "d_sae": d_sae, "batch_size": batch, "autocast": None,
             "device": ctx.config_device}  # fmt: skip
    specs = [{**train, "architecture": name} for name in ARCHITECTURES]
    specs += [
        {**train, "architecture": "topk", "d_sae": wide, "batch_size": big, "autocast": "bf16"},
        {"kind": "evaluate", "context_size": s.context, "contexts": s.eval_contexts, "batch_size": s.eval_batch,
         "hook": s.hook, "device": ctx.config_device},
        {**train, "architecture": "topk", "d_sae": wide, "dtype": "bfloat16"},
        {**train, "architecture": "standard", "autocast": "bf16"},
        {**train, "architecture": "topk", "d_sae": wide, "batch_size": big, "micro_batch_size": batch},
    ]  # fmt: skip
    return specs + [{"kind": kind} for kind in LATER_KINDS]


def spec_label(spec: dict) -> str:
    kind = spec["kind"]
    if kind in LATER_KINDS:
        return LATER_KINDS[kind]
    if kind == "evaluate":
        return f"model evaluation ({spec['contexts']} contexts of {spec['context_size']}, batch {spec['batch_size']})"
    extras = [f"autocast {spec['autocast']}"] if spec.get("autocast") else []
    extras += [f"{spec['dtype']} weights"] if spec.get("dtype") else []
    extras += [f"micro-batch {spec['micro_batch_size']}"] if spec.get("micro_batch_size") else []
    return f"{spec['architecture']} d_sae {spec['d_sae']} B {spec['batch_size']} " + (", ".join(extras) or "fp32")


def step_memory(ctx: Context, rec: Record, d: Path) -> None:
    """memory.estimate (and the evaluation's estimate) against torch.cuda.max_memory_allocated and NVML's
    process memory, each configuration in a fresh process. The measured constants are written to
    memory_constants.json after every configuration (a step stopped by its time box keeps them), NCCL's last."""
    from bench import memory_accuracy

    columns = ["configuration", "estimate", "measured (NVML)", "error", "allocator est.", "max allocated", "error",
               "context"]  # fmt: skip
    measured, failures, kinds_run = [], 0, set()
    for spec in memory_specs(ctx):
        label = spec_label(spec)
        if spec["kind"] not in MEASURED_KINDS:
            rec.row("memory per rank", columns, [label, "not yet available"] + [None] * 6)
            continue
        run = not ctx.dry_run or spec["kind"] not in kinds_run  # on the CPU one run per kind shows the path works
        kinds_run.add(spec["kind"])
        try:
            spec = complete_spec(ctx, spec)
            terms = memory_accuracy.estimate_terms(spec)
            got = memory_accuracy.measure_in_child(spec, timeout_s=120) if run else None
        except Exception as exc:  # reported; the next configuration runs
            traceback.print_exc()
            terms, got = {}, {"error": f"{type(exc).__name__}: {exc}"}
        if got is None:
            rec.row("memory per rank", columns, [label, size_text(sum(terms.values())), "dry run: estimated only"]
                    + [None] * 5)  # fmt: skip
            continue
        with (d / "measurements.jsonl").open("a") as out:
            out.write(json.dumps({"spec": spec, "terms": terms, "measured": got}) + "\n")
        if "error" in got or got.get("exit_code"):
            failures += 1
            rec.note(f"{label} failed: {str(got.get('error', got))[-300:]}")
            rec.row("memory per rank", columns, [label, "failed"] + [None] * 6)
            continue
        measured.append((spec, terms, got))
        rec.row("memory per rank", columns, memory_row(label, terms, got))
        write_constants(ctx, d, measured)
    judge_memory(rec, measured)
    nccl = memory_accuracy.nccl_bytes(cuda=ctx.cuda, record=d / "nccl.json")
    constants = write_constants(ctx, d, measured, nccl)
    written = {k: v for k, v in constants.items() if k in memory_accuracy.CONSTANT_KEYS}
    rec.figure("memory_constants.json", ", ".join(f"{k} {v}" for k, v in written.items()) or "no constants "
               "(nothing measured on a GPU)")  # fmt: skip
    rec.finish("failed" if failures else None, f"{failures} configuration(s) failed" if failures else None)


def complete_spec(ctx: Context, spec: dict) -> dict:
    """The inputs a spec runs on: the shared activation set, or the shared model, its SAE and text."""
    if spec["kind"] == "evaluate":
        return {
            **spec,
            "model": str(shared_model(ctx)),
            "sae": str(shared_sae(ctx)),
            "dataset": str(shared_corpus(ctx)),
        }
    return {**spec, "source": str(shared_set(ctx))}


def memory_row(label: str, terms: dict, got: dict) -> list:
    from bench.memory_accuracy import OUTSIDE_ALLOCATOR, measured_peak

    estimate = sum(terms.values())
    allocator = estimate - sum(terms.get(t, 0) for t in OUTSIDE_ALLOCATOR)
    if got["reserved_peak"] is None:  # the CPU: no CUDA figures
        return [label, size_text(estimate), None, None, size_text(allocator), None, None, None]
    peak = measured_peak(got)
    return [label, size_text(estimate), size_text(peak), f"{estimate / peak - 1:+.1%}", size_text(allocator),
            size_text(got["allocated_peak"]), f"{allocator / got['allocated_peak'] - 1:+.1%}",
            size_text(got["context"])]  # fmt: skip


def judge_memory(rec: Record, measured: list) -> None:
    from bench.memory_accuracy import measured_peak

    errors = [(sum(terms.values()) / measured_peak(got) - 1, spec_label(spec)) for spec, terms, got in measured
              if got["reserved_peak"] is not None]  # fmt: skip
    if not errors:
        rec.figure("configurations run", f"{len(measured)} (the CPU: no CUDA figures)")
        return
    within = sum(abs(error) <= MEMORY_ERROR for error, _ in errors)
    worst, label = max(errors, key=lambda pair: abs(pair[0]))
    rec.figure(f"estimate within ±{MEMORY_ERROR:.0%} of the measured peak", f"{within} of {len(errors)}; worst "
               f"{worst:+.1%} ({label})", "every configuration", within == len(errors))  # fmt: skip


def write_constants(ctx: Context, d: Path, measured: list, nccl: dict | None = None) -> dict:
    """memory_constants.json (what gpu/memory_constants.py reads) from the rows measured so far."""
    import torch

    from bench.memory_accuracy import constants_from

    device = torch.cuda.get_device_name(0) if ctx.cuda else "cpu (dry run: nothing measured)"
    info = constants_from([(spec["kind"], got) for spec, _, got in measured], nccl, device)
    (d / "memory_constants.json").write_text(json.dumps({**info, "dry_run": ctx.dry_run}, indent=1))
    return info


# --------------------------------------------------------------------------- step 5: the data feed
def step_data_feed(ctx: Context, rec: Record, d: Path) -> None:
    """Rows/s into the device's memory from a warm float16 file at d_in, and the share of a TopK step (d_sae
    the first width, k 64) spent waiting for data, through `python -m sae_core.train`."""
    from bench.data_throughput import BATCH, device_feed_rate, training_data_wait

    s = ctx.sizes
    source = shared_set(ctx)
    rate = device_feed_rate(source, s.feed_batches, ctx.device)
    rec.figure("rows/s into device memory (warm set)", f"{rate:,.0f} ({rate * s.d_in * 2 / 1e9:.2f} GB/s of float16)")
    run = training_data_wait(source, s.wait_steps, ctx.config_device, d_sae=s.d_saes[0], k=s.k)
    rec.figure(f"data_wait, TopK d_sae {s.d_saes[0]} k {s.k} B {BATCH}", f"{run['data_wait']:.1%} "
               f"({run['tokens_per_s']:,.0f} tokens/s)", f"< {DATA_WAIT:.0%}", run["data_wait"] < DATA_WAIT)  # fmt: skip


# --------------------------------------------------------------------------- step 6: extraction
def step_extraction(ctx: Context, rec: Record, d: Path) -> None:
    """The extraction against the model's own forward to the hook on the same batches, with the largest model
    the project builds without a download."""
    from bench.extract_throughput import timed_pair
    from sae_core.config import ExtractConfig
    from sae_core.engine.distributed import DistEnv
    from sae_core.model.loading import meta_model
    from sae_core.model.run import Source, prepare

    s = ctx.sizes
    started = time.perf_counter()
    model = shared_model(ctx)
    rec.note(f"model ready in {time.perf_counter() - started:.0f} s: {json.dumps(ctx.sizes.model)}")
    cfg = ExtractConfig(model=str(model), hook=s.hook, dataset=str(shared_corpus(ctx)), n_tokens=s.extract_tokens,
                        context_size=s.context, batch_size=s.extract_batch, shard_rows=2**17,
                        device=ctx.config_device)  # fmt: skip
    source = Source(cfg)
    folder = ctx.work / "extraction"
    prepare(cfg, source, folder)
    count = sum(p.numel() for p in meta_model(model).parameters())
    plain, extracting = timed_pair(cfg, source, folder, DistEnv(device=ctx.device), repeats=s.extract_repeats)
    rec.figure("model", f"{s.model['family']}, {count:,} parameters at random init, hook {s.hook}")
    rec.figure("forward to the hook", f"{plain:,.0f} tokens/s")
    ratio = extracting / plain
    rec.figure("extraction ÷ forward", f"{ratio:.2f}x ({extracting:,.0f} tokens/s)", f">= {EXTRACTION_RATIO}x",
               ratio >= EXTRACTION_RATIO)  # fmt: skip


# --------------------------------------------------------------------------- steps 7-8: slots for what is coming
def later(rec: Record, what: str, field: str) -> None:
    """A slot for a job kind not built yet: 'not yet available', or 'not measured yet' once the config has it."""
    from sae_core.config import TrainConfig

    if field in TrainConfig.model_fields:
        rec.finish("not measured yet", f"TrainConfig has `{field}` now; add its measurement to bench/gpu_check.py")
    else:
        rec.finish("not yet available", f"{what} is not built yet (TrainConfig has no `{field}`)")


def step_streaming(ctx: Context, rec: Record, d: Path) -> None:
    """Streaming training's throughput: a model's activations fed to the SAE without files."""
    later(rec, "streaming training", "model")


def step_sweep(ctx: Context, rec: Record, d: Path) -> None:
    """A sweep of 8 members sharing one batch source, against 8 single runs."""
    later(rec, "a sweep", "sweep")


# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Step:
    name: str
    title: str
    run: Callable[[Context, Record, Path], None]
    seconds: int  # time box on a GPU; the dry run's is DRY_STEP_S
    needs_cuda: bool
    files: tuple[str, ...]  # what it writes besides result.json (the driver adds log.txt and run.json)


STEPS = (
    Step("nvml", "NVML: `gpus --json`, the daemon's sampler", step_nvml, 45, False, ("gpus.json", "serve.log", "sampler.json")),
    Step("pytest_gpu", "`pytest -m gpu`", step_pytest_gpu, 100, True, ("junit.xml", "pytest.log")),
    Step("train_throughput", "training throughput", step_train_throughput, 105, True, ("table.md",)),
    Step("memory", "memory estimate vs measured", step_memory, 110, True,
         ("table.md", "measurements.jsonl", "memory_constants.json", "nccl.json")),
    Step("data_feed", "data feed into device memory", step_data_feed, 35, True, ()),
    Step("extraction", "extraction throughput", step_extraction, 45, True, ()),
    Step("streaming", "streaming training throughput", step_streaming, 5, False, ()),
    Step("sweep", "a sweep of 8 vs 8 singles", step_sweep, 5, False, ()),
)  # fmt: skip
BUDGET_S = 480  # the whole check on one GPU, from the driver's start to the summary
DRY_BUDGET_S, DRY_STEP_S = 290, 120  # the dry run: well under 5 minutes on 2 cores, even loaded
# Kept back from the steps: a killed step's grace (`timeout -k 10`) and the summary.
RESERVE_S = 25


def plan(dry_run: bool) -> list[str]:
    """What the driver runs: the seconds all steps may take together, then each step with its time box."""
    steps = [f"{s.name} {DRY_STEP_S if dry_run else s.seconds}" for s in STEPS]
    return [f"steps_budget {(DRY_BUDGET_S if dry_run else BUDGET_S) - RESERVE_S}", *steps]


def run_step(name: str, out: Path, dry_run: bool) -> int:
    step = next(s for s in STEPS if s.name == name)
    directory = out / name
    directory.mkdir(parents=True, exist_ok=True)
    ctx, rec = Context(out, dry_run), Record(directory, name, dry_run)
    if step.needs_cuda and not dry_run and not ctx.cuda:
        import torch

        rec.finish("skipped", f"no CUDA device visible to {sys.executable} (torch {torch.__version__})")
        return 0
    try:
        step.run(ctx, rec, directory)
    except Exception as exc:
        traceback.print_exc()
        rec.finish("failed", f"{type(exc).__name__}: {str(exc)[:400]}")
        return 1
    if rec.data["status"] == "running":
        rec.finish()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the output folder")
    parser.add_argument("--dry-run", action="store_true", help="the CPU at tiny sizes, fake NVML GPUs")
    parser.add_argument("--plan", action="store_true", help="print 'STEP SECONDS' per step")
    parser.add_argument("--environment", action="store_true", help="write OUT/environment.json and print it")
    parser.add_argument("--step", choices=[s.name for s in STEPS])
    parser.add_argument("--summary", action="store_true", help="write OUT/summary.md")
    parser.add_argument("--requirements", action="store_true", help="print the pinned packages the check needs")
    args = parser.parse_args(argv)
    if args.requirements:
        print("\n".join(requirements(REPO / "pyproject.toml")))
        return 0
    if args.plan:
        print("\n".join(plan(args.dry_run)))
        return 0
    if args.out is None:
        parser.error("--out is required")
    if args.environment:
        print(json.dumps(environment(args.out, args.dry_run), indent=1))
        return 0
    if args.step:
        return run_step(args.step, args.out.resolve(), args.dry_run)
    if args.summary:
        (args.out / "summary.md").write_text(summary(args.out, [(s.name, s.title) for s in STEPS]))
        return 0
    parser.error("one of --plan, --environment, --step or --summary")
    return 2


if __name__ == "__main__":
    sys.exit(main())
