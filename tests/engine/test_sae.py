"""Each architecture's forward, losses and gradients against a plain dense reference; FVU; save/load."""

import json
import math

import pytest
import torch
from torch.testing import assert_close

from sae_core.architectures import ARCHITECTURE_NAMES, ARCHITECTURES
from sae_core.config import DEFAULT_ENCODER_INIT_SCALE, TrainConfig
from sae_core.engine import cpu_kernels, saelens, sparse
from sae_core.engine.evaluation import evaluate
from sae_core.engine.saelens import exported_copy
from sae_core.engine.saes import StepContext, penalty, sae_class, sae_from_config
from sae_core.engine.saes import make_sae as build_sae
from sae_core.engine.saes.topk import TopKSAE

D_IN, D_SAE, K, B = 12, 40, 3, 16
# The architectures with a sparse training step of their own, tested against their dense reference path.
SPARSE = [name for name in ARCHITECTURE_NAMES if issubclass(sae_class(name), TopKSAE)]


def options_for(arch, **given):
    """`arch`'s options: K for the TopK family, 3 Matryoshka levels, and `given`."""
    fields = ARCHITECTURES[arch].options.model_fields
    values = {"k": K, "matryoshka_widths": [10, 20, D_SAE], "l1_warmup_steps": 0, **given}
    return ARCHITECTURES[arch].options(**{k: v for k, v in values.items() if k in fields})


def make_sae(arch, seed=0, **given):
    torch.manual_seed(seed)
    model = build_sae(arch, D_IN, D_SAE, options_for(arch, **given), dtype=torch.float64)
    with torch.no_grad():
        model.b_dec.normal_(0, 0.1)
        model.b_enc.normal_(0, 0.1)
        model.W_enc.add_(0.1 * torch.randn_like(model.W_enc))
        if arch == "jumprelu":
            model.threshold.fill_(0.05)
        if arch == "gated":
            model.r_mag.normal_(0, 0.2)
            model.b_mag.normal_(0, 0.1)
    return model


def params(model):
    return dict(model.named_parameters())


def grads_of(loss, model):
    names = [n for n, p in model.named_parameters()]
    values = torch.autograd.grad(loss, [p for _, p in model.named_parameters()], allow_unused=True)
    return dict(zip(names, values, strict=True))


def reference_pre(p, x, bias="b_enc"):
    return (x - p["b_dec"]) @ p["W_enc"] + p[bias]


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(B, D_IN, dtype=torch.float64)


def test_standard_matches_reference(x):
    model = make_sae("standard", l1_coefficient=0.3)
    p = params(model)
    out = model.training_step(x, StepContext(step=0, total_steps=10))
    z = reference_pre(p, x).relu()
    x_hat = z @ p["W_dec"] + p["b_dec"]
    ref = (x_hat - x).pow(2).sum(-1).mean() + 0.3 * (z * p["W_dec"].norm(dim=1)).sum(-1).mean()
    assert_close(out.loss, ref)
    assert set(out.losses) == {"mse", "l1"} and float(out.stats["sparsity_coefficient"]) == pytest.approx(0.3)
    ref_grads = grads_of(ref, model)
    for name, g in grads_of(out.loss, model).items():
        assert_close(g, ref_grads[name], msg=name)
    assert_close(out.l0, (z > 0).sum(-1).double().mean().to(out.l0.dtype))


def test_the_penalty_ramps_up_over_its_warmup(x):
    model = make_sae("standard", l1_coefficient=2.0, l1_warmup_steps=4)
    coefficients = [float(model.training_step(x, StepContext(s, 10)).stats["sparsity_coefficient"]) for s in range(6)]
    assert coefficients == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0])


def test_topk_with_auxk_matches_reference(x):
    model = make_sae("topk", aux_k=5, aux_k_coefficient=0.5)
    p = params(model)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    out = model.training_step(x, StepContext(dead_mask=dead))
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
    assert_close(out.losses["aux"], 0.5 * aux)
    assert_close(out.losses["mse"], recon)
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


def test_matryoshka_adds_each_inner_prefixs_reconstruction_to_batchtopk(x):
    model = make_sae("matryoshka_batchtopk")
    p = params(model)
    out = model.training_step(x)
    acts = reference_pre(p, x).relu().flatten()
    keep = acts.topk(K * B).indices  # the selection is BatchTopK's, over every latent
    z = torch.zeros_like(acts).scatter(0, keep, acts[keep]).view(B, D_SAE)
    losses = {f"inner_mse_{w}": ((z[:, :w] @ p["W_dec"][:w] + p["b_dec"]) - x).pow(2).sum(-1).mean() for w in (10, 20)}
    losses["mse"] = ((z @ p["W_dec"] + p["b_dec"]) - x).pow(2).sum(-1).mean()
    assert set(out.losses) == {"mse", "inner_mse_10", "inner_mse_20", "aux"}
    for name, value in losses.items():
        assert_close(out.losses[name], value, msg=name)
    ref = sum(losses.values())
    assert_close(out.loss, ref)
    ref_grads = grads_of(ref, model)
    for name, g in grads_of(out.loss, model).items():
        assert_close(g, ref_grads[name], msg=name)
    # a prefix holding fewer latents reconstructs worse: the early levels carry what is common
    assert float(losses["inner_mse_10"].detach()) > float(losses["mse"].detach())


def test_gated_gate_and_magnitude_paths_and_losses(x):
    model = make_sae("gated", l1_coefficient=0.4)
    p = params(model)
    out = model.training_step(x, StepContext(step=3, total_steps=10))
    gate_pre = reference_pre(p, x)  # b_enc is the gate's bias
    magnitude = ((x - p["b_dec"]) @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"]).relu()
    z = (gate_pre > 0).double() * magnitude
    x_hat = z @ p["W_dec"] + p["b_dec"]
    mse = (x_hat - x).pow(2).sum(-1).mean()
    l1 = 0.4 * (gate_pre.relu() * p["W_dec"].norm(dim=1)).sum(-1).mean()
    # the auxiliary reconstruction goes through a frozen decoder: it trains the gate, not the decoder
    aux = ((gate_pre.relu() @ p["W_dec"].detach() + p["b_dec"].detach()) - x).pow(2).sum(-1).mean()
    for name, value in {"mse": mse, "l1": l1, "aux": aux}.items():
        assert_close(out.losses[name], value, msg=name)
    ref_grads = grads_of(mse + l1 + aux, model)
    for name, g in grads_of(out.loss, model).items():
        assert_close(g, ref_grads[name], msg=name)
    assert_close(model.encode(x), z)


def test_jumprelu_forward_and_straight_through_threshold_gradient(x):
    model = make_sae("jumprelu", l1_coefficient=0.2)
    p = params(model)
    coefficient, eps = 0.2, model.options.jumprelu_bandwidth
    out = model.training_step(x)
    theta = p["threshold"].double()
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
    # dL/dθ by the paper's estimator, θ a parameter of its own: rectangle kernel K((pre-θ)/ε)/ε.
    grad_z = 2 * (x_hat - x) @ p["W_dec"].t() / B
    kernel = (((pre - theta) / eps).abs() < 0.5).double() / eps
    d_theta = (-theta * kernel * grad_z).sum(0) - coefficient * kernel.sum(0) / B
    assert got["threshold"].dtype == torch.float32  # kept in float32 whatever the weights are
    assert_close(got["threshold"].double(), d_theta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["tanh", "quadratic"])
def test_jumprelu_sparsity_loss_modes(x, mode):
    model = make_sae("jumprelu", l1_coefficient=0.3, jumprelu_sparsity_loss_mode=mode, target_l0=4.0)
    p = params(model)
    out = model.training_step(x)
    pre = reference_pre(p, x)
    z = pre * (pre > p["threshold"].double())
    if mode == "tanh":
        expected = torch.tanh(4.0 * z * p["W_dec"].norm(dim=1)).sum(-1).mean()
    else:
        l0 = (pre > p["threshold"].double()).double().sum(-1)
        expected = (2 / 4.0 * (l0 - 4.0) ** 2).mean()
    assert_close(out.losses["sparsity"], 0.3 * expected)


def test_jumprelu_pre_activation_loss_pushes_dead_latents_up_to_their_threshold(x):
    model = make_sae("jumprelu", pre_act_loss_coefficient=0.5)
    p = params(model)
    dead = torch.arange(D_SAE) % 2 == 0
    out = model.training_step(x, StepContext(dead_mask=dead))
    pre = reference_pre(p, x)
    below = (p["threshold"].double() - pre).relu() * dead * p["W_dec"].norm(dim=1)
    assert_close(out.losses["pre_act"], 0.5 * below.sum(-1).mean())
    assert float(model.training_step(x).losses["pre_act"]) == 0.0  # nothing can be dead yet


def test_jumprelu_threshold_stays_non_negative_and_old_checkpoints_load(x):
    model = make_sae("jumprelu")
    with torch.no_grad():
        model.threshold[:5] = -1.0
    out = model.training_step(x)
    model.after_optimizer_step(out, StepContext())
    assert float(model.threshold.detach().min()) >= 0.0
    # A checkpoint of the exp(log_threshold) parametrisation: the threshold it meant.
    state = {k: v for k, v in model.state_dict().items() if k != "threshold"}
    state["log_threshold"] = torch.full((D_SAE,), -3.0, dtype=torch.float64)
    fresh = make_sae("jumprelu", seed=5)
    fresh.load_state_dict(state)
    assert_close(fresh.threshold, torch.full((D_SAE,), float(torch.tensor(-3.0).exp())))


def test_a_target_l0_moves_the_coefficient_towards_it_once_warm(x):
    model = make_sae("standard", l1_coefficient=1.0, target_l0=2.0, l1_warmup_steps=2)
    out = model.training_step(x)
    assert float(out.l0) > 2 * math.e  # far too many latents fire: the coefficient must rise, at the most
    model.after_optimizer_step(out, StepContext(step=1, total_steps=10))  # still warming up: unchanged
    assert float(model.penalty.log_base.exp()) == pytest.approx(1.0)
    model.after_optimizer_step(out, StepContext(step=2, total_steps=10))
    assert float(model.penalty.log_base.exp()) == pytest.approx(math.exp(penalty.TARGET_L0_RATE))
    assert {"penalty.log_base", "penalty.error", "penalty.trend"} <= set(model.state_dict())  # a resume continues
    few = make_sae("standard", l1_coefficient=1.0, target_l0=30.0, l1_warmup_steps=0)
    few.after_optimizer_step(few.training_step(x), StepContext(step=5, total_steps=10))
    assert float(few.penalty.log_base.exp()) < 1.0  # too few: it falls
    assert "penalty.log_base" not in make_sae("standard").state_dict()  # no target: nothing adapts


def test_a_target_l0_holds_the_coefficient_while_l0_is_already_on_course(x):
    """The trend term: an L0 above the target but falling fast enough to reach it within the horizon does not
    raise the coefficient further (a rise would carry L0 past the target, see penalty.py); the same L0 standing
    still does."""
    steady, falling = (make_sae("standard", l1_coefficient=1.0, target_l0=10.0, l1_warmup_steps=0) for _ in "ab")
    out = steady.training_step(x)
    for step in range(100):  # log(L0 / target) from 2 down to 0.02 a step lower: the target in ~100 steps
        for model, l0 in ((steady, 10.0 * math.exp(1.0)), (falling, 10.0 * math.exp(2.0 - 0.02 * step))):
            out.l0 = torch.tensor(l0)
            model.after_optimizer_step(out, StepContext(step=step, total_steps=1000))
    assert float(steady.penalty.log_base) == pytest.approx(100 * penalty.TARGET_L0_RATE)  # rose every step
    assert float(falling.penalty.log_base) < 0.5 * float(steady.penalty.log_base)  # held back by the trend
    assert float(falling.penalty.trend) == pytest.approx(-0.02, rel=0.05)


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


@pytest.mark.parametrize("arch", ARCHITECTURE_NAMES)
def test_every_architecture_is_built_from_its_config_with_its_options(arch):
    cfg = TrainConfig(activation_source="x", architecture=arch, d_sae=64, total_steps=10)
    sae = sae_from_config(cfg, 16)
    assert sae.architecture == arch and sae.spec is ARCHITECTURES[arch] and sae.options is cfg
    out = sae.training_step(torch.randn(32, 16), StepContext(dead_mask=torch.ones(64, dtype=torch.bool)))
    out.loss.backward()
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and "mse" in out.losses
    assert out.x_hat.shape == (32, 16) and out.fired_counts.shape == (64,)


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


@pytest.mark.parametrize("arch", ARCHITECTURE_NAMES)
def test_save_load_round_trip_encodes_identically(tmp_path, arch, x):
    model = make_sae(arch).float()
    with torch.no_grad():
        model.input_scale.fill_(2.5)  # must be folded into the saved weights
        if hasattr(model, "batch_threshold"):
            model.batch_threshold.fill_(0.1)
    saelens.save(model, tmp_path)
    loaded = saelens.load(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == ARCHITECTURES[arch].saved_architecture == loaded.architecture
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["sae_lens_version"] >= "6.0.0" and cfg["metadata"]["trained_architecture"] == arch
    assert ("k" in cfg) == (cfg["architecture"] == "topk") and cfg.get("k", K) == K
    raw = x.float()
    reference = exported_copy(model, "cpu")
    assert_close(loaded.encode(raw), reference.encode(raw))
    assert_close(loaded(raw), reference(raw))
    # Training-time view (scaled input) and the saved SAE on raw input agree up to the scale (the batch
    # variants' training rule is the batch's, not the saved threshold's).
    if ARCHITECTURES[arch].saved_as is None:
        assert_close(model.encode(raw * 2.5), loaded.encode(raw), rtol=1e-4, atol=1e-5)


def fast_and_reference_steps(model, x, ctx=None):
    """(fast, reference) StepOutputs of the same model on x, each from the same BatchTopK threshold."""
    start = model.batch_threshold.clone() if hasattr(model, "batch_threshold") else None
    fast = model.training_step(x, ctx)
    if start is not None:
        fast.threshold = model.batch_threshold.clone()
        model.batch_threshold.copy_(start)
    reference = model.training_step(x, ctx, reference=True)
    if start is not None:
        reference.threshold = model.batch_threshold.clone()
    return fast, reference


def assert_steps_agree(model, fast, reference, grad_atol=None):
    assert list(fast.losses) == list(reference.losses)
    for name in fast.losses:
        assert_close(fast.losses[name], reference.losses[name], msg=name)
    for field in ("loss", "x_hat", "l0"):
        assert_close(getattr(fast, field), getattr(reference, field), msg=field)
    assert torch.equal(fast.fired_counts, reference.fired_counts)
    if hasattr(model, "batch_threshold"):
        assert_close(fast.threshold, reference.threshold)
    fast_grads, ref_grads = grads_of(fast.loss, model), grads_of(reference.loss, model)
    for name, g in fast_grads.items():
        atol = None if grad_atol is None else grad_atol * ref_grads[name].abs().max().item()
        assert_close(g, ref_grads[name], msg=name, atol=atol, rtol=None if atol is None else 1e-5)


def sparse_model(arch, d_in, d_sae, k, dtype):
    options = options_for(arch, k=k, matryoshka_widths=[max(k, d_sae // 4), max(k + 1, d_sae // 2), d_sae])
    return build_sae(arch, d_in, d_sae, options, dtype=dtype)


@pytest.mark.parametrize(("d_in", "d_sae", "k", "batch"), [(8, 32, 1, 5), (12, 40, 3, 16), (33, 130, 17, 64)])
@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 on the CPU: the C kernels' path
@pytest.mark.parametrize("arch", SPARSE)
def test_sparse_fast_path_matches_the_dense_reference(arch, d_in, d_sae, k, batch, with_dead, dtype):
    torch.manual_seed(d_sae)
    model = sparse_model(arch, d_in, d_sae, k, dtype)
    model.options.aux_k, model.options.aux_k_coefficient = 6, 0.25
    with torch.no_grad():
        model.b_dec.normal_(0, 0.3)
        model.b_enc.normal_(0, 0.3)
    x = torch.randn(batch, d_in, dtype=dtype)
    dead = (torch.arange(d_sae) % 4 == 1) if with_dead else None
    assert_steps_agree(model, *fast_and_reference_steps(model, x, StepContext(dead_mask=dead)))


@pytest.mark.parametrize("arch", SPARSE)
def test_fast_path_without_the_c_kernels_matches_the_reference(arch, monkeypatch):
    """The torch fallbacks of every kernel (what CUDA and compiler-less machines run), in float32."""
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    torch.manual_seed(11)
    model = sparse_model(arch, 24, 96, 4, torch.float32)
    model.options.aux_k, model.options.aux_k_coefficient = 8, 0.1
    x = torch.randn(64, 24)
    x[0] *= 20  # BatchTopK: one row holds many of the selection
    ctx = StepContext(dead_mask=torch.arange(96) % 3 == 0)
    assert_steps_agree(model, *fast_and_reference_steps(model, x, ctx), grad_atol=1e-6)


def test_batchtopk_selection_when_one_row_takes_most_of_the_batch():
    """Row 0 is scaled up so that it holds far more than k of the batch's k × B selection: the flat
    selection gives it that many pairs, and the step equals the dense reference."""
    torch.manual_seed(3)
    model = sparse_model("batchtopk", 16, 200, 4, torch.float32)
    with torch.no_grad():
        model.b_enc.zero_()
    x = torch.randn(32, 16)
    x[0] *= 50
    fast, reference = fast_and_reference_steps(model, x)
    assert fast.fired_counts.sum() == reference.fired_counts.sum() == 4 * 32
    selection = model.select(model.pre_activations(x).detach())
    assert (selection.rows == 0).sum() > 2 * 4 and torch.equal(selection.rows, selection.rows.sort().values)
    assert_steps_agree(model, fast, reference, grad_atol=1e-6)  # float32 with gradients up to ~7e3


@pytest.mark.parametrize("arch", [a for a in SPARSE if a != "topk"])
def test_batch_selection_with_nothing_positive_selects_nothing(arch):
    model = sparse_model(arch, 8, 30, 3, torch.float64)
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
