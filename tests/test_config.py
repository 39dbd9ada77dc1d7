"""TrainConfig: defaults, every out-of-range value and unknown key, with messages naming the field."""

import json
import os
import pickle

import pytest

from sae_core.architectures import ARCHITECTURE_NAMES, ARCHITECTURES
from sae_core.config import (
    ConfigError,
    EvaluateConfig,
    ExtractConfig,
    InspectConfig,
    StrictConfig,
    TrainConfig,
    config_class,
)
from sae_core.model_source import ModelSourceFields

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
        ("architecture", "gates", "architecture: got 'gates'; allowed: " + ", ".join(ARCHITECTURE_NAMES)),
        ("d_sae", 0, "d_sae: Input should be greater than 0"),
        ("k", -1, "k: Input should be greater than 0"),
        ("k", 65, "k (65) must be at most d_sae (64)"),
        ("aux_k_coefficient", -0.1, "aux_k_coefficient: Input should be greater than or equal to 0"),
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
        ("d_sae", "many", 'd_sae: must be a number, got "many"'),
        ("d_sae", 64.5, "d_sae: Input should be a valid integer"),
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

# Every float field of every architecture's config (TrainConfig's own and its options).
FLOAT_FIELDS = [
    (arch, name)
    for arch in ARCHITECTURE_NAMES
    for name, field in config_class(arch).model_fields.items()
    if field.annotation in (float, float | None)
]


def test_every_architecture_has_the_common_float_fields():
    common = {"lr", "grad_clip", "encoder_init_scale"}
    for arch in ARCHITECTURE_NAMES:
        assert common <= {name for a, name in FLOAT_FIELDS if a == arch}
    assert ("jumprelu", "jumprelu_bandwidth") in FLOAT_FIELDS and ("standard", "l1_coefficient") in FLOAT_FIELDS


@pytest.mark.parametrize(("arch", "field"), FLOAT_FIELDS)
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_naming_the_field(tmp_path, arch, field, literal):
    # JSON readers accept NaN and Infinity; the config must not (Infinity once turned grad_clip off).
    path = tmp_path / "cfg.json"
    base = {"activation_source": "x.safetensors", "architecture": arch, "d_sae": 64, "total_steps": 100}
    path.write_text(json.dumps(base)[:-1] + f', "{field}": {literal}}}')
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


# --------------------------------------------------------------------------- architectures' options (issue 22)


@pytest.mark.parametrize("arch", ARCHITECTURE_NAMES)
def test_each_architecture_config_is_trainconfig_plus_its_options_flat_in_the_json(arch):
    cfg = TrainConfig(activation_source="x", architecture=arch, d_sae=64, total_steps=10)
    assert isinstance(cfg, TrainConfig) and isinstance(cfg, ARCHITECTURES[arch].options)
    data = json.loads(cfg.to_json())
    options = list(ARCHITECTURES[arch].options.model_fields)
    assert list(data)[: len(TrainConfig.model_fields)] == list(TrainConfig.model_fields)  # the common keys first
    assert list(data)[len(TrainConfig.model_fields) :] == options  # then the architecture's, flat
    assert TrainConfig.from_dict(data) == cfg == TrainConfig.model_validate_json(cfg.to_json())
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # Streamlit's caches pickle configs


def test_an_option_of_another_architecture_is_named_as_misplaced():
    with pytest.raises(ConfigError) as refused:
        TrainConfig.from_dict({**MINIMAL, "architecture": "standard"})  # MINIMAL sets k
    assert str(refused.value) == "k: an option of topk, batchtopk, matryoshka_batchtopk, not of standard"
    with pytest.raises(ConfigError, match="matryoshka_widths: an option of matryoshka_batchtopk, not of topk"):
        make(matryoshka_widths=[8, 64])
    with pytest.raises(
        ConfigError,
        match="d_sae: Input should be greater than 0; jumprelu_bandwidth: an option of jumprelu, not of gated",
    ):
        TrainConfig.from_dict(
            {"activation_source": "x", "architecture": "gated", "d_sae": 0, "total_steps": 1, "jumprelu_bandwidth": 1}
        )


def test_an_unknown_architecture_does_not_also_report_its_options():
    with pytest.raises(ConfigError) as refused:
        make(architecture="gates", l1_coefficient=1.0)
    assert str(refused.value).startswith("architecture: got 'gates'") and "l1_coefficient" not in str(refused.value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"matryoshka_widths": [8, 4, 64]}, "matryoshka_widths: must be positive and strictly increasing"),
        ({"matryoshka_widths": [8, 32]}, "matryoshka_widths: the last width (32) must equal d_sae (64)"),
        ({"matryoshka_widths": [2, 64]}, "matryoshka_widths: the first width (2) must be at least k (4)"),
        ({"matryoshka_widths": []}, "matryoshka_widths: give 1 to 64 widths"),
    ],
)
def test_matryoshka_widths_are_checked_against_d_sae_and_k(changes, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        make(architecture="matryoshka_batchtopk", **changes)
    assert make(architecture="matryoshka_batchtopk", matryoshka_widths=[8, 16, 64]).effective_widths(64) == [8, 16, 64]
    assert make(architecture="matryoshka_batchtopk", d_sae=4096).effective_widths(4096) == [64, 256, 1024, 4096]


def test_penalty_options_and_their_checks():
    base = {"activation_source": "x", "d_sae": 64, "total_steps": 100}
    with pytest.raises(ConfigError, match="'quadratic' needs target_l0"):
        TrainConfig.from_dict({**base, "architecture": "jumprelu", "jumprelu_sparsity_loss_mode": "quadratic"})
    with pytest.raises(ConfigError, match=r"target_l0 \(64\) must be below d_sae \(64\)"):
        TrainConfig.from_dict({**base, "architecture": "standard", "target_l0": 64})
    with pytest.raises(ConfigError, match="target_l0: an option of standard, jumprelu, not of gated"):
        TrainConfig.from_dict({**base, "architecture": "gated", "target_l0": 8})
    cfg = TrainConfig.from_dict({**base, "architecture": "jumprelu", "target_l0": 8})
    assert cfg.effective_l1_warmup_steps(100) == 5 and cfg.jumprelu_init_threshold == 0.01


# --------------------------------------------------------------------------- hardening (issue 21)

# A valid config of every class, and which of its fields are numbers and which are switches.
VALID = {
    TrainConfig: MINIMAL,
    ExtractConfig: {"model": "m", "hook": "model.layers.0", "dataset": "d.txt", "n_tokens": 100},
    EvaluateConfig: {"sae": "sae"},
    InspectConfig: {"sae": "sae"},
}


def kinds_of(cls: type[StrictConfig], kind: type) -> list[str]:
    """The fields of `cls` whose type admits `kind` (int, float or bool), None aside."""
    return [
        name for name, f in cls.model_fields.items() if kind in (f.annotation, *getattr(f.annotation, "__args__", ()))
    ]


def test_every_config_class_is_covered():
    assert set(VALID) == set(StrictConfig.__subclasses__())
    assert kinds_of(TrainConfig, bool) == [
        "prepend_bos", "exclude_special_tokens", "transcoder", "transcoder_skip", "shuffle", "torch_compile"
    ]  # fmt: skip
    assert kinds_of(ExtractConfig, bool) == ["prepend_bos", "exclude_special_tokens"]


# Every architecture's config class too (its options are fields of it).
ARCHITECTURE_CLASSES = {config_class(arch): {**MINIMAL, "architecture": arch} for arch in ARCHITECTURE_NAMES}
for arch_values in ARCHITECTURE_CLASSES.values():
    if arch_values["architecture"] not in ("topk", "batchtopk", "matryoshka_batchtopk"):
        del arch_values["k"]
EVERY_CLASS = {**VALID, **ARCHITECTURE_CLASSES}


@pytest.mark.parametrize(
    "cls", list(EVERY_CLASS), ids=lambda c: getattr(c.model_fields.get("architecture"), "default", c.__name__)
)
def test_booleans_and_text_are_not_numbers_in_any_config(cls):
    numbers = kinds_of(cls, int) + kinds_of(cls, float)
    assert numbers, cls
    for field in numbers:
        for value, shown in ((True, "true"), (False, "false"), ("5", '"5"')):
            with pytest.raises(ConfigError) as refused:
                cls.from_dict({**EVERY_CLASS[cls], field: value})
            assert str(refused.value) == f"{field}: must be a number, got {shown}", field


@pytest.mark.parametrize("cls", list(VALID), ids=lambda c: c.__name__)
def test_switches_take_only_true_or_false(cls):
    for field in kinds_of(cls, bool):
        # a training's stream fields belong to a config that streams from a model
        valid = STREAMED if cls is TrainConfig and field in ModelSourceFields.model_fields else VALID[cls]
        valid = {**valid, "transcoder": True} if field == "transcoder_skip" else valid  # a skip term is a transcoder's
        for value in (1, 0, "yes", "false"):
            with pytest.raises(ConfigError, match=f"^{field}: must be true or false, got "):
                cls.from_dict({**valid, field: value})
        assert getattr(cls.from_dict({**valid, field: True}), field) is True


def test_numbers_still_read_as_before_from_json_forms_and_rows(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({**MINIMAL, "aux_k_coefficient": 3, "grad_clip": 2, "k": 4.0, "torch_compile": True}))
    cfg = TrainConfig.from_json_file(path)  # a JSON integer for a float field, an integral float for an int one
    assert (cfg.aux_k_coefficient, cfg.grad_clip, cfg.k, cfg.torch_compile) == (3.0, 2.0, 4, True)
    assert TrainConfig.model_validate_json(cfg.model_dump_json()) == cfg  # a job row reads back
    with pytest.raises(ValueError, match="must be a number, got true"):
        cfg.k = True  # assignment is checked too
    assert ExtractConfig.from_dict({**VALID[ExtractConfig], "prepend_bos": None}).prepend_bos is None


@pytest.mark.parametrize(
    "path",
    [
        "/proc/kmsg",
        "/proc/self/status",
        "/proc/self/environ",
        "/sys/kernel/mm/transparent_hugepage/enabled",
        "/dev/zero",
    ],
)
def test_kernel_pseudo_files_are_refused_without_being_read(path):
    # /proc files call themselves regular files of size 0; /proc/kmsg blocks a reader until the kernel logs
    with pytest.raises(ConfigError, match=f"^config file {path} is a kernel pseudo-file, not a file of data$"):
        TrainConfig.from_json_file(path)


def test_a_link_to_a_pseudo_file_is_refused_and_the_cli_says_so(tmp_path, capsys):
    from sae_core.cli.main import main as cli

    link = tmp_path / "cfg.json"
    link.symlink_to("/proc/kmsg")
    with pytest.raises(ConfigError, match="is a kernel pseudo-file"):
        TrainConfig.from_json_file(link)
    assert cli(["submit", "--config", "/proc/kmsg", "--cpu-procs", "1", "--no-daemon"]) == 2
    assert "config file /proc/kmsg is a kernel pseudo-file" in capsys.readouterr().err


# --------------------------------------------------------------------------- a model as the source (issue 24)

STREAMED = {**{k: v for k, v in MINIMAL.items() if k != "activation_source"},
            "model": "m", "hook": "model.layers.0", "dataset": "d.txt"}  # fmt: skip


def test_a_model_hook_and_text_stand_instead_of_activation_files():
    cfg = TrainConfig.from_dict(STREAMED)
    assert cfg.streamed and cfg.activation_source is None
    assert (cfg.context_size, cfg.model_batch_size, cfg.mixing_contexts, cfg.exclude_special_tokens) == (
        128,
        32,
        256,
        True,
    )
    assert not make().streamed


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"activation_source": "x.safetensors"}, "activation_source and model: give one"),
        ({"hook": None}, "hook: required to train from a model"),
        ({"dataset": None}, "dataset: required to train from a model"),
        ({"hook": "layers..0"}, "hook: 'layers..0' is not a module path"),
        ({"mixing_contexts": 0}, "mixing_contexts: Input should be greater than 0"),
        ({"prepend_bos": 1}, "prepend_bos: must be true or false"),
    ],
)
def test_a_model_source_is_checked_and_named(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict({**STREAMED, **changes})


def test_stream_fields_without_a_model_are_named():
    with pytest.raises(ConfigError, match="context_size: only for training from a model"):
        make(context_size=64)
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"architecture": "topk", "k": 4})
    assert "activation_source: required (or train from a model: model, hook and dataset)" in str(err.value)
