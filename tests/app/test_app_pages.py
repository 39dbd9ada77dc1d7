"""AppTest of every page: a fresh SAE_LAB_HOME, the fake NVML behind the real sampler, and only the
launcher daemon boundary patched (no real daemon is started here)."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from sae_core import access, db, files
from sae_core import text as fmt
from sae_core.architectures import ARCHITECTURE_NAMES, all_option_keys
from sae_core.data import catalog
from sae_core.db.tables import Job
from sae_core.jobs import metrics, store
from sae_core.ui.forms import option_fields
from tests.app.conftest import APP, Lab, rendered
from tests.fakes import fake_pynvml as fake

GiB = fake.GiB


def texts(at: AppTest) -> str:
    """Everything a person reads on the page (markdown, captions, alerts, metrics), as one string."""
    parts = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success", "title", "subheader"):
        parts += [rendered(str(e.value)) for e in getattr(at, kind)]
    parts += [str(e.value) for e in at.code]  # code is shown as written
    parts += [f"{m.label}: {m.value}" for m in at.metric]
    return "\n".join(parts)


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


# --------------------------------------------------------------------------- shell


def test_first_run_creates_the_database_and_offers_a_toy_dataset(lab):
    assert not (lab.home / "lab.db").exists()
    at = lab.page()
    no_exception(at)
    assert (lab.home / "lab.db").exists()
    assert "No activation sets" in texts(at)
    at.button(key="create_toy").click().run()
    no_exception(at)
    toy = lab.home / "datasets" / files.TOY_FILE
    assert toy.is_file()
    assert "Created" in texts(at)
    at.switch_page("views/train.py").run()
    assert files.TOY_FILE in at.selectbox(key="train_dataset").options


def test_sidebar_names_home_launcher_and_gpus(lab):
    lab.sample(n_gpus=8)
    at = lab.page()
    side = "\n".join(rendered(str(e.value)) for e in [*at.sidebar.markdown, *at.sidebar.caption, *at.sidebar.code])
    assert "running · pid 4242" in side
    assert "8 × NVIDIA H100 80GB HBM3" in side
    assert str(lab.home) in side


def test_sidebar_without_gpus_gives_the_reason(lab):
    lab.sample(fake.no_driver())
    at = lab.page()
    side = "\n".join(rendered(str(e.value)) for e in at.sidebar.caption)
    assert "No NVIDIA GPU found:" in side


def test_launcher_started_once_per_session_then_by_button(lab):
    lab.daemon_running = False
    at = lab.page()
    assert lab.ensure_calls == 1
    assert "not running" in "\n".join(str(m.value) for m in at.sidebar.markdown)
    at.run()
    assert lab.ensure_calls == 1  # not on every rerun
    lab.daemon_running = True
    at.sidebar.button(key="start_launcher").click().run()
    no_exception(at)
    assert lab.ensure_calls == 2
    assert "running · pid 4242" in "\n".join(str(m.value) for m in at.sidebar.markdown)


def test_no_password_configured_shows_the_app(lab):
    at = lab.page()
    assert "login_password" not in [w.key for w in at.text_input]
    assert at.title[0].value == "SAE Lab" and "Datasets" in texts(at)


@pytest.mark.parametrize("source", ["env", "secrets"])
def test_password_gate_wrong_then_right(lab, monkeypatch, source):
    at = AppTest.from_file(APP, default_timeout=30)
    if source == "env":
        monkeypatch.setenv("SAE_LAB_PASSWORD", "s3cret")
    else:
        at.secrets["SAE_LAB_PASSWORD"] = "s3cret"
    at.run()
    no_exception(at)
    assert "Datasets" not in texts(at) and not at.sidebar.markdown  # nothing but the prompt
    at.text_input(key="login_password").input("wrong")
    at.button[0].click().run()
    assert "Wrong password." in texts(at) and "Datasets" not in texts(at)
    at.text_input(key="login_password").input("s3cret")
    at.button[0].click().run()
    no_exception(at)
    assert "Datasets" in texts(at)
    at.switch_page("views/jobs.py").run()  # asked once per session, not per page
    assert at.title[0].value == "Jobs"


def test_locked_app_serves_no_page_but_sign_in(lab, monkeypatch):
    monkeypatch.setenv("SAE_LAB_PASSWORD", "s3cret")
    lab.job("completed")
    at = AppTest.from_file(APP, default_timeout=30)
    at.switch_page("views/jobs.py").run()
    no_exception(at)
    assert [w.key for w in at.text_input] == ["login_password"]
    assert "Jobs" not in [t.value for t in at.title] and not at.dataframe


# --------------------------------------------------------------------------- monitor


def test_monitor_before_any_sample(lab):
    at = lab.page("views/monitor.py")
    no_exception(at)
    assert "No sample yet" in texts(at)


def test_monitor_without_gpus_shows_reason_and_host(lab):
    lab.sample(fake.no_driver())
    at = lab.page("views/monitor.py")
    no_exception(at)
    assert "No NVIDIA GPU found:" in texts(at)
    assert any(m.label == "CPU" for m in at.metric) and any(m.label == "RAM" for m in at.metric)


def test_monitor_one_gpu_card(lab):
    lab.sample(n_gpus=1, overrides={0: {"util_gpu": 87, "temperature": 64, "power_w": 350.0}})
    at = lab.page("views/monitor.py")
    no_exception(at)
    page = texts(at)
    assert "**GPU 0** · NVIDIA H100 80GB HBM3" in page and "**GPU 1**" not in page
    assert "Util 87% · 64 °C · 350 / 700 W" in page
    assert len(at.get("vega_lite_chart")) >= 1


def test_monitor_eight_gpus_with_jobs_processes_and_memory_colours(lab):
    job_id = lab.job("running", gpus="2")
    me = os.getpid()  # a real process, so user and command can be read
    lab.sample(
        n_gpus=8,
        overrides={
            1: {"memory_used": 76 * GiB, "processes": [fake.process(me, 76 * GiB)]},
            3: {"memory_used": 60 * GiB},
        },
    )
    at = lab.page("views/monitor.py")
    no_exception(at)
    page = texts(at)
    for i in range(8):
        assert f"**GPU {i}**" in page
    bars = [m.value for m in at.markdown if "sae-membar" in m.value]
    assert len(bars) == 8
    assert 'data-colour="red"' in bars[1] and 'data-colour="yellow"' in bars[3] and 'data-colour="green"' in bars[0]
    assert f"pid {me}" in page
    procs = at.dataframe[0].value
    assert me in procs["PID"].tolist()
    assert job_id > 0


def test_monitor_aggregated_view_and_windows(lab):
    lab.sample(n_gpus=8, util_gpu=50)
    at = lab.page("views/monitor.py")
    at.toggle(key="monitor_aggregate").set_value(True).run()
    no_exception(at)
    assert "**All 8 GPUs**" in texts(at) and "**GPU 0**" not in texts(at)
    assert any(m.label == "Mean utilization" and m.value == "50%" for m in at.metric)
    for window in ("1h", "24h", "7d"):
        at.button_group(key="monitor_window").set_value(window).run()
        no_exception(at)
        assert at.session_state["monitor_window"] == window and "**All 8 GPUs**" in texts(at)


# --------------------------------------------------------------------------- jobs


def test_jobs_page_empty(lab):
    at = lab.page("views/jobs.py")
    no_exception(at)
    assert "No jobs yet." in texts(at)


def _metrics(job_id: int, steps: int, ranks: int = 2) -> None:
    points = [
        metrics.metric_point_from_record(
            job_id,
            {
                "step": s,
                "tokens": s * 512,
                "loss": 1 / s,
                "mse": 0.1,
                "fvu": 0.5 / s,
                "l0": 16.0,
                "dead_fraction": 0.01,
                "lr": 1e-3,
                "tokens_per_s": 5e4,
                "data_wait": 0.5 if s == steps else 0.01,
                "peak_mem": [1000 * s + r for r in range(ranks)],
                "time": time.time(),
            },
        )
        for s in range(1, steps + 1)
    ]
    metrics.write_metric_points(job_id, points)


def test_jobs_table_and_detail_of_the_job_in_the_url(lab):
    first = lab.job("completed")
    running = lab.job("running")
    _metrics(running, 50)
    logs = Path(store.get_job(running).out_dir) / "logs"
    logs.mkdir(parents=True)
    (logs / "stdout.log").write_text("step 50/200 | 50,000 tok/s | loss 0.02\n")
    at = AppTest.from_file(APP, default_timeout=30)
    at.query_params["job"] = str(running)
    at.switch_page("views/jobs.py").run()
    no_exception(at)
    table = at.dataframe[0].value
    assert table["ID"].tolist() == [running, first]
    assert table["Status"].tolist() == ["running", "completed"]
    assert at.selectbox(key="jobs_pick").value == running
    page = texts(at)
    assert "running-job" in page and "step 50/200" in page
    assert any(m.label == "Step" and m.value == "50 / 200" for m in at.metric)
    wait = next(m for m in at.metric if m.label == "Data wait")
    assert wait.value == "50%" and "reading" in wait.proto.help  # the latest interval waited half the time
    assert len(at.get("vega_lite_chart")) == 1
    peaks = at.dataframe[1].value
    assert peaks["rank"].tolist() == [0, 1] and peaks["peak"].tolist() == [
        fmt.format_bytes(50_000),
        fmt.format_bytes(50_001),
    ]
    assert json.loads(store.get_job(running).config_json)["d_sae"] == 64
    assert at.json[0].value  # the config is shown


def test_cancel_a_running_job(lab):
    job_id = lab.job("running")
    at = lab.page("views/jobs.py")
    at.button(key="job_cancel").click().run()
    no_exception(at)
    assert store.get_job(job_id).cancel_requested


def test_cancel_a_queued_job_ends_it(lab):
    job_id = lab.job("queued")
    at = lab.page("views/jobs.py")
    at.button(key="job_cancel").click().run()
    no_exception(at)
    assert store.get_job(job_id).status == "cancelled"
    assert not [b for b in at.button if b.key == "job_cancel"]


def test_failed_job_shows_its_error_and_resume_explains_without_checkpoint(lab):
    job_id = lab.job("running")
    store.finish_job(job_id, "failed", exit_code=1, error="rank 1: CUDA out of memory")
    at = lab.page("views/jobs.py")
    assert "rank 1: CUDA out of memory" in texts(at)
    at.button(key="job_resume").click().run()
    no_exception(at)
    assert "checkpoint" in texts(at)  # no checkpoint yet: a message, not a crash
    assert len(store.list_jobs()) == 1


def test_resume_a_cancelled_job_with_a_checkpoint_selects_the_new_job(lab):
    import torch

    from sae_core.engine import checkpoint

    job_id = lab.job("running")
    store.finish_job(job_id, "cancelled", exit_code=-15, error="cancelled by ana")
    checkpoint.save_checkpoint(store.get_job(job_id).out_dir, 100, {"w": torch.zeros(2)}, {"step": 100}, keep=1)
    at = lab.page("views/jobs.py", user_name="bo")
    at.button(key="job_resume").click().run()
    no_exception(at)
    new = store.list_jobs()[0]
    assert new.id != job_id and new.resumed_from == job_id and new.status == "queued" and new.submitted_by == "bo"
    assert at.selectbox(key="jobs_pick").value == new.id
    assert at.query_params["job"] == [str(new.id)] or at.query_params["job"] == str(new.id)


def _fake_sae(directory: Path, d_sae: int = 64) -> Path:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 16, "d_sae": d_sae, "k": 4}))
    save_file({"W_enc": np.zeros((16, d_sae), np.float32)}, str(directory / "sae_weights.safetensors"))
    freq = np.full(d_sae, -2.0, np.float32)
    freq[:5] = -10.0
    save_file({"sparsity": freq}, str(directory / "sparsity.safetensors"))
    (directory / "eval.json").write_text(json.dumps({"fvu": 0.0812, "l0": 4.0, "mmcs": 0.97}))
    return directory


def test_completed_job_downloads_prepare_zip_then_offer_it(lab):
    job_id = lab.job("completed")
    out = _fake_sae(Path(store.get_job(job_id).out_dir))
    at = lab.page("views/jobs.py")
    no_exception(at)
    assert [b.key for b in at.get("download_button")] == ["job_download_csv"]
    at.button(key="job_prepare_zip").click().run()
    no_exception(at)
    assert (out / files.SAE_ZIP_FILE).is_file()
    assert sorted(b.key for b in at.get("download_button")) == ["job_download_csv", "job_download_zip"]


# --------------------------------------------------------------------------- SAEs


def test_saes_page_empty(lab):
    at = lab.page("views/saes.py")
    no_exception(at)
    assert "No trained SAE" in texts(at)


def test_saes_page_figures_histogram_snippets_download(lab):
    assert lab.engine  # the lab's database first: job folders without it would be a lost history
    sae = _fake_sae(lab.home / "jobs" / "3")
    at = lab.page("views/saes.py")
    no_exception(at)
    page = texts(at)
    assert "5 of 64 latents never fired" in page
    assert any(m.label == "FVU" and m.value == "0.0812" for m in at.metric)
    assert any(m.label == "MMCS (feature recovery)" for m in at.metric)
    assert f"load({str(sae)!r})" in page and "SAE.load_from_disk(" in page
    assert len(at.get("vega_lite_chart")) == 1
    at.button(key="saes_prepare").click().run()
    no_exception(at)
    assert (sae / files.SAE_ZIP_FILE).is_file()
    assert [b.key for b in at.get("download_button")] == ["saes_download"]


# --------------------------------------------------------------------------- train


def _train(lab: Lab) -> AppTest:
    lab.toy_dataset()
    return lab.page("views/train.py", user_name="ana")


def _submit_errors(at: AppTest) -> list[str]:
    return [rendered(str(e.value)) for e in at.error]


def _hints(at: AppTest) -> str:
    return "\n".join(rendered(str(e.value)) for e in at.info)


def test_cpu_only_machine_submits_a_queued_cpu_job(lab):
    lab.sample(fake.no_driver())
    at = _train(lab)
    no_exception(at)
    assert "No NVIDIA GPU (" in texts(at) and not [c for c in at.checkbox if c.key.startswith("train_gpu_pick_")]
    at.number_input(key="train_cpu_procs").set_value(2)
    at.number_input(key="train_d_sae").set_value(128)
    at.text_input(key="train_name").input("first-sae").run()
    assert _submit_errors(at) == []
    assert "2 process(es) × 2,048 tokens each per step" in texts(at)
    at.button(key="train_submit").click().run()
    no_exception(at)
    (job,) = store.list_jobs()
    assert (job.status, job.gpu_ids, job.cpu_procs, job.name, job.submitted_by) == ("queued", "", 2, "first-sae", "ana")
    cfg = json.loads(job.config_json)
    assert cfg["d_sae"] == 128 and cfg["device"] == "cpu" and cfg["activation_source"].endswith("toy.safetensors")
    assert f"Job {job.id} queued." in texts(at)
    (link,) = at.get("page_link")
    assert "jobs" in link.proto.page
    assert f"job={job.id}" in link.proto.query_string


def test_one_gpu_estimate_and_submit(lab):
    lab.sample(n_gpus=1)
    at = _train(lab)
    no_exception(at)
    assert any(m.label == "Estimated memory per GPU" for m in at.metric)
    assert "1 rank(s) × 4,096 tokens per rank per step" in texts(at)
    assert not at.dataframe[0].value.empty  # the breakdown
    assert _submit_errors(at) == [] and "GPUs: tick at least one free GPU" in _hints(at)  # a hint, not red
    at.checkbox(key="train_gpu_pick_0").check().run()
    assert _submit_errors(at) == [] and "GPUs:" not in _hints(at)
    at.button(key="train_submit").click().run()
    (job,) = store.list_jobs()
    assert job.gpu_ids == "0" and job.cpu_procs is None and job.status == "queued"


def test_eight_gpus_busy_and_low_memory_badges_and_recommend(lab):
    holder = lab.job("running", gpus="2")
    me = os.getpid()
    lab.sample(
        n_gpus=8,
        overrides={
            3: {"memory_used": 30 * GiB, "processes": [fake.process(me, 30 * GiB)]},
            5: {"memory_used": 80 * GiB - 200 * fake.MiB},
        },
    )
    at = _train(lab)
    no_exception(at)
    boxes = {c.key: c for c in at.checkbox if c.key.startswith("train_gpu_pick_")}
    assert sorted(boxes) == [f"train_gpu_pick_{i}" for i in range(8)]
    # GPU 2 is held by an SAE Lab job: it may be ticked, and a job placed there queues behind it
    assert {k for k, c in boxes.items() if c.disabled} == {"train_gpu_pick_3", "train_gpu_pick_5"}
    badges = [m.value for m in at.markdown if "-badge[" in m.value]
    assert any("Queued behind" in b and f"job {holder}" in b for b in badges), badges
    assert any("Busy" in b and f"pid {me}" in b for b in badges), badges
    assert any("Low memory" in b for b in badges), badges
    at.number_input(key="train_gpu_count").set_value(3).run()
    at.button(key="train_recommend").click().run()
    no_exception(at)
    ticked = sorted(
        int(c.key.rsplit("_", 1)[1]) for c in at.checkbox if c.key.startswith("train_gpu_pick_") and c.value
    )
    assert len(ticked) == 3 and not {2, 3, 5} & set(ticked)
    # 4096 tokens do not split across 3 GPUs: said beside the form, not a crash
    assert any("does not divide evenly across 3" in e for e in _submit_errors(at))


@pytest.mark.parametrize("arch", ARCHITECTURE_NAMES)
def test_the_form_shows_each_architectures_own_options_with_their_bounds(lab, arch):
    lab.sample(fake.no_driver())
    at = _train(lab)
    _set(at, "selectbox", "train_arch", arch)
    at.run()
    no_exception(at)
    keys = {w.key for kind in ("number_input", "text_input", "selectbox", "checkbox") for w in getattr(at, kind)}
    for option in option_fields(arch):
        assert f"train_{option.name}" in keys, option.name
    for other in set(all_option_keys()) - {o.name for o in option_fields(arch)}:
        assert f"train_{other}" not in keys, other  # another architecture's option is not shown
    for number in at.number_input:
        option = next((o for o in option_fields(arch) if f"train_{o.name}" == number.key), None)
        if option is not None and option.minimum is not None:
            assert number.min == option.minimum, option.name
    assert _submit_errors(at) == []  # its defaults are a valid run


def _set(at: AppTest, kind: str, key: str, value) -> None:
    widget = getattr(at, kind)(key=key)
    if kind == "text_input":
        widget.input(value)
    elif kind == "checkbox":
        widget.check() if value else widget.uncheck()
    else:
        widget.set_value(value)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ([("number_input", "train_d_sae", 0)], "d_sae:"),
        ([("text_input", "train_aux_k", "many")], "aux_k: 'many' is not a whole number"),
        ([("number_input", "train_k", 5000)], "k (5000) must be at most d_sae (4096)"),
        ([("number_input", "train_batch", 0)], "batch_size:"),
        ([("number_input", "train_batch", 4095)], "batch_size 4095 does not divide evenly across 2"),
        ([("number_input", "train_batch", 16384)], "fewer than one global batch"),
        ([("number_input", "train_steps", 0)], "total_steps:"),
        ([("text_input", "train_lr", "fast")], "lr: 'fast' is not a number"),
        ([("text_input", "train_lr", "2")], "lr:"),
        ([("text_input", "train_warmup", "5000")], "lr_warmup_steps (5000) must be at most total_steps (1000)"),
        ([("text_input", "train_decay", "ten")], "lr_decay_steps: 'ten' is not a whole number"),
        ([("number_input", "train_ckpt", 0)], "checkpoint_every:"),
        ([("selectbox", "train_arch", "standard"), ("text_input", "train_target_l0", "4096")], "target_l0 (4096)"),
        (
            [("selectbox", "train_arch", "matryoshka_batchtopk"), ("text_input", "train_matryoshka_widths", "64, 32")],
            "matryoshka_widths: must be positive and strictly increasing",
        ),
        ([("checkbox", "train_autocast", True)], "autocast"),
        ([("radio", "train_size_mode", "expansion"), ("number_input", "train_expansion", 0.0)], "expansion factor:"),
        ([("selectbox", "train_dataset", "Other path…"), ("text_input", "train_dataset_path", "/no/such")], "dataset:"),
    ],
)
def test_each_invalid_value_is_named_beside_the_form(lab, changes, expected):
    lab.sample(fake.no_driver())
    at = _train(lab)
    assert _submit_errors(at) == []
    for kind, key, value in changes:
        _set(at, kind, key, value)
        at.run()
    no_exception(at)
    errors = _submit_errors(at)
    assert any(expected in e for e in errors), errors
    assert at.button(key="train_submit").disabled
    assert store.list_jobs() == []


def test_gpu_selection_validation_from_availability(lab):
    lab.sample(n_gpus=4)
    at = _train(lab)
    at.number_input(key="train_batch").set_value(4098)
    for i in range(4):
        at.checkbox(key=f"train_gpu_pick_{i}").check()
    at.run()
    no_exception(at)
    assert any("does not divide evenly across 4 GPUs" in e for e in _submit_errors(at))
    assert at.button(key="train_submit").disabled


def test_your_name_is_remembered_across_pages(lab):
    lab.sample(fake.no_driver())
    lab.toy_dataset()
    at = lab.page("views/train.py")
    at.text_input(key="train_user").input("bo").run()
    at.switch_page("views/monitor.py").run()
    at.switch_page("views/train.py").run()
    assert at.text_input(key="train_user").value == "bo"


def test_lost_gpu_is_shown_and_cannot_be_ticked(lab):
    lab.sample(n_gpus=2, overrides={1: {"lost": "GpuIsLost"}})
    at = _train(lab)
    no_exception(at)
    assert at.checkbox(key="train_gpu_pick_1").disabled and not at.checkbox(key="train_gpu_pick_0").disabled
    at = lab.page("views/monitor.py")
    no_exception(at)
    assert any("GPU 1" in str(e.value) or "lost" in str(e.value).lower() for e in at.error), [e.value for e in at.error]


def test_train_shows_the_predicted_multi_gpu_speedup(lab):
    lab.sample(n_gpus=4)
    at = _train(lab)
    at.checkbox(key="train_gpu_pick_0").check().run()
    at.checkbox(key="train_gpu_pick_1").check().run()
    no_exception(at)
    captions = [rendered(c.value) for c in at.caption]
    assert any(c.startswith("Predicted speed-up: 2 GPUs: ≈") and "4 GPUs: ≈" in c for c in captions), captions


# --------------------------------------------------------------------------- hardening (issue 11)

INJECTED = "x\n### heading\n![tracker](http://attacker.example/t.png) [link](http://attacker.example) www.x.example"
# Images, links and headings of markdown's own.
UNESCAPED_MARKUP = re.compile(r"(?<!\\)!\[|(?<!\\)\[[^\]]*(?<!\\)\]\(|^\s{0,3}#{1,6}\s(?!.*-badge)", re.MULTILINE)
# GFM's links without brackets, found in the text after its escapes are undone (http://, www., name@host).
AUTOLINK = re.compile(r"https?://|www\.|\w@\w", re.IGNORECASE)


def markup_from_users(at: AppTest) -> list[str]:
    """Markdown sources that would render an image, a link or a heading of their own."""
    sources = [str(e.value) for kind in ("markdown", "caption", "info", "warning", "error", "success")
               for e in getattr(at, kind)]  # fmt: skip
    sources += [str(part) for m in at.metric for part in (m.label, m.value)]
    return [
        s
        for s in sources
        if UNESCAPED_MARKUP.search(s.removeprefix("### ")) or AUTOLINK.search(re.sub(r"\\(.)", r"\1", s))
    ]


def test_names_and_errors_of_other_people_render_as_text(lab):
    job_id = lab.job("running", gpus="0", name=None)
    with db.write_session(lab.engine) as session:  # a row from before names were checked, or written by hand
        job = session.get(Job, job_id)
        job.name, job.error, job.submitted_by = INJECTED, INJECTED, INJECTED.replace("\n", " ")
        session.add(job)
    lab.sample(n_gpus=2)
    for page in ("views/jobs.py", "views/monitor.py", "views/train.py"):
        at = lab.page(page, user_name="ana")
        no_exception(at)
        assert markup_from_users(at) == [], page
    at = lab.page("views/jobs.py")
    assert "### heading" in texts(at) and "![tracker]" in texts(at)  # shown, as text
    (submitter,) = [m for m in at.metric if m.label == "Submitted by"]
    assert rendered(submitter.value) == INJECTED.replace("\n", " ")


def test_a_job_id_beyond_any_row_in_the_url_is_no_crash(lab):
    lab.job("completed")
    at = AppTest.from_file(APP, default_timeout=30)
    at.query_params["job"] = "99999999999999999999999"
    at.switch_page("views/jobs.py").run()
    no_exception(at)


@pytest.mark.parametrize("typed", ["/proc/1/cwd", "/" + "a" * 5000, "/etc", ""])
def test_other_path_answers_the_same_outside_the_data_roots(lab, typed):
    lab.sample(fake.no_driver())
    at = _train(lab)
    at.selectbox(key="train_dataset").set_value("Other path…").run()
    at.text_input(key="train_dataset_path").input(typed or " ").run()
    no_exception(at)
    errors = _submit_errors(at)
    if typed:
        assert [e for e in errors if e.startswith("dataset:")] == [f"dataset: {catalog.OUTSIDE_ROOTS}"]
        assert at.button(key="train_submit").disabled
    else:  # nothing typed yet: a hint until Submit is pressed
        assert errors == [] and "dataset: choose a dataset" in _hints(at)


def test_a_job_folder_outside_the_home_is_not_served(lab, tmp_path):
    outside = tmp_path / "elsewhere"
    _fake_sae(outside)
    (outside / "logs").mkdir()
    (outside / "logs" / "stdout.log").write_text("a secret line\n")
    job_id = lab.job("completed")
    with db.write_session(lab.engine) as session:  # a crafted row
        job = session.get(Job, job_id)
        job.out_dir = str(outside)
        session.add(job)
    at = lab.page("views/jobs.py")
    no_exception(at)
    assert "not inside SAE_LAB_HOME" in texts(at) and "a secret line" not in texts(at)
    assert [b.key for b in at.button if b.key == "job_prepare_zip"] == []
    assert not (outside / files.SAE_ZIP_FILE).exists()


def test_guessing_the_password_backs_off(lab, monkeypatch):
    throttle = access.GuessThrottle(clock=lambda: 5000.0)  # time stands still: the wait never passes
    monkeypatch.setattr(access, "THROTTLE", throttle)
    monkeypatch.setenv("SAE_LAB_PASSWORD", "s3cret")
    at = AppTest.from_file(APP, default_timeout=30).run()
    for _ in range(5):
        at.text_input(key="login_password").input("guess")
        at.button[0].click().run()
        assert "Wrong password." in texts(at)
    at.text_input(key="login_password").input("s3cret")  # even the right one waits now
    at.button[0].click().run()
    no_exception(at)
    assert "Too many wrong passwords: try again in 1 s." in texts(at) and "Datasets" not in texts(at)
