"""The CUDA paths against their CPU references: the sparse step's torch fallbacks, bf16 autocast, DDP over
NCCL, the pinned feed on a side stream and the compiled decoder kernel.

Most tests take a device: on "cuda" they carry the `gpu` marker (`pytest -m gpu`, bench/gpu_check.sh) and
skip without a GPU; on "cpu" the same test runs everywhere (the C kernels switched off, so the CPU takes the
torch fallbacks CUDA takes; gloo instead of NCCL), so the test itself is checked on every machine.
"""

from __future__ import annotations

import copy
import json
import socket

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from sae_core.architectures import ARCHITECTURES
from sae_core.data.activations import open_activations
from sae_core.data.loader import DeviceFeed, Loader
from sae_core.engine import cpu_kernels, sparse
from sae_core.engine.saes import StepContext, sae_from_config
from sae_core.engine.trainer import _TrainForward, data_parallel
from sae_core.files import EVAL_FILE, WEIGHTS_FILE
from sae_core.train import main as train_main
from tests.conftest import tiny_config, train_config, write_json
from tests.data.test_loader import D_IN, N_ROWS, expected_batches, small_order

HAS_CUDA = torch.cuda.is_available()
NEEDS_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
DEVICES = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
K_ARCHITECTURES = [name for name, arch in ARCHITECTURES.items() if "k" in arch.options.model_fields]
SHARED_PARAMETERS = ("W_enc", "W_dec", "b_enc", "b_dec")  # what every architecture has
D, LATENTS, K, ROWS = 48, 384, 8, 128


@pytest.fixture
def torch_fallbacks(monkeypatch):
    """The C kernels off: the CPU runs the torch operations a CUDA step runs."""
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)


def model(arch: str, device: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """An SAE of `arch` as a TrainConfig builds it (so architectures with options get their defaults), with
    biases moved off zero so that every term of the loss is exercised."""
    cfg = train_config(
        activation_source="unused.safetensors", architecture=arch, d_sae=LATENTS, total_steps=10, k=K, aux_k=16,
        aux_k_coefficient=0.1, l1_coefficient=0.5, l1_warmup_steps=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    sae = sae_from_config(cfg, D, device="cpu").to(dtype)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.2)
        sae.b_enc.normal_(0, 0.2)
    return sae.to(device)


def batch(device: str, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, D, generator=generator, dtype=torch.float64)
    x[0] *= 20  # BatchTopK: one row holds many of the batch's selection
    return x.to(device=device, dtype=dtype)


def step_kwargs(arch: str, device: str) -> dict:  # noqa: ARG001  (every architecture takes the same context)
    dead = (torch.arange(LATENTS) % 3 == 0).to(device)  # AuxK runs as well
    return {"ctx": StepContext(step=5, total_steps=10, dead_mask=dead)}


def gradients(loss: torch.Tensor, sae) -> dict[str, torch.Tensor]:
    names = [name for name, _ in sae.named_parameters()]
    values = torch.autograd.grad(loss, list(sae.parameters()), allow_unused=True)
    return dict(zip(names, values, strict=True))


# --------------------------------------------------------------------------- the sparse step's torch fallbacks
@DEVICES
@pytest.mark.parametrize("arch", K_ARCHITECTURES)
def test_the_sparse_step_on_the_device_equals_the_cpu_float64_reference(arch, device, torch_fallbacks):
    reference = model(arch, "cpu", torch.float64)
    fast_model = copy.deepcopy(reference).to(device=device, dtype=torch.float32)
    fast = fast_model.training_step(batch(device), **step_kwargs(arch, device))
    dense = reference.training_step(batch("cpu", torch.float64), reference=True, **step_kwargs(arch, "cpu"))
    assert list(fast.losses) == list(dense.losses)
    for name in ("loss", "l0"):
        got, expected = (getattr(out, name).detach().cpu().double() for out in (fast, dense))
        assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)
    for name in fast.losses:
        got, expected = (out.losses[name].detach().cpu().double() for out in (fast, dense))
        assert_close(got, expected, rtol=1e-4, atol=1e-5, msg=name)
    assert_close(fast.x_hat.cpu().double(), dense.x_hat, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.fired_counts.cpu(), dense.fired_counts)  # the same latents were selected
    fast_grads, dense_grads = gradients(fast.loss, fast_model), gradients(dense.loss, reference)
    for name, expected in dense_grads.items():
        scale = expected.abs().max().item()
        assert_close(fast_grads[name].cpu().double(), expected, rtol=1e-4, atol=1e-5 * scale, msg=name)


@DEVICES
def test_each_sparse_operation_on_the_device_equals_its_dense_cpu_reference(device):
    generator = torch.Generator().manual_seed(2)
    pre = torch.randn(ROWS, LATENTS, generator=generator)
    values, idx = cpu_kernels.row_topk(pre.to(device), K)  # torch.topk on CUDA
    expected_values, expected_idx = pre.topk(K, dim=-1)
    assert torch.equal(idx.cpu().sort(-1).values, expected_idx.sort(-1).values)
    assert_close(values.cpu().sort(-1).values, expected_values.sort(-1).values)

    order, rows, crow = cpu_kernels.latent_layout(idx, LATENTS)  # argsort + counts on CUDA
    flat = idx.cpu().flatten()
    assert torch.equal(crow.cpu()[1:] - crow.cpu()[:-1], torch.bincount(flat, minlength=LATENTS))
    assert torch.equal(flat[order.cpu()], flat.sort(stable=True).values)
    assert torch.equal(rows.cpu(), order.cpu() // K)

    layout = sparse.LatentLayout(idx, LATENTS)
    dense_rows = torch.randn(ROWS, D, generator=generator)
    dense_latents = torch.zeros(ROWS, LATENTS, dtype=torch.float64).scatter_(1, idx.cpu(), values.cpu().double())
    got = layout.weight_grad(values, dense_rows.to(device))  # a CSR product on CUDA
    assert_close(got.cpu().double(), dense_latents.t() @ dense_rows.double(), rtol=1e-5, atol=1e-5)
    W = torch.randn(LATENTS, D, generator=generator)
    dots = layout.row_dots(W.to(device), idx, dense_rows.to(device))
    expected_dots = (W.double()[idx.cpu()] * dense_rows.double()[:, None, :]).sum(-1)
    assert_close(dots.cpu().double(), expected_dots, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bf16 autocast
def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@DEVICES
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_a_bf16_autocast_step_tracks_the_float32_step(arch, device, torch_fallbacks):
    sae, x, kwargs = model(arch, device), batch(device), step_kwargs(arch, device)
    full = sae.training_step(x, **kwargs)
    full_grads = gradients(full.loss, sae)
    with torch.autocast(device, dtype=torch.bfloat16):
        half = sae.training_step(x, **kwargs)
    half_grads = gradients(half.loss, sae)  # backward outside autocast, as the trainer runs it
    loss, full_loss = float(half.loss.detach()), float(full.loss.detach())
    assert torch.isfinite(half.loss) and loss == pytest.approx(full_loss, rel=0.01)
    for name in SHARED_PARAMETERS:  # a straight-through threshold gradient is too sharp to compare
        grad = half_grads[name]
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name  # the weights stay float32
        assert cosine(grad, full_grads[name]) > 0.99, name


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")  # the config refuses bf16 autocast on a CPU
def test_a_bf16_autocast_run_trains_and_writes_float32_weights(tmp_path, toy_path):
    config = write_json(tmp_path / "cfg.json", tiny_config(toy_path, device="cuda", autocast="bf16", total_steps=60))
    assert train_main(["--config", str(config), "--out", str(tmp_path / "run")]) == 0
    figures = json.loads((tmp_path / "run" / EVAL_FILE).read_text())
    assert 0 < figures["fvu"] < 0.3 and figures["steps"] == 60  # 0.13 in float32 on a CPU
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "run" / WEIGHTS_FILE)).values())


# --------------------------------------------------------------------------- DDP over NCCL (gloo on the CPU)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@DEVICES
def test_one_rank_ddp_over_the_devices_backend_gives_the_plain_steps_gradients(device):
    """The trainer's DDP wrapper (gradient buckets as views, no buffer broadcast) around every architecture's
    step, through NCCL on a GPU: the all-reduced gradients equal a plain step's (BatchTopK's threshold goes
    through an all-reduce too)."""
    if device == "cuda":
        torch.cuda.set_device(0)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        for arch in ARCHITECTURES:
            plain = model(arch, device)
            twin = copy.deepcopy(plain)
            wrapped = data_parallel(
                _TrainForward(twin), torch.device(device, 0) if device == "cuda" else torch.device("cpu")
            )
            _TrainForward(plain)(batch(device), **step_kwargs(arch, device)).loss.backward()
            wrapped(batch(device), **step_kwargs(arch, device)).loss.backward()
            for name, parameter in plain.named_parameters():  # CUDA's atomic sums may round in another order
                assert_close(twin.get_parameter(name).grad, parameter.grad, rtol=1e-5, atol=1e-6, msg=f"{arch}: {name}")
            for name, buffer in plain.named_buffers():
                assert_close(twin.get_buffer(name), buffer, msg=f"{arch}: {name}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_over_nccl_train_the_weights_of_one(tmp_path, toy_path):
    from tests.engine.test_train import finish, run_train, weights, write_config

    config = write_config(tmp_path, toy_path, device="cuda", total_steps=20)
    finish(run_train(config, tmp_path / "one"))
    finish(run_train(config, tmp_path / "two", nproc=2))
    reference = weights(tmp_path / "one")
    for name, tensor in weights(tmp_path / "two").items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------- the pinned feed on a side stream
def write_safetensors_shards(directory, dtype: torch.dtype) -> torch.Tensor:
    """Three shards in `dtype`; returns the whole set as float32 (the values after storage)."""
    rows = torch.randn(N_ROWS, D_IN, generator=torch.Generator().manual_seed(0)).to(dtype)
    for i, part in enumerate(rows.chunk(3)):
        save_file({"activations": part.contiguous()}, str(directory / f"s{i}.safetensors"))
    return rows.float()


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_the_pinned_feed_copies_on_a_side_stream_while_the_training_stream_is_busy(tmp_path, stored):
    whole = write_safetensors_shards(tmp_path, stored)
    ds, device = open_activations(tmp_path), torch.device("cuda", 0)
    with Loader(ds, small_order(), 0, 1, host_float32=False, pin_memory=True) as loader:
        host = loader.next()
        assert host.is_pinned() and host.dtype == stored  # the stored dtype crosses PCIe
    feed = DeviceFeed(Loader(ds, small_order(), 0, 1, host_float32=False, pin_memory=True), device)
    expected = expected_batches(small_order(), 0, 1, 8, whole.numpy())
    sums = []
    try:
        assert feed._stream is not None and feed._stream != torch.cuda.current_stream(device)
        for _ in expected:
            x = feed.next()
            assert x.device == device and x.dtype == torch.float32
            torch.cuda._sleep(20_000_000)  # keeps the training stream busy while the next copy runs
            sums.append(x.sum(1))  # queued behind the sleep, after x is dropped below
            del x  # its memory must not serve the next copy before the sum has read it (record_stream)
        torch.cuda.synchronize(device)
    finally:
        feed.close()
    for got, rows in zip(sums, expected, strict=True):
        assert_close(got.cpu(), torch.from_numpy(rows).sum(1))


# --------------------------------------------------------------------------- the compiled decoder kernel
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_the_compiled_row_dots_on_cuda_equal_the_eager_ones():
    """torch_compile: true on a GPU compiles the decoder's gather-dot with inductor (Triton)."""
    generator = torch.Generator().manual_seed(0)
    W, g = torch.randn(LATENTS, D, generator=generator), torch.randn(ROWS, D, generator=generator)
    idx = torch.randint(0, LATENTS, (ROWS, K), generator=generator)
    W, g, idx = W.cuda(), g.cuda(), idx.cuda()
    compiled = sparse.Kernels(compiled=True).dense_row_dots(W, idx, g)
    assert_close(compiled, sparse._row_dots_eager(W, idx, g), rtol=1e-5, atol=1e-5)
