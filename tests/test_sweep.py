"""Sweep configs: the grid and the member list expand into named, validated members; what fixes the batch
cannot vary; every mistake is named by its key or its member."""

import json

import pytest

from sae_core.config import ConfigError, TrainConfig
from sae_core.sweep import BATCH_FIELDS, MAX_MEMBERS, Sweep, read_training_config, sweep_from_dict

BASE = {"activation_source": "x.safetensors", "total_steps": 10, "batch_size": 64}


def test_grid_expands_every_combination_in_written_order_with_readable_names():
    sweep = sweep_from_dict({**BASE, "sweep": {"d_sae": [64, 128], "k": [4, 8], "architecture": ["topk"]}})
    assert [m.name for m in sweep.members] == [
        "d_sae=64,k=4,arch=topk",
        "d_sae=64,k=8,arch=topk",
        "d_sae=128,k=4,arch=topk",
        "d_sae=128,k=8,arch=topk",
    ]
    last = sweep.members[-1].config
    assert isinstance(last, TrainConfig) and (last.d_sae, last.k, last.architecture) == (128, 8, "topk")
    # d_sae is required for a single run, but the grid sets it
    assert "d_sae" not in sweep.base


def test_member_list_overrides_the_base_and_mixes_architectures():
    sweep = sweep_from_dict(
        {**BASE, "d_sae": 64, "members": [{"architecture": "topk", "k": 4}, {"architecture": "standard", "lr": 1e-3}]}
    )
    assert [m.name for m in sweep.members] == ["arch=topk,k=4", "arch=standard,lr=0.001"]
    assert sweep.members[1].config.architecture == "standard" and sweep.members[1].config.lr == 1e-3


def test_member_equals_the_single_config_it_describes():
    sweep = sweep_from_dict({**BASE, "architecture": "topk", "sweep": {"d_sae": [64], "k": [4], "init_seed": [3]}})
    single = TrainConfig.from_dict({**BASE, "architecture": "topk", "d_sae": 64, "k": 4, "init_seed": 3})
    assert sweep.members[0].config == single
    assert (
        single.effective_init_seed == 3
        and TrainConfig.from_dict({**BASE, "d_sae": 64, "k": 4}).effective_init_seed == 0
    )


def test_round_trip_through_json_keeps_members_and_placement():
    sweep = sweep_from_dict({**BASE, "k": 4, "sweep": {"d_sae": [64, 128]}}).with_placement("members")
    again = Sweep.model_validate_json(sweep.model_dump_json())
    assert again.placement == "members" and [m.name for m in again.members] == [m.name for m in sweep.members]
    assert again.total_steps == 10 and again.device == "auto"


def test_read_training_config_tells_single_from_sweep(tmp_path):
    single, sweep = tmp_path / "single.json", tmp_path / "sweep.json"
    single.write_text(json.dumps({**BASE, "d_sae": 64, "k": 4}))
    sweep.write_text(json.dumps({**BASE, "k": 4, "sweep": {"d_sae": [64, 128]}}))
    assert isinstance(read_training_config(single), TrainConfig)
    assert isinstance(read_training_config(sweep), Sweep)


@pytest.mark.parametrize("field", BATCH_FIELDS)
def test_a_field_that_fixes_the_batch_cannot_vary(field):
    with pytest.raises(ConfigError, match=f"sweep.{field}: {field} fixes the batch"):
        sweep_from_dict({**BASE, "d_sae": 64, "k": 4, "sweep": {field: [1, 2]}})
    with pytest.raises(ConfigError, match=rf"members\[0\].{field}: {field} fixes the batch"):
        sweep_from_dict({**BASE, "d_sae": 64, "k": 4, "members": [{field: 1}]})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sweep": {"d_sae": [64]}, "members": [{}]}, "give one of them"),
        ({"sweep": []}, "sweep: must be an object"),
        ({"sweep": {"d_sae": []}}, "sweep.d_sae: must be a non-empty list"),
        ({"sweep": {"d_sae": 64}}, "sweep.d_sae: must be a non-empty list"),
        ({"members": []}, "members: must be a non-empty list"),
        ({"members": [3]}, r"members\[0\]: must be an object"),
        ({"members": [{"sweep": {}}]}, "cannot be nested"),
        ({"sweep": {"d_sae": [64, 64]}}, r"members\[0\] and members\[1\] are the same member \(d_sae=64\)"),
        ({"sweep": {"d_sae": [64, -1]}}, "member d_sae=-1: d_sae: Input should be greater than 0"),
        ({"sweep": {"k": [4, 1000]}, "d_sae": 64}, "member k=1000: "),
        ({"sweep": {"architecture": ["topk", "nope"]}, "d_sae": 64}, "member arch=nope: architecture: got 'nope'"),
        ({"sweep": {"d_sae": [64]}, "placement": "gpus"}, "placement: got 'gpus'; allowed: auto, batch, members"),
        ({"sweep": {"d_sae": list(range(1, 20)), "k": list(range(1, 20))}}, f"at most {MAX_MEMBERS} members"),
        ({"sweep": {"d_sae": [64]}, "colour": 1}, "member d_sae=64: colour: unknown key"),
    ],
)
def test_bad_sweeps_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        sweep_from_dict({**BASE, "k": 4, **data})


def test_member_names_are_safe_folder_names():
    sweep = sweep_from_dict({**BASE, "d_sae": 64, "k": 4, "members": [{"lr": 1e-4}, {"b_dec_init": "mean"}]})
    assert [m.name for m in sweep.members] == ["lr=0.0001", "b_dec_init=mean"]
    for member in sweep.members:
        assert "/" not in member.name and member.folder("/run").parent.as_posix() == "/run"
