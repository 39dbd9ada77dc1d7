"""The Train page's sweep section as data: values parsed with their field's type, the grid, the need per GPU."""

from __future__ import annotations

from sae_core.gpu import memory
from sae_core.ui.forms import FormValues, SweepValues, form_to_sweep, parse_sweep_values, sweep_fields, sweep_need

VALUES = FormValues(activation_source="acts.safetensors", batch_size=256)


def test_the_fields_follow_the_architecture():
    assert [f.name for f in sweep_fields("topk")] == ["d_sae", "k", "lr", "init_seed"]
    assert [(f.name, f.kind) for f in sweep_fields("jumprelu")][1] == ("l1_coefficient", "float")


def test_values_are_parsed_with_the_fields_type_and_problems_name_the_field():
    d_sae, lr = sweep_fields("topk")[0], sweep_fields("topk")[2]
    assert parse_sweep_values(d_sae, " 4096, 16384  32768") == ([4096, 16384, 32768], None)
    assert parse_sweep_values(lr, "1e-4,3e-4") == ([1e-4, 3e-4], None)
    assert parse_sweep_values(d_sae, "") == ([], None)
    assert (
        parse_sweep_values(d_sae, "4096, 1.5")[1]
        == "sweep d_sae: '1.5' is not a whole number; separate values by commas"
    )
    assert parse_sweep_values(lr, "1e-4, 1e-4")[1] == "sweep lr: 1e-4 is listed twice"


def test_the_grid_is_every_combination_and_a_swept_field_leaves_the_base():
    sweep, problems = form_to_sweep(VALUES, SweepValues({"d_sae": "64, 128", "init_seed": "0 1"}, ["topk"], "members"))
    assert problems == [] and sweep is not None
    assert [m.name for m in sweep.members] == [
        "d_sae=64,init_seed=0",
        "d_sae=64,init_seed=1",
        "d_sae=128,init_seed=0",
        "d_sae=128,init_seed=1",
    ]
    assert "d_sae" not in sweep.base and sweep.placement == "members"


def test_an_empty_grid_and_no_architecture_are_problems():
    assert form_to_sweep(VALUES, SweepValues({}, ["topk"]))[1] == [
        "sweep: give the values of at least one field (separated by commas), or turn the sweep off"
    ]
    assert form_to_sweep(VALUES, SweepValues({"d_sae": "64"}, []))[1] == ["sweep architectures: choose at least one"]
    _, problems = form_to_sweep(VALUES, SweepValues({"d_sae": "64, 0"}, ["topk"]))
    assert problems and problems[0].startswith("member d_sae=0: d_sae")


def test_the_need_per_gpu_is_the_asked_layouts_or_the_smaller_under_auto():
    sweep, _ = form_to_sweep(VALUES, SweepValues({"d_sae": "64, 128"}, ["topk"]))
    assert sweep is not None
    figures = {layout: memory.sweep_estimate(sweep, 2, 16, layout).total_bytes for layout in ("batch", "members")}
    assert sweep_need(sweep, 2, 16) == min(figures.values())
    assert sweep_need(sweep.with_placement("batch"), 2, 16) == figures["batch"]
    assert sweep_need(sweep, 1, 16) == memory.sweep_estimate(sweep, 1, 16, "batch").total_bytes
    assert sweep_need(sweep.with_placement("members"), 3, 16) is None  # 3 GPUs for 2 members: cannot run
