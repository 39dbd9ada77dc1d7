"""The Train page and `python -m sae_core submit` accept and refuse exactly the same submissions: one gate.

Each case runs on a fresh lab: the page (AppTest, real widgets) and then the CLI (in process) are given
the same config and placement, and must agree with each other and with the expected verdict. GPU cases
run on four fake GPUs: GPU 0 held by another SAE Lab job (a new job may queue behind it), GPU 1 used by a
foreign process (busy), GPUs 2 and 3 idle.
"""

from __future__ import annotations

import pytest

from sae_core.cli import jobs as cli_jobs
from sae_core.files import TOY_FILE
from sae_core.jobs import store
from sae_core.ui.forms import FormValues, StreamValues, SweepValues, form_to_config, form_to_sweep
from tests.app.conftest import Lab
from tests.app.test_app_pages import texts
from tests.fakes import fake_pynvml as fake

CASES = [
    # id, machine, global batch, placement, accepted
    ("cpu job", "cpu", 4096, {"cpu": 2}, True),
    ("batch does not split over the processes", "cpu", 4095, {"cpu": 2}, False),
    ("fewer rows than one batch plus the holdout", "cpu", 16384, {"cpu": 2}, False),
    ("gpu held by another sae lab job: queued behind it", "gpus", 4096, {"gpus": [0]}, True),
    ("gpu used by a foreign process", "gpus", 4096, {"gpus": [1]}, False),
    ("a held and a busy gpu", "gpus", 4096, {"gpus": [0, 1]}, False),
    ("two idle gpus", "gpus", 4096, {"gpus": [2, 3]}, True),
    ("batch does not split over three gpus", "gpus", 4096, {"gpus": [0, 2, 3]}, False),
]


def set_up_machine(lab: Lab, machine: str) -> None:
    if machine == "cpu":
        lab.sample(fake.no_driver())
        return
    lab.job("running", gpus="0")  # another SAE Lab job holds GPU 0
    lab.sample(n_gpus=4, overrides={1: {"processes": [fake.process(4242, 30 * fake.GiB)]}})


def placed(at, placement: dict) -> bool:
    """Set the page's placement widgets and run it; False when a chosen GPU cannot be picked (the page does not
    let it be chosen)."""
    if "cpu" in placement:
        at.number_input(key="train_cpu_procs").set_value(placement["cpu"])
    for index in placement.get("gpus", []):
        box = at.checkbox(key=f"train_gpu_pick_{index}")
        if box.disabled:
            return False
        box.check()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return True


def submitted(at) -> bool:
    """Whether the page's Submit queues a job (False: disabled, or refused by the gate)."""
    if at.button(key="train_submit").disabled:
        return False
    before = len(store.list_jobs())
    at.button(key="train_submit").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return len(store.list_jobs()) > before


def page_accepts(lab: Lab, batch: int, placement: dict) -> bool:
    at = lab.page("views/train.py", user_name="ana")
    at.number_input(key="train_batch").set_value(batch)
    if not placed(at, placement):
        return False
    return submitted(at)


def cli_submits(path, placement: dict, capsys) -> bool:
    """`submit` of the config at `path` on the placement: True queued, False refused (exit code 2)."""
    where = (
        ["--cpu-procs", str(placement["cpu"])]
        if "cpu" in placement
        else ["--gpus", ",".join(map(str, placement["gpus"]))]
    )
    code = cli_jobs.cli_submit(["--config", str(path), *where, "--user", "ana", "--no-daemon"])
    capsys.readouterr()
    assert code in (0, 2)
    return code == 0


def cli_accepts(lab: Lab, tmp_path, machine: str, batch: int, placement: dict, capsys) -> bool:
    # The page's own form with the same values: the CLI gets exactly the config the page would queue.
    values = FormValues(activation_source=str(lab.home / "datasets" / TOY_FILE), batch_size=batch)
    return cli_accepts_form(values, machine, tmp_path, placement, capsys)


def cli_accepts_form(values: FormValues, machine: str, tmp_path, placement: dict, capsys) -> bool:
    """`submit` of the config the page's form builds from `values` on `machine`."""
    values.device = "cpu" if machine == "cpu" else "auto"
    cfg, errors = form_to_config(values)
    assert cfg is not None, errors
    path = tmp_path / "cfg.json"
    path.write_text(cfg.model_dump_json())
    return cli_submits(path, placement, capsys)


@pytest.mark.parametrize(
    ("machine", "batch", "placement", "accepted"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_page_and_cli_agree(lab, tmp_path, capsys, machine, batch, placement, accepted):
    lab.toy_dataset()
    set_up_machine(lab, machine)
    by_page = page_accepts(lab, batch, placement)
    page_jobs = {j.id for j in store.list_jobs()}
    for job in store.list_jobs(["queued"]):  # leave the CLI the same queue the page saw
        store.request_cancel(job.id)
    by_cli = cli_accepts(lab, tmp_path, machine, batch, placement, capsys)
    assert (by_page, by_cli) == (accepted, accepted)
    if accepted:
        (page_job,) = [
            j for j in store.list_jobs() if j.id in page_jobs and j.submitted_by == "ana" and j.status == "cancelled"
        ]
        (cli_job,) = [j for j in store.list_jobs() if j.id not in page_jobs]
        assert cli_job.config_json == page_job.config_json and cli_job.gpu_ids == page_job.gpu_ids


# --------------------------------------------------------------------------- sweeps: the same gate
GRID = {"d_sae": "64, 128"}
SWEEP_CASES = [
    # id, machine, global batch, placement, layout asked, accepted
    ("sweep on the cpu", "cpu", 4096, {"cpu": 2}, "auto", True),
    ("sweep whose batch does not split: members", "cpu", 4095, {"cpu": 2}, "auto", True),
    ("sweep whose batch does not split, placement batch", "cpu", 4095, {"cpu": 2}, "batch", False),
    ("sweep on two idle gpus", "gpus", 4096, {"gpus": [2, 3]}, "auto", True),
    ("sweep on a busy gpu", "gpus", 4096, {"gpus": [1]}, "auto", False),
    ("sweep on more gpus than members, placement members", "gpus", 4096, {"gpus": [0, 2, 3]}, "members", False),
]


def page_accepts_sweep(lab: Lab, batch: int, placement: dict, layout: str) -> bool:
    at = lab.page("views/train.py", user_name="ana")
    at.number_input(key="train_batch").set_value(batch)
    at.toggle(key="train_sweep").set_value(True).run()
    for name, text in GRID.items():
        at.text_input(key=f"train_sweep_{name}").input(text)
    at.radio(key="train_sweep_placement").set_value(layout)
    if not placed(at, placement):
        return False
    return submitted(at)


def cli_accepts_sweep(lab: Lab, tmp_path, machine: str, batch: int, placement: dict, layout: str, capsys) -> bool:
    values = FormValues(activation_source=str(lab.home / "datasets" / TOY_FILE), batch_size=batch)
    values.device = "cpu" if machine == "cpu" else "auto"
    sweep, errors = form_to_sweep(values, SweepValues(dict(GRID), [values.architecture], layout))
    assert sweep is not None, errors
    path = tmp_path / "sweep.json"
    path.write_text(sweep.to_json())
    return cli_submits(path, placement, capsys)


@pytest.mark.parametrize(
    ("machine", "batch", "placement", "layout", "accepted"),
    [c[1:] for c in SWEEP_CASES],
    ids=[c[0] for c in SWEEP_CASES],
)
def test_page_and_cli_agree_on_sweeps(lab, tmp_path, capsys, machine, batch, placement, layout, accepted):
    lab.toy_dataset()
    set_up_machine(lab, machine)
    by_page = page_accepts_sweep(lab, batch, placement, layout)
    page_jobs = {j.id for j in store.list_jobs()}
    for job in store.list_jobs(["queued"]):
        store.request_cancel(job.id)
    by_cli = cli_accepts_sweep(lab, tmp_path, machine, batch, placement, layout, capsys)
    assert (by_page, by_cli) == (accepted, accepted)
    if accepted:
        (page_job,) = [j for j in store.list_jobs() if j.id in page_jobs and j.kind == "sweep"]
        (cli_job,) = [j for j in store.list_jobs() if j.id not in page_jobs]
        by_cli_sweep, by_page_sweep = store.job_config(cli_job), store.job_config(page_job)
        # the same SAEs (the page writes its option widgets' defaults out; the file leaves them to the config)
        assert [(m.name, m.config) for m in by_cli_sweep.members] == [(m.name, m.config) for m in by_page_sweep.members]
        assert by_cli_sweep.placement == by_page_sweep.placement != "auto"  # what the gate chose is queued
        assert cli_job.gpu_ids == page_job.gpu_ids


# --------------------------------------------------------------------------- from a model: the same gate
# The corpus gives 4,389 rows in contexts of 32; the run reads batch x steps + the holdout (4,096 by default).
STREAM_CASES = [
    # id, machine, steps, hooks, placement, accepted, more (the stream's other fields: StreamValues names)
    ("streamed on the cpu", "cpu", 2, ["model.layers.1"], {"cpu": 1}, True, {}),
    ("streamed from too little text", "cpu", 3, ["model.layers.1"], {"cpu": 1}, False, {}),
    ("streamed from two hooks: a sweep over hook", "cpu", 2, ["model.layers.0", "model.layers.1"], {"cpu": 1}, True, {}),
    ("streamed on a busy gpu", "gpus", 2, ["model.layers.1"], {"gpus": [1]}, False, {}),
    ("streamed on an idle gpu", "gpus", 2, ["model.layers.1"], {"gpus": [2]}, True, {}),
    ("a skip transcoder of an mlp block, kept and evaluated", "cpu", 2, ["model.layers.1.mlp"], {"cpu": 1}, True,
     {"transcoder": True, "transcoder_skip": True, "cache_to": "datasets/kept", "evaluate_contexts": 2}),
    ("transcoders of two mlp blocks: a sweep", "cpu", 2, ["model.layers.0.mlp", "model.layers.1.mlp"], {"cpu": 1},
     True, {"transcoder": True}),
    ("a stream kept outside the data roots", "cpu", 2, ["model.layers.1"], {"cpu": 1}, False, {"cache_to": "/etc/kept"}),
    ("a stream kept where one is kept already", "cpu", 2, ["model.layers.1"], {"cpu": 1}, False,
     {"cache_to": "datasets/taken"}),
]  # fmt: skip


def kept_in(lab: Lab, more: dict) -> dict:
    """`more` with cache_to inside the lab's home (a relative one); `datasets/taken` holds a kept stream."""
    taken = lab.home / "datasets" / "taken" / "model.layers.1"
    taken.mkdir(parents=True, exist_ok=True)
    (taken / "manifest.json").write_text("{}")
    if "cache_to" in more and not more["cache_to"].startswith("/"):
        return {**more, "cache_to": str(lab.home / more["cache_to"])}
    return more


def page_accepts_stream(lab: Lab, hf, steps: int, hooks: list[str], placement: dict, more: dict) -> bool:
    at = lab.page("views/train.py", user_name="ana")
    at.radio(key="train_source_kind").set_value("From a model").run()
    at.selectbox(key="train_model").set_value("Other…").run()
    at.text_input(key="train_model_typed").input(str(hf["llama"])).run()
    if more.get("transcoder"):
        at.checkbox(key="train_transcoder").check().run()
        at.checkbox(key="train_transcoder_skip").set_value(more.get("transcoder_skip", False))
    at.multiselect(key="train_hooks").set_value(hooks)
    at.selectbox(key="train_text_dataset").set_value("Other…").run()
    at.text_input(key="train_text_dataset_typed").input(str(hf["corpus"]))
    at.number_input(key="train_context").set_value(32)
    if "cache_to" in more:
        at.text_input(key="train_cache_to").input(more["cache_to"])
    at.number_input(key="train_evaluate_contexts").set_value(more.get("evaluate_contexts", 0))
    at.number_input(key="train_d_sae").set_value(64)
    at.number_input(key="train_batch").set_value(128)
    at.number_input(key="train_steps").set_value(steps)
    if not placed(at, placement):
        return False
    if "cache_to" in more and more["cache_to"].endswith(("/etc/kept", "/taken")):
        assert "cache_to: " in texts(at)  # refused for where the stream is kept, and said so
    return submitted(at)


def cli_accepts_stream(lab: Lab, hf, tmp_path, machine, steps, hooks, placement, more, capsys) -> bool:
    stream = StreamValues(str(hf["llama"]), hooks, str(hf["corpus"]), context_size=32, **more)
    values = FormValues(activation_source="", d_sae=64, batch_size=128, total_steps=steps, stream=stream)
    return cli_accepts_form(values, machine, tmp_path, placement, capsys)


@pytest.mark.parametrize(
    ("machine", "steps", "hooks", "placement", "accepted", "more"),
    [c[1:] for c in STREAM_CASES],
    ids=[c[0] for c in STREAM_CASES],
)
def test_page_and_cli_agree_on_streamed_trainings(
    lab, hf, tmp_path, capsys, machine, steps, hooks, placement, accepted, more
):
    set_up_machine(lab, machine)
    more = kept_in(lab, more)
    by_page = page_accepts_stream(lab, hf, steps, hooks, placement, more)
    page_jobs = {j.id for j in store.list_jobs()}
    for job in store.list_jobs(["queued"]):
        store.request_cancel(job.id)
    by_cli = cli_accepts_stream(lab, hf, tmp_path, machine, steps, hooks, placement, more, capsys)
    assert (by_page, by_cli) == (accepted, accepted)
    if accepted:
        (page_job,) = [j for j in store.list_jobs() if j.id in page_jobs and j.status == "cancelled"]
        (cli_job,) = [j for j in store.list_jobs() if j.id not in page_jobs]
        assert page_job.kind == cli_job.kind == ("sweep" if len(hooks) > 1 else "train")
        by_page_cfg, by_cli_cfg = store.job_config(page_job), store.job_config(cli_job)
        if len(hooks) > 1:
            assert [m.config.hook for m in by_page_cfg.members] == hooks
            assert [(m.name, m.config) for m in by_cli_cfg.members] == [(m.name, m.config) for m in by_page_cfg.members]
        else:
            assert by_page_cfg.streamed and by_page_cfg.hook == hooks[0] and by_page_cfg.activation_source is None
            assert by_cli_cfg == by_page_cfg
        configs = [m.config for m in by_page_cfg.members] if len(hooks) > 1 else [by_page_cfg]
        asked = {"transcoder": False, "transcoder_skip": False, "cache_to": None, "evaluate_contexts": 0, **more}
        for config in configs:
            assert {name: getattr(config, name) for name in asked} == asked
