"""TrainConfig: defaults, every out-of-range value and unknown key, with messages naming the field."""

import json
import os

import pytest

from sae_core.config import ConfigError, TrainConfig

MINIMAL = {"activation_source": "x.safetensors", "architecture": "topk", "d_sae": 64, "k": 4, "total_steps": 100}


def make(**changes):
    return TrainConfig.from_dict({**MINIMAL, **changes})


def test_minimal_config_gets_working_defaults():
    cfg = make()
    assert cfg.activation_key == "activations"
    assert cfg.batch_size == 4096 and cfg.device == "auto" and cfg.autocast is None
    assert cfg.effective_lr == pytest.approx(8e-4 / (64 / 2**14) ** 0.5)
    assert cfg.effective_lr_warmup_steps == 1 and cfg.effective_lr_decay_steps == 10
    assert cfg.b_dec_init == "geometric_median" and cfg.encoder_init_scale == 0.5
    assert cfg.effective_aux_k(768) == 384 and cfg.effective_aux_k(4096) == 512


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("architecture", "gated", "architecture: got 'gated'; allowed: 'standard', 'topk', 'batchtopk' or 'jumprelu'"),
        ("d_sae", 0, "d_sae: Input should be greater than 0"),
        ("k", -1, "k: Input should be greater than 0"),
        ("k", 65, "k (65) must be at most d_sae (64)"),
        ("l1_coefficient", -0.1, "l1_coefficient: Input should be greater than or equal to 0"),
        ("batch_size", 0, "batch_size: Input should be greater than 0"),
        ("total_steps", 0, "total_steps: Input should be greater than 0"),
        ("lr", 0, "lr: Input should be greater than 0"),
        ("lr", 2.0, "lr: Input should be less than 1"),
        ("lr_warmup_steps", 101, "lr_warmup_steps (101) must be at most total_steps (100)"),
        ("lr_decay_steps", 101, "lr_decay_steps (101) must be at most total_steps (100)"),
        ("seed", -1, "seed: Input should be greater than or equal to 0"),
        ("dtype", "float64", "dtype: got 'float64'; allowed: 'float32' or 'bfloat16'"),
        ("autocast", "fp16", "autocast: got 'fp16'; allowed: 'bf16'"),
        ("checkpoint_every", 0, "checkpoint_every: Input should be greater than 0"),
        ("log_every", 0, "log_every: Input should be greater than 0"),
        ("holdout_tokens", -5, "holdout_tokens: Input should be greater than or equal to 0"),
        ("device", "tpu", "device: got 'tpu'; allowed: 'auto', 'cpu' or 'cuda'"),
        ("d_sae", "many", "d_sae: Input should be a valid integer"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(field, value, expected):
    with pytest.raises(ConfigError) as err:
        make(**{field: value})
    assert expected in str(err.value)


def test_autocast_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="autocast 'bf16' needs device 'cuda'"):
        make(autocast="bf16", device="cpu")


def test_unknown_key_lists_the_allowed_keys():
    with pytest.raises(ConfigError) as err:
        make(learning_rate=0.1)
    assert "learning_rate: unknown key" in str(err.value)
    assert "activation_source" in str(err.value) and "lr_warmup_steps" in str(err.value)


def test_missing_required_fields_are_named():
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"architecture": "topk"})
    for name in ("activation_source", "d_sae", "total_steps"):
        assert f"{name}: required" in str(err.value)


def test_batch_must_divide_by_world_size_naming_both_numbers():
    cfg = make(batch_size=1000)
    assert cfg.per_rank_batch(4) == 250
    with pytest.raises(ConfigError, match="batch_size 1000 does not divide evenly across 3 ranks"):
        cfg.per_rank_batch(3)


def test_json_file_round_trip_and_file_errors(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(make(seed=3).to_json())
    assert TrainConfig.from_json_file(path).seed == 3
    with pytest.raises(ConfigError, match="config file not found"):
        TrainConfig.from_json_file(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        TrainConfig.from_json_file(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        TrainConfig.from_json_file(path)


# --------------------------------------------------------------------------- hardening (issue 11)

FLOAT_FIELDS = [name for name, field in TrainConfig.model_fields.items() if field.annotation in (float, float | None)]


def test_every_float_field_is_known():
    assert set(FLOAT_FIELDS) == {
        "l1_coefficient",
        "lr",
        "aux_k_coefficient",
        "grad_clip",
        "encoder_init_scale",
        "jumprelu_bandwidth",
        "jumprelu_init_threshold",
    }


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_naming_the_field(tmp_path, field, literal):
    # JSON readers accept NaN and Infinity; the config must not (Infinity once turned grad_clip off).
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(MINIMAL)[:-1] + f', "{field}": {literal}}}')
    with pytest.raises(ConfigError) as refused:
        TrainConfig.from_json_file(path)
    assert str(refused.value).startswith(f"{field}: must be a finite number")


@pytest.mark.parametrize("field", ["total_steps", "checkpoint_every", "log_every", "lr_warmup_steps"])
def test_step_counts_have_a_documented_maximum(field):
    with pytest.raises(ConfigError, match=f"{field}: Input should be less than or equal to 1000000000"):
        make(**{field: 10**20})


def test_a_deeply_nested_config_is_a_message_not_a_recursion_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="not valid JSON: nested too deeply"):
        TrainConfig.from_json_file(path)


def test_a_large_config_file_is_not_read(tmp_path):
    path = tmp_path / "big.json"
    path.write_bytes(b" " * (2 << 20))
    with pytest.raises(ConfigError, match="at most 1,048,576 are read"):
        TrainConfig.from_json_file(path)


def test_a_fifo_as_config_file_is_refused_without_blocking(tmp_path):
    path = tmp_path / "cfg.json"
    os.mkfifo(path)  # opening it for reading would wait for a writer forever
    with pytest.raises(ConfigError, match="is not a regular file"):
        TrainConfig.from_json_file(path)


def test_messages_repeat_at_most_a_little_of_a_value():
    with pytest.raises(ConfigError) as refused:
        TrainConfig.from_dict({**MINIMAL, "x" * 100_000: 1, "architecture": "y" * 100_000})
    assert len(str(refused.value)) < 1000 and "unknown key" in str(refused.value)
