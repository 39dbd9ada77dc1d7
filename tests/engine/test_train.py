"""The training entry as real processes: outputs, DDP equivalence under torchrun, kill-and-resume, quality."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_core import files
from sae_core.architectures import ARCHITECTURE_NAMES
from sae_core.config import TrainConfig
from sae_core.data.checks import check_dataset
from sae_core.engine import saelens
from sae_core.engine.distributed import DistEnv
from sae_core.engine.schedule import learning_rate
from sae_core.engine.trainer import Trainer, progress_line
from sae_core.files import CHECKPOINT_MARKER as MARKER
from sae_core.outputs import complete_checkpoints
from sae_core.train import main
from tests.conftest import read_jsonl, subprocess_env, tiny_config

# Blocks of 32 rows and windows of 512 on the 16k-row toy set, so that runs exercise the block shuffle
# (by default the whole 2 MiB set is one shuffle window).
SMALL_BLOCKS = {"shuffle_block_bytes": 4096, "shuffle_buffer_bytes": 65536}


def write_config(tmp_path: Path, toy_path: Path, **overrides) -> Path:
    cfg = tiny_config(toy_path, **{"dead_tokens_window": 2048, **overrides})
    path = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*.json')))}.json"
    path.write_text(json.dumps(cfg))
    return path


def run_train(
    config: Path, out: Path, nproc: int = 1, resume: Path | None = None, env: dict | None = None, **popen
) -> subprocess.Popen:
    entry = ["-m", "sae_core.train", "--config", str(config), "--out", str(out)]
    if resume:
        entry += ["--resume", str(resume)]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        argv = launcher + entry
    else:
        argv = [sys.executable] + entry
    return subprocess.Popen(
        argv, env=subprocess_env(**(env or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def finish(proc: subprocess.Popen, timeout: float = 180) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output
    return output


def kill_after_checkpoint(proc: subprocess.Popen, folder: Path, step: int) -> None:
    """kill -9 the run once `folder` holds a complete checkpoint of `step` or later (it must still be running)."""
    deadline = time.time() + 120
    while not any(int(p.name[5:]) >= step for p in complete_checkpoints(folder)):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / files.WEIGHTS_FILE))


def test_schedules_warm_up_and_decay():
    cfg = TrainConfig(
        activation_source="x",
        d_sae=8,
        k=2,
        total_steps=100,
        lr=1e-3,
        lr_warmup_steps=10,
        lr_decay_steps=20,
    )
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(50, cfg) == pytest.approx(1e-3)
    assert learning_rate(80, cfg) == pytest.approx(1e-3)
    assert learning_rate(90, cfg) == pytest.approx(5e-4)
    assert learning_rate(99, cfg) == pytest.approx(5e-5)


@pytest.mark.slow
def test_single_process_writes_every_output(tmp_path, toy_path):
    out = tmp_path / "run"
    output = finish(run_train(write_config(tmp_path, toy_path), out))
    assert "step 30/30" in output and "tok/s" in output and "ETA" in output
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "eval.json", "metrics.jsonl"):
        assert (out / name).exists(), name
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "event" not in r]
    assert [r["step"] for r in records] == [10, 20, 30]
    for key in ("loss", "mse", "fvu", "l0", "dead_fraction", "lr", "tokens_per_s", "losses", "peak_mem", "data_wait"):
        assert key in records[-1], key
    # the architecture's loss terms by name, summing to the loss
    assert set(records[-1]["losses"]) == {"mse", "aux"}
    assert sum(records[-1]["losses"].values()) == pytest.approx(records[-1]["loss"])
    assert all(0 <= r["data_wait"] <= 1 for r in records)
    assert "data wait" in output
    assert records[-1]["l0"] == pytest.approx(4.0, abs=0.5)
    figures = json.loads((out / "eval.json").read_text())
    assert {"fvu", "l0", "dead_fraction", "tokens_per_s", "steps", "mmcs"} <= figures.keys()
    assert figures["steps"] == 30 and 0 < figures["fvu"] < 1
    assert [p.name for p in complete_checkpoints(out)] == ["step_000000010", "step_000000020", "step_000000030"]
    sparsity = load_file(str(out / "sparsity.safetensors"))["sparsity"]
    assert sparsity.shape == (64,) and float(sparsity.max()) <= 0
    model = saelens.load(out)
    assert model.encode(torch.randn(5, 32)).shape == (5, 64)


def test_batchtopk_trains_the_same_with_and_without_the_cpu_kernels(tmp_path, toy_path):
    """BatchTopK through the real trainer: the C kernels' path and the torch fallbacks (what CUDA runs)
    reach the same weights; the saved SAE is a JumpReLU with the learned threshold."""
    config = write_config(tmp_path, toy_path, architecture="batchtopk", total_steps=20)
    runs = {
        kernels: run_train(config, tmp_path / f"kernels_{kernels}", env={"SAE_LAB_CPU_KERNELS": kernels})
        for kernels in ("1", "0")
    }
    outputs = {kernels: finish(proc) for kernels, proc in runs.items()}
    assert "CPU kernels unavailable" not in outputs["1"]
    with_kernels, without = weights(tmp_path / "kernels_1"), weights(tmp_path / "kernels_0")
    for name, tensor in with_kernels.items():
        torch.testing.assert_close(without[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert float(with_kernels["threshold"].min()) > 0
    records = [r for r in read_jsonl(tmp_path / "kernels_1" / "metrics.jsonl") if "event" not in r]
    assert records[-1]["l0"] == pytest.approx(4.0)  # k per token on average, exactly, in training
    model = saelens.load(tmp_path / "kernels_1")
    assert model.architecture == "jumprelu"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURE_NAMES)
def test_two_and_four_ranks_match_one_process(tmp_path, toy_path, arch):
    # every option an architecture may take, each keeping what it owns; target_l0 adapts over the ranks too
    options = {"l1_coefficient": 0.5, "target_l0": 6.0, "matryoshka_widths": [16, 32, 64]}
    config = write_config(tmp_path, toy_path, architecture=arch, total_steps=20, **options, **SMALL_BLOCKS)
    runs = {n: run_train(config, tmp_path / f"ranks{n}", nproc=n) for n in (1, 2, 4) if n != 4 or arch == "topk"}
    outputs = {n: finish(proc) for n, proc in runs.items()}
    assert "step 20/20" in outputs[2]
    reference = weights(tmp_path / "ranks1")
    for n in runs:
        if n == 1:
            continue
        got = weights(tmp_path / f"ranks{n}")
        for name, tensor in reference.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{n} ranks: {name}")
        eval_n = json.loads((tmp_path / f"ranks{n}" / "eval.json").read_text())
        assert eval_n["world_size"] == n


@pytest.mark.slow
def test_kill_and_resume_ends_bit_for_bit_equal(tmp_path, toy_path):
    config = write_config(tmp_path, toy_path, total_steps=400, checkpoint_every=25, log_every=25, **SMALL_BLOCKS)
    finish(run_train(config, tmp_path / "straight"))

    killed = tmp_path / "killed"
    kill_after_checkpoint(run_train(config, killed), killed, 50)
    assert not (killed / "eval.json").exists(), "the run finished before the kill; nothing was tested"
    for ckpt in complete_checkpoints(killed):
        assert (ckpt / MARKER).exists()

    resumed = tmp_path / "resumed"
    finish(run_train(config, resumed, resume=killed))
    straight, again = weights(tmp_path / "straight"), weights(resumed)
    for name, tensor in straight.items():
        assert torch.equal(again[name], tensor), name
    # In place, as examples/slurm_train.sbatch resumes after a pre-emption: --out and --resume the same folder.
    finish(run_train(config, killed, resume=killed))
    in_place = weights(killed)
    for name, tensor in straight.items():
        assert torch.equal(in_place[name], tensor), name


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURE_NAMES)
def test_every_architecture_resumes_bit_for_bit_from_a_checkpoint(tmp_path, toy_path, arch):
    """An architecture's whole state (BatchTopK's threshold, an adapted penalty, JumpReLU's threshold) is in
    its checkpoint: continuing from step 20 of 40 ends exactly where the straight run does."""
    options = {"target_l0": 6.0, "matryoshka_widths": [16, 32, 64]}
    config = write_config(tmp_path, toy_path, architecture=arch, total_steps=40, checkpoint_every=20, **options)
    straight = tmp_path / "straight"
    finish(run_train(config, straight))
    halfway = tmp_path / "halfway"
    shutil.copytree(straight, halfway)
    shutil.rmtree(halfway / "checkpoints" / "step_000000040")
    finish(run_train(config, tmp_path / "resumed", resume=halfway))
    expected, got = weights(straight), weights(tmp_path / "resumed")
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_torchrun_nodes_on_localhost_match_one_process(tmp_path, toy_path):
    """Multi-node as a scheduler starts it (README, examples/slurm_train.sbatch): one torchrun agent per
    node, c10d rendezvous on the head node's address; here both "nodes" are this machine."""
    config = write_config(tmp_path, toy_path, total_steps=20, **SMALL_BLOCKS)
    single = run_train(config, tmp_path / "single")
    port, out = free_port(), tmp_path / "nodes"
    agents = []
    for node_rank in (0, 1):
        argv = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "two-nodes", "--local-addr", "127.0.0.1",
            "-m", "sae_core.train", "--config", str(config), "--out", str(out),
        ]  # fmt: skip
        env = subprocess_env(GLOO_SOCKET_IFNAME="lo")
        agents.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [finish(agent) for agent in agents]
    finish(single)
    assert "step 20/20" in "".join(outputs)
    assert json.loads((out / "eval.json").read_text())["world_size"] == 2
    reference, got = weights(tmp_path / "single"), weights(out)
    for name, tensor in reference.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_non_finite_row_beyond_the_up_front_sample_stops_training_at_the_batch_that_reads_it(tmp_path):
    """A set over 2 GiB gets a sampled scan before training; every batch is checked as it is read."""
    import numpy as np

    from sae_core.data.activations import open_activations
    from sae_core.data.checks import sample_ranges
    from sae_core.engine.trainer import data_order

    path = tmp_path / "big.npy"
    rows, d_in = 8_600_000, 64  # 2.05 GiB of float32, a sparse file of zeros
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, d_in))
    cfg = TrainConfig.from_dict(tiny_config(path, d_sae=16, batch_size=4096, total_steps=5, holdout_tokens=0))
    ds = open_activations(path)
    sampled = np.zeros(rows, dtype=bool)
    for lo, hi in sample_ranges(ds):
        sampled[lo:hi] = True
    order = data_order(cfg, ds)
    third = order.global_rows(order.following(order.following(order.key)))
    bad = int(next(r for r in third if not sampled[r]))
    big[bad, 5] = np.nan
    big.flush()
    del big
    config = tmp_path / "cfg.json"
    config.write_text(cfg.to_json())
    out = tmp_path / "run"
    proc = run_train(config, out)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2, output
    message = f"row {bad}, column 5 holds NaN"
    assert message in (out / "error.txt").read_text() and message in output
    assert not (out / "eval.json").exists()


RSS_GIVEN_BACK_BY_FREEING_64MIB = """
import sys
import numpy as np
from sae_core.engine.run import keep_freed_memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
if sys.argv[1] == "keep":
    assert keep_freed_memory()
array = np.ones(2**23)  # 64 MiB, touched
held = rss()
del array
print(held - rss())
"""


def test_the_training_process_keeps_freed_large_buffers_for_the_next_step():
    """Without it glibc unmaps every freed allocation over 32 MiB, and the next step's temporaries are
    faulted in and zeroed afresh (the CPU step at d_in 2304 took twice as long)."""
    given_back = {}
    for mode in ("default", "keep"):
        argv = [sys.executable, "-c", RSS_GIVEN_BACK_BY_FREEING_64MIB, mode]
        given_back[mode] = int(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    assert given_back["default"] > 60 * 2**20
    assert given_back["keep"] < 4 * 2**20, given_back


def test_bad_data_writes_only_the_error(tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path, tmp_path / "missing.safetensors")
    assert main(["--config", str(config), "--out", str(out)]) == 2
    assert [p.name for p in out.iterdir()] == ["error.txt"]
    assert "missing.safetensors" in (out / "error.txt").read_text()


def test_global_batch_must_split_across_ranks(tmp_path, toy_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    out = tmp_path / "run"
    assert main(["--config", str(write_config(tmp_path, toy_path)), "--out", str(out)]) == 2
    assert "batch_size 256 does not divide evenly across 3 ranks" in (out / "error.txt").read_text()


@pytest.mark.slow
def test_topk_recovers_the_toy_features(tmp_path, toy_path):
    """A TopK SAE with one latent per ground-truth feature finds them (mmcs ≥ 0.9)."""
    config = write_config(
        tmp_path,
        toy_path,
        d_sae=64,
        k=4,
        batch_size=512,
        total_steps=3000,
        log_every=500,
        checkpoint_every=3000,
        lr=4e-3,
        dead_tokens_window=20_000,
    )
    finish(run_train(config, tmp_path / "quality"), timeout=300)
    figures = json.loads((tmp_path / "quality" / "eval.json").read_text())
    assert figures["mmcs"] >= 0.9, figures
    assert figures["fvu"] < 0.2, figures


def test_micro_batches_accumulate_to_the_whole_batch_gradient(tmp_path, toy_path):
    results = {}
    for micro in (None, 64):
        cfg = TrainConfig.from_json_file(write_config(tmp_path, toy_path, micro_batch_size=micro, total_steps=6))
        (tmp_path / f"micro{micro}").mkdir()
        trainer = Trainer(cfg, tmp_path / f"micro{micro}", DistEnv(), check_dataset(cfg))
        trainer.sinks = []
        for _ in range(6):
            trainer.train_step()
        results[micro] = {k: v.clone() for k, v in trainer.sae.state_dict().items()}
    for name, tensor in results[None].items():
        torch.testing.assert_close(results[64][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_micro_batch_must_divide_the_per_rank_batch(tmp_path, toy_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    assert main(["--config", str(write_config(tmp_path, toy_path, micro_batch_size=100)), "--out", str(out)]) == 2
    assert "micro_batch_size 100 does not divide the per-rank batch 128" in (out / "error.txt").read_text()


@pytest.mark.slow
def test_two_ranks_with_micro_batches_match_one_process(tmp_path, toy_path):
    one = run_train(write_config(tmp_path, toy_path, total_steps=15), tmp_path / "one")
    two = run_train(write_config(tmp_path, toy_path, total_steps=15, micro_batch_size=32), tmp_path / "two", nproc=2)
    finish(one), finish(two)
    for name, tensor in weights(tmp_path / "one").items():
        torch.testing.assert_close(weights(tmp_path / "two")[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_the_progress_line_shows_days_for_a_long_eta():
    record = {"step": 5, "total_steps": 10**9, "tokens_per_s": 1.0, "loss": 0.5, "fvu": 0.25, "l0": 8.0}
    assert progress_line(record, 3 * 86_400 + 5).endswith("ETA 3 d 00:00:05")  # not wrapped at 24 h
    assert progress_line(record, 10**15).endswith(" d 01:46:40")  # no overflow either
