"""Each architecture's forward, loss and gradients against a plain dense reference; FVU; save/load."""

import json

import pytest
import torch
from torch.testing import assert_close

from sae_core.config import DEFAULT_ENCODER_INIT_SCALE, TrainConfig
from sae_core.engine import cpu_kernels, saelens, sparse
from sae_core.engine.evaluation import evaluate
from sae_core.engine.sae import make_sae as build_sae
from sae_core.engine.sae import sae_from_config
from sae_core.engine.saelens import exported_copy

D_IN, D_SAE, K, B = 12, 40, 3, 16


def make_sae(arch, seed=0):
    torch.manual_seed(seed)
    model = build_sae(arch, D_IN, D_SAE, K if arch in ("topk", "batchtopk") else None, dtype=torch.float64)
    with torch.no_grad():
        model.b_dec.normal_(0, 0.1)
        model.b_enc.normal_(0, 0.1)
        model.W_enc.add_(0.1 * torch.randn_like(model.W_enc))
        if arch == "jumprelu":
            model.log_threshold.fill_(torch.log(torch.tensor(0.05)).item())
    return model


def params(model):
    return dict(model.named_parameters())


def grads_of(loss, model):
    names = [n for n, p in model.named_parameters()]
    values = torch.autograd.grad(loss, [p for _, p in model.named_parameters()], allow_unused=True)
    return dict(zip(names, values, strict=True))


def reference_pre(p, x):
    return (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(B, D_IN, dtype=torch.float64)


def test_standard_matches_reference(x):
    model = make_sae("standard")
    p = params(model)
    out = model.training_step(x, sparsity_coefficient=0.3)
    z = reference_pre(p, x).relu()
    x_hat = z @ p["W_dec"] + p["b_dec"]
    ref = (x_hat - x).pow(2).sum(-1).mean() + 0.3 * (z * p["W_dec"].norm(dim=1)).sum(-1).mean()
    assert_close(out.loss, ref)
    ref_grads = grads_of(ref, model)
    for name, g in grads_of(out.loss, model).items():
        assert_close(g, ref_grads[name], msg=name)
    assert_close(out.l0, (z > 0).sum(-1).double().mean().to(out.l0.dtype))


def test_topk_with_auxk_matches_reference(x):
    model = make_sae("topk")
    p = params(model)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    out = model.training_step(x, dead_mask=dead, aux_k=5, aux_coefficient=0.5)
    pre = reference_pre(p, x)
    vals, idx = pre.topk(K, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    x_hat = z @ p["W_dec"] + p["b_dec"]
    recon = (x_hat - x).pow(2).sum(-1).mean()
    residual = (x - x_hat).detach()
    aux_vals, aux_idx = pre.masked_fill(~dead, -torch.inf).topk(5, dim=-1)
    aux_z = torch.zeros_like(pre).scatter(-1, aux_idx, aux_vals.relu())
    aux = ((aux_z @ p["W_dec"]) - residual).pow(2).sum(-1).mean()
    ref = recon + 0.5 * aux
    assert_close(out.loss, ref)
    assert_close(out.aux_loss, 0.5 * aux)
    ref_grads = grads_of(ref, model)
    for name, g in grads_of(out.loss, model).items():
        assert_close(g, ref_grads[name], msg=name)
    assert int(out.fired_counts.sum()) == int((z > 0).sum())


def test_batchtopk_keeps_k_times_batch_activations_and_learns_a_threshold(x):
    model = make_sae("batchtopk")
    p = params(model)
    out = model.training_step(x)
    acts = reference_pre(p, x).relu()
    flat = acts.flatten()
    keep = flat.topk(K * B).indices
    z = torch.zeros_like(flat).scatter(0, keep, flat[keep]).view_as(acts)
    ref = ((z @ p["W_dec"] + p["b_dec"]) - x).pow(2).sum(-1).mean()
    assert_close(out.loss, ref)
    ref_grads = grads_of(ref, model)
    for name, g in grads_of(out.loss, model).items():
        assert_close(g, ref_grads[name], msg=name)
    assert float(out.l0) == pytest.approx(K, abs=1e-9)
    assert float(model.batch_threshold) == pytest.approx(float(flat[keep].min().detach()))


def test_jumprelu_forward_and_straight_through_threshold_gradient(x):
    model = make_sae("jumprelu")
    p = params(model)
    coefficient, eps = 0.2, model.bandwidth
    out = model.training_step(x, sparsity_coefficient=coefficient)
    theta = p["log_threshold"].exp()
    pre = reference_pre(p, x)
    mask = (pre > theta).double()
    z = pre * mask
    x_hat = z @ p["W_dec"] + p["b_dec"]
    ref = (x_hat - x).pow(2).sum(-1).mean() + coefficient * mask.sum(-1).mean()
    assert_close(out.loss, ref)
    got = grads_of(out.loss, model)
    ref_grads = grads_of(ref, model)  # mask is constant here: exact for everything but theta
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert_close(got[name], ref_grads[name], msg=name)
    # dL/dθ by the paper's estimator: rectangle kernel K((pre-θ)/ε)/ε.
    grad_z = 2 * (x_hat - x) @ p["W_dec"].t() / B
    kernel = (((pre - theta) / eps).abs() < 0.5).double() / eps
    d_theta = (-theta * kernel * grad_z).sum(0) - coefficient * kernel.sum(0) / B
    assert_close(got["log_threshold"], d_theta * theta)  # chain rule through exp


def test_decoder_gradient_projection_keeps_rows_unit_norm(x):
    model = make_sae("topk")
    model.training_step(x).loss.backward()
    model.project_decoder_grad()
    rows = model.W_dec.detach()
    assert_close((model.W_dec.grad * rows).sum(-1), torch.zeros(D_SAE, dtype=rows.dtype), atol=1e-12, rtol=0)
    with torch.no_grad():
        model.W_dec.add_(torch.randn_like(model.W_dec))
    model.normalize_decoder()
    assert_close(model.W_dec.norm(dim=1), torch.ones(D_SAE, dtype=rows.dtype))


def test_encoder_starts_as_the_decoder_transpose_scaled():
    model = build_sae("standard", 8, 20)
    assert_close(model.W_enc, model.W_dec.t() * DEFAULT_ENCODER_INIT_SCALE)
    assert_close(model.W_dec.norm(dim=1), torch.ones(20))
    cfg = TrainConfig(activation_source="x", d_sae=20, k=4, total_steps=1, encoder_init_scale=0.25)
    chosen = sae_from_config(cfg, 8)
    assert_close(chosen.W_enc, chosen.W_dec.t() * 0.25)


class _Data:
    """A tiny in-memory stand-in for ActivationSet (rows → tensor)."""

    def __init__(self, x, features=None):
        self.x, self.features, self.d_in = x, features, x.shape[1]

    def read(self, rows):
        return self.x[torch.as_tensor(rows)]


def test_fvu_is_error_over_variance_around_the_mean():
    torch.manual_seed(0)
    x = torch.randn(64, D_IN) + 5.0  # a large mean: variance around zero would be far too big
    model = make_sae("standard").float()
    figures = evaluate(model, _Data(x), list(range(64)), "cpu")
    with torch.no_grad():
        x_hat = model(x)
    expected = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert figures["fvu"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "jumprelu"])
def test_save_load_round_trip_encodes_identically(tmp_path, arch, x):
    model = make_sae(arch).float()
    with torch.no_grad():
        model.input_scale.fill_(2.5)  # must be folded into the saved weights
        if arch == "batchtopk":
            model.batch_threshold.fill_(0.1)
    saelens.save(model, tmp_path)
    loaded = saelens.load(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == ("jumprelu" if arch == "batchtopk" else arch)
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["sae_lens_version"] >= "6.0.0"
    if arch == "topk":
        assert cfg["k"] == K
    raw = x.float()
    reference = exported_copy(model, "cpu")
    assert_close(loaded.encode(raw), reference.encode(raw))
    assert_close(loaded(raw), reference(raw))
    # Training-time view (scaled input) and the saved SAE on raw input agree up to the scale.
    if arch in ("standard", "jumprelu", "topk"):
        assert_close(model.encode(raw * 2.5), loaded.encode(raw), rtol=1e-4, atol=1e-5)


def fast_and_reference_steps(model, x, **kwargs):
    """(fast, reference) StepOutputs of the same model on x, each from the same BatchTopK threshold."""
    start = model.batch_threshold.clone() if model.architecture == "batchtopk" else None
    fast = model.training_step(x, **kwargs)
    if start is not None:
        fast.threshold = model.batch_threshold.clone()
        model.batch_threshold.copy_(start)
    reference = model.training_step(x, reference=True, **kwargs)
    if start is not None:
        reference.threshold = model.batch_threshold.clone()
    return fast, reference


def assert_steps_agree(model, fast, reference, grad_atol=None):
    for field in ("loss", "x_hat", "recon_loss", "aux_loss", "l0"):
        assert_close(getattr(fast, field), getattr(reference, field), msg=field)
    assert torch.equal(fast.fired_counts, reference.fired_counts)
    if model.architecture == "batchtopk":
        assert_close(fast.threshold, reference.threshold)
    fast_grads, ref_grads = grads_of(fast.loss, model), grads_of(reference.loss, model)
    for name, g in fast_grads.items():
        atol = None if grad_atol is None else grad_atol * ref_grads[name].abs().max().item()
        assert_close(g, ref_grads[name], msg=name, atol=atol, rtol=None if atol is None else 1e-5)


@pytest.mark.parametrize(("d_in", "d_sae", "k", "batch"), [(8, 32, 1, 5), (12, 40, 3, 16), (33, 130, 17, 64)])
@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 on the CPU: the C kernels' path
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_fast_path_matches_the_dense_reference(arch, d_in, d_sae, k, batch, with_dead, dtype):
    torch.manual_seed(d_sae)
    model = build_sae(arch, d_in, d_sae, k, dtype=dtype)
    with torch.no_grad():
        model.b_dec.normal_(0, 0.3)
        model.b_enc.normal_(0, 0.3)
    x = torch.randn(batch, d_in, dtype=dtype)
    dead = (torch.arange(d_sae) % 4 == 1) if with_dead else None
    kwargs = {"dead_mask": dead, "aux_k": 6, "aux_coefficient": 0.25}
    assert_steps_agree(model, *fast_and_reference_steps(model, x, **kwargs))


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_fast_path_without_the_c_kernels_matches_the_reference(arch, monkeypatch):
    """The torch fallbacks of every kernel (what CUDA and compiler-less machines run), in float32."""
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    torch.manual_seed(11)
    model = build_sae(arch, 24, 96, 4, dtype=torch.float32)
    x = torch.randn(64, 24)
    x[0] *= 20  # BatchTopK: one row holds many of the selection
    kwargs = {"dead_mask": torch.arange(96) % 3 == 0, "aux_k": 8, "aux_coefficient": 0.1}
    assert_steps_agree(model, *fast_and_reference_steps(model, x, **kwargs), grad_atol=1e-6)


def test_batchtopk_selection_when_one_row_takes_most_of_the_batch():
    """Row 0 is scaled up so that it holds far more than k of the batch's k × B selection: the flat
    selection gives it that many pairs, and the step equals the dense reference."""
    torch.manual_seed(3)
    model = build_sae("batchtopk", 16, 200, 4, dtype=torch.float32)
    with torch.no_grad():
        model.b_enc.zero_()
    x = torch.randn(32, 16)
    x[0] *= 50
    fast, reference = fast_and_reference_steps(model, x)
    assert fast.fired_counts.sum() == reference.fired_counts.sum() == 4 * 32
    selection = model.select(model.pre_activations(x).detach())
    assert (selection.rows == 0).sum() > 2 * 4 and torch.equal(selection.rows, selection.rows.sort().values)
    assert_steps_agree(model, fast, reference, grad_atol=1e-6)  # float32 with gradients up to ~7e3


def test_batchtopk_with_nothing_positive_selects_nothing():
    model = build_sae("batchtopk", 8, 30, 3, dtype=torch.float64)
    with torch.no_grad():
        model.b_enc.fill_(-100.0)
    fast, reference = fast_and_reference_steps(model, torch.randn(6, 8, dtype=torch.float64))
    assert fast.fired_counts.sum() == 0
    assert_steps_agree(model, fast, reference)


@pytest.mark.slow
def test_compiled_kernels_match_the_eager_ones():
    torch.manual_seed(0)
    W, g = torch.randn(50, 12), torch.randn(16, 12)
    idx = torch.randint(0, 50, (16, 3))
    eager = sparse._row_dots_eager(W, idx, g)
    # the compiled kernel is what CUDA and non-float32 CPU runs use (float32 CPU runs use the C kernel)
    compiled = sparse.Kernels(compiled=True).dense_row_dots
    assert_close(compiled(W, idx, g), eager, rtol=1e-5, atol=1e-5)
    assert sparse.Kernels().dense_row_dots is sparse._row_dots_eager  # a model's choice, not the process's
