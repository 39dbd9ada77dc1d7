import pytest

from sae_core.gpu.scaling import allreduce_seconds, link_bandwidth, predict, predict_many


def test_ring_allreduce_moves_two_n_minus_one_over_n_of_the_bytes():
    assert allreduce_seconds(10**9, 1, 1e9) == 0
    assert allreduce_seconds(10**9, 2, 1e9, latency_s=0) == pytest.approx(1.0)
    assert allreduce_seconds(10**9, 4, 1e9, latency_s=0) == pytest.approx(1.5)
    assert allreduce_seconds(0, 8, 1e9, latency_s=1e-3) == pytest.approx(14e-3)


def test_speedup_is_linear_without_communication_and_saturates_with_it():
    free = predict(1.0, 0, 4, 1e9, latency_s=0)
    assert free.speedup == pytest.approx(4.0) and free.step_s == pytest.approx(0.25)
    # 0.1 s of compute per step against 0.1 s of all-reduce at 2 GPUs: 0.05 + 0.1 -> 0.67x
    slow_link = predict(0.1, 10**8, 2, 1e9, latency_s=0)
    assert slow_link.speedup == pytest.approx(0.1 / 0.15)
    # work every rank repeats in full (the optimizer) does not shrink with more ranks
    assert predict(1.0, 0, 4, 1e9, latency_s=0, fixed_s=0.2).step_s == pytest.approx(0.2 + 0.8 / 4)
    hidden = predict(0.1, 10**8, 2, 1e9, overlap=1.0, latency_s=0)
    assert hidden.speedup == pytest.approx(2.0)
    speedups = [p.speedup for p in predict_many(1.0, 10**8, 25e9)]
    assert speedups == sorted(speedups) and speedups[-1] < 8
    assert predict(1.0, 10**8, 2, 25e9).label().startswith("2 GPUs: ≈")


def test_link_bandwidth_from_nvml_fields():
    assert link_bandwidth(4, 16) == pytest.approx(1.969e9 * 16 * 0.8)
    assert link_bandwidth(None, None, nvlinks=12) == pytest.approx(300e9)
    assert link_bandwidth(None, 16) is None


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        predict(0, 1, 2, 1e9)
    with pytest.raises(ValueError):
        predict(1, 1, 2, 1e9, overlap=1.5)


def test_speedup_labels_for_the_gpus_of_this_machine():
    from types import SimpleNamespace

    from sae_core.config import TrainConfig
    from sae_core.gpu.scaling import estimate_compute_seconds, speedup_labels

    cfg = TrainConfig(activation_source="x", d_sae=65536, k=64, total_steps=10, batch_size=16384)
    gpu = SimpleNamespace(name="NVIDIA H100 80GB HBM3", pcie_gen=5, pcie_width=16)
    labels = speedup_labels(cfg, 2304, [gpu] * 4)
    assert [label.split(":")[0] for label in labels] == ["2 GPUs", "4 GPUs"]
    speedups = [float(label.split("≈")[1].removesuffix("× tokens/s")) for label in labels]
    assert 1 < speedups[0] < 2 and speedups[0] < speedups[1] < 4
    assert speedup_labels(cfg, 2304, [gpu]) == []
    # an idle GPU downshifts its link; the prediction uses the link's maximum
    idle = SimpleNamespace(name=gpu.name, pcie_gen=1, pcie_width=16, pcie_gen_max=5, pcie_width_max=16)
    assert speedup_labels(cfg, 2304, [idle] * 4) == labels
    # bf16 makes compute ~13x faster on an H100, so communication weighs more
    bf16 = cfg.model_copy(update={"autocast": "bf16"})
    assert estimate_compute_seconds(bf16, 2304, gpu.name) < estimate_compute_seconds(cfg, 2304, gpu.name) / 10
