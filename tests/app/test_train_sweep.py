"""The Train page's sweep section (AppTest, real widgets, the real gate): values per field, the grid's size, the
per-GPU estimate of the layout the gate chose, refusals explained, and a sweep job queued."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from sae_core.files import TOY_FILE
from sae_core.gpu import memory
from sae_core.jobs import store
from sae_core.sweep import Sweep
from sae_core.text import format_bytes
from sae_core.ui.forms import FormValues, SweepValues, form_to_sweep
from tests.app.conftest import Lab, rendered
from tests.fakes import fake_pynvml as fake

GiB = fake.GiB


def sweep_page(lab: Lab, batch: int = 4096, **typed: str) -> AppTest:
    lab.toy_dataset()
    at = lab.page("views/train.py", user_name="ana")
    at.number_input(key="train_batch").set_value(batch)
    at.toggle(key="train_sweep").set_value(True).run()
    for name, text in typed.items():
        at.text_input(key=f"train_sweep_{name}").input(text)
    return at.run()


def errors(at: AppTest) -> list[str]:
    assert not at.exception, [e.value for e in at.exception]
    return [rendered(str(e.value)) for e in at.error]


def captions(at: AppTest) -> list[str]:
    return [rendered(str(c.value)) for c in at.caption]


def test_a_grid_on_the_cpu_is_queued_as_one_sweep_job(lab):
    lab.sample(fake.no_driver())
    at = sweep_page(lab, d_sae="64, 128", k="4 8")
    assert errors(at) == [] and "Sweep: 4 SAEs" in captions(at)
    assert any("sweep placement: batch (4 members on each of 2 processes" in rendered(i.value) for i in at.info)
    at.button(key="train_submit").click().run()
    (job,) = store.list_jobs()
    sweep = store.job_config(job)
    assert isinstance(sweep, Sweep) and job.kind == "sweep" and sweep.placement == "batch"
    assert [m.name for m in sweep.members] == ["d_sae=64,k=4", "d_sae=64,k=8", "d_sae=128,k=4", "d_sae=128,k=8"]


def test_a_value_that_is_not_a_number_names_its_field_and_blocks_submit(lab):
    lab.sample(fake.no_driver())
    at = sweep_page(lab, d_sae="64, lots")
    assert "sweep d_sae: 'lots' is not a whole number; separate values by commas" in errors(at)
    assert at.button(key="train_submit").disabled and store.list_jobs() == []


def test_architectures_are_swept_with_the_options_they_share(lab):
    lab.sample(fake.no_driver())
    at = sweep_page(lab)
    at.multiselect(key="train_sweep_architecture").set_value(["topk", "batchtopk"]).run()
    assert errors(at) == [] and "Sweep: 2 SAEs" in captions(at)
    at.text_input(key="train_sweep_k").input("4, 8").run()
    at.multiselect(key="train_sweep_architecture").set_value(["topk", "jumprelu"]).run()
    assert any(e.startswith("member arch=jumprelu,k=4: k: an option of") for e in errors(at))


def page_sweep(lab: Lab, batch: int, **typed: str) -> Sweep:
    """The sweep the page builds from these values (its defaults otherwise)."""
    values = FormValues(activation_source=str(lab.home / "datasets" / TOY_FILE), batch_size=batch)
    sweep, problems = form_to_sweep(values, SweepValues(typed, ["topk"]))
    assert sweep is not None, problems
    return sweep


WIDE = {"d_sae": "262144", "init_seed": "0, 1, 2, 3"}  # wide members on a small batch: "members" needs less


def test_the_estimate_of_the_layout_the_gate_chose(lab):
    lab.toy_dataset()
    need = {
        layout: memory.sweep_estimate(page_sweep(lab, 256, **WIDE), 2, 16, layout).total_bytes
        for layout in ("batch", "members")
    }
    assert need["members"] < need["batch"]
    lab.sample(n_gpus=2, memory_used=80 * GiB - (need["batch"] + need["members"]) // 2)
    at = sweep_page(lab, 256, **WIDE)
    for index in (0, 1):
        at.checkbox(key=f"train_gpu_pick_{index}").check()
    at.run()
    assert errors(at) == []
    assert [m.value for m in at.metric if m.label == "Estimated memory per GPU"] == [format_bytes(need["members"])]
    shown = captions(at)
    assert (
        f"placement batch: {format_bytes(need['batch'])} · placement members: {format_bytes(need['members'])} (chosen)"
        in shown
    )
    assert any(c.startswith("Predicted speed-up: 2 GPUs: batch ≈") for c in shown)
    assert any("sweep placement: members (4 members on 2 GPUs, 2 per GPU" in rendered(i.value) for i in at.info)
    at.button(key="train_submit").click().run()
    (job,) = store.list_jobs()
    assert store.job_config(job).placement == "members" and job.gpu_list == [0, 1]


def test_gpus_too_full_for_the_grid_cannot_be_ticked(lab):
    lab.toy_dataset()
    need = memory.sweep_estimate(page_sweep(lab, 256, **WIDE), 1, 16, "batch").total_bytes
    lab.sample(n_gpus=2, memory_used=80 * GiB - need + GiB)
    at = sweep_page(lab, 256, **WIDE)
    assert errors(at) == [] and at.checkbox(key="train_gpu_pick_0").disabled
    assert any("Low memory" in m.value for m in at.markdown)


def test_a_layout_that_cannot_run_is_refused_and_explained(lab):
    lab.sample(n_gpus=4)
    at = sweep_page(lab, d_sae="64, 128")
    at.radio(key="train_sweep_placement").set_value("members")
    for index in (0, 1, 2):
        at.checkbox(key=f"train_gpu_pick_{index}").check()
    at.run()
    expected = "placement: members gives each of the 3 GPUs its own members, but the sweep has 2, so 1 would idle"
    assert any(e.startswith(expected) for e in errors(at)), errors(at)
    assert at.button(key="train_submit").disabled
    at.radio(key="train_sweep_placement").set_value("auto").run()  # 3 GPUs: the batch of 4,096 does not split
    assert any("placement batch: batch_size 4096 does not divide evenly across 3 GPUs" in e for e in errors(at))
    at.checkbox(key="train_gpu_pick_2").uncheck().run()
    assert errors(at) == [] and not at.button(key="train_submit").disabled
