"""The page helpers, without Streamlit: formatting, the form → TrainConfig path, GPU rows, job rows,
chart frames, log tails, SAE discovery and the on-disk zip."""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from sae_core import access, files, outputs
from sae_core import text as fmt
from sae_core.architectures import ARCHITECTURE_NAMES, ARCHITECTURES
from sae_core.data import catalog
from sae_core.jobs import logs
from sae_core.ui import charts, downloads, forms, frames, html, labels

# --------------------------------------------------------------------------- formatting


def test_format_bytes_picks_binary_units():
    assert fmt.format_bytes(None) == "—"
    assert fmt.format_bytes(512) == "512 B"
    assert fmt.format_bytes(1536) == "1.5 KiB"
    assert fmt.format_bytes(80 * 1024**3) == "80.0 GiB"
    assert fmt.format_bytes(3 * 1024**5) == "3.0 PiB"


def test_format_duration_and_rate():
    assert fmt.format_duration(65) == "0:01:05"
    assert fmt.format_duration(2 * 86400 + 3 * 3600 + 4 * 60 + 5) == "2 d 03:04:05"
    assert fmt.format_duration(None) == "—"
    assert fmt.format_duration(float("inf")) == "—"
    assert fmt.format_rate(45000.4) == "45,000 tok/s"
    assert fmt.format_rate(None) == "—"


@pytest.mark.parametrize(
    ("used", "colour"),
    [(0, "green"), (70, "green"), (70.5, "yellow"), (90, "yellow"), (90.5, "red"), (100, "red")],
)
def test_memory_colour_thresholds(used, colour):
    # >90 % red, >70 % yellow, else green (the GPU-selector design).
    assert html.memory_colour(used, 100) == colour


def test_memory_colour_unknown_total_is_grey_and_bar_clamps():
    assert html.memory_colour(5, 0) == "grey"
    bar = html.memory_bar_html(150, 100)
    assert 'data-colour="red"' in bar and "width:100.0%" in bar
    assert "Memory 150 B / 100 B" in bar


def test_badge_cannot_be_broken_by_brackets():
    assert html.badge("job [x]", "orange") == ":orange-badge[job (x)]"


WJ = html.WORD_JOINER


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("![t](http://h/p.png)", f"\\!\\[t\\](http:{WJ}//h/p.png)"),
        ("see http://h/phish", f"see http:{WJ}//h/phish"),  # a GFM autolink needs no brackets
        ("www.phish.example", f"www{WJ}.phish.example"),
        ("ana@phish.example", f"ana{WJ}@phish.example"),
        (":red[alarm] :smile:", f":{WJ}red\\[alarm\\] :{WJ}smile:{WJ}"),
        ("# heading", "\\# heading"),
        ("1. item", "1\\. item"),
        ("0.0812", "0.0812"),  # numbers stay as they are
        ("-0.5", "-0.5"),
        ("- item", "\\- item"),
    ],
)
def test_md_text_leaves_no_markup(text, escaped):
    assert html.md_text(text) == escaped


def test_md_escapes_the_values_not_the_template():
    assert html.md("**GPU {}** · {:,} B · {name}", 3, 12345, name="[x](http://h)") == (
        f"**GPU 3** · 12,345 B · \\[x\\](http:{WJ}//h)"
    )


# --------------------------------------------------------------------------- password gate


def test_configured_password_prefers_env_then_secrets():
    assert access.configured_password({"SAE_LAB_PASSWORD": "env"}, lambda k: "secret") == "env"
    assert access.configured_password({}, lambda k: "secret") == "secret"
    assert access.configured_password({"SAE_LAB_PASSWORD": ""}, lambda k: None) is None
    assert access.configured_password({}, None) is None


def test_configured_password_without_secrets_file_is_no_gate():
    def missing(_key):
        raise FileNotFoundError("no secrets.toml")

    assert access.configured_password({}, missing) is None


def test_password_matches_exactly():
    assert access.password_matches("hunter2", "hunter2")
    assert not access.password_matches("hunter", "hunter2")
    assert not access.password_matches("", "hunter2")
    assert access.password_matches("pässwörd", "pässwörd")


# --------------------------------------------------------------------------- datasets


def test_list_datasets_files_and_shard_dirs(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "b.npy").write_bytes(b"x")
    (tmp_path / "c.safetensors.partial").write_bytes(b"x")  # being written: not offered
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "0.npy").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    assert [p.name for p in catalog.list_datasets(tmp_path)] == ["a.safetensors", "b.npy", "shards"]
    assert catalog.list_datasets(tmp_path / "missing") == []


# --------------------------------------------------------------------------- form → config


def _form(options=None, **kw) -> forms.FormValues:
    base = {"activation_source": "/data/x.safetensors", "d_sae": 256, "batch_size": 512, "total_steps": 100}
    base.update(kw)
    return forms.FormValues(**base, options={"k": 16} if options is None else options)


def test_valid_topk_form_gives_config_with_k():
    cfg, errors = forms.form_to_config(_form(lr="3e-4", lr_warmup_steps="5", autocast=True))
    assert errors == []
    assert (cfg.architecture, cfg.d_sae, cfg.k, cfg.lr, cfg.lr_warmup_steps, cfg.autocast) == (
        "topk",
        256,
        16,
        3e-4,
        5,
        "bf16",
    )


def test_standard_form_sends_its_own_options():
    cfg, errors = forms.form_to_config(_form(architecture="standard", options={"l1_coefficient": 2.5}))
    assert errors == [] and cfg.l1_coefficient == 2.5 and not hasattr(cfg, "k")


def test_expansion_factor_uses_dataset_width():
    cfg, errors = forms.form_to_config(_form(size_mode="expansion", expansion_factor=4, d_in=64, d_sae=None))
    assert errors == [] and cfg.d_sae == 256
    cfg, errors = forms.form_to_config(_form(size_mode="expansion", expansion_factor=4, d_in=None, d_sae=None))
    assert cfg is None and errors[0].startswith("expansion factor:")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"d_sae": 0}, "d_sae"),
        ({"options": {"k": 0}}, "k"),
        ({"options": {"k": 1000}}, "k (1000) must be at most d_sae"),
        ({"batch_size": -1}, "batch_size"),
        ({"total_steps": 0}, "total_steps"),
        ({"lr": "fast"}, "lr"),
        ({"lr": "2"}, "lr"),
        ({"lr_warmup_steps": "500"}, "lr_warmup_steps"),
        ({"lr_decay_steps": "x"}, "lr_decay_steps"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"activation_source": "  "}, "dataset"),
        ({"architecture": "standard", "options": {"l1_coefficient": -1.0}}, "l1_coefficient"),
        ({"autocast": True, "device": "cpu"}, "autocast"),
    ],
)
def test_invalid_form_values_name_the_field(change, field):
    cfg, errors = forms.form_to_config(_form(**change))
    assert cfg is None
    assert any(field in e for e in errors), errors


@pytest.mark.parametrize("arch", ARCHITECTURE_NAMES)
def test_every_option_of_every_architecture_is_a_widget_with_its_label_bounds_and_default(arch):
    fields = forms.option_fields(arch)
    model = ARCHITECTURES[arch].options
    assert [f.name for f in fields] == list(model.model_fields)
    for option in fields:
        info = model.model_fields[option.name]
        assert option.help == info.description and option.label != option.name and option.default == info.default
        assert option.kind in ("int", "float", "choice", "bool", "ints")
    # the defaults the widgets show make a valid config
    values = {f.name: f.default for f in fields if f.default is not None}
    cfg, errors = forms.form_to_config(_form(architecture=arch, options=values, d_sae=4096))
    assert errors == [] and cfg.architecture == arch


def test_option_bounds_and_typed_text_become_widget_limits_and_values():
    k = next(f for f in forms.option_fields("topk") if f.name == "k")
    assert (k.kind, k.minimum, k.maximum, k.optional, k.advanced) == ("int", 1, 2**16, False, False)
    widths = next(f for f in forms.option_fields("matryoshka_batchtopk") if f.name == "matryoshka_widths")
    assert forms.parse_option_text(widths, "128, 512 4096") == ([128, 512, 4096], None)
    assert forms.parse_option_text(widths, " ") == (None, None)  # blank: the documented default
    value, problem = forms.parse_option_text(widths, "128, lots")
    assert value is None and problem.startswith("matryoshka_widths: '128, lots' is not whole numbers")
    target = next(f for f in forms.option_fields("jumprelu") if f.name == "target_l0")
    assert target.optional and forms.parse_option_text(target, "32") == (32.0, None)
    mode = next(f for f in forms.option_fields("jumprelu") if f.name == "jumprelu_sparsity_loss_mode")
    assert mode.kind == "choice" and mode.choices == ("step", "tanh", "quadratic")


def test_gpu_choice_busy_low_and_free():
    gib = 1024**3
    free = forms.gpu_choice(0, "H100", 1 * gib, 80 * gib, 79 * gib, 0, None, 10 * gib)
    busy = forms.gpu_choice(1, "H100", 1 * gib, 80 * gib, 79 * gib, 0, "job 3 (alice)", 10 * gib)
    low = forms.gpu_choice(2, "H100", 75 * gib, 80 * gib, 5 * gib, 0, None, 10 * gib)
    unknown_need = forms.gpu_choice(3, "H100", 75 * gib, 80 * gib, 5 * gib, 0, None, None)
    assert free.selectable and not free.low_memory
    assert not busy.selectable and busy.busy_reason == "job 3 (alice)"
    assert low.low_memory and not low.selectable
    assert unknown_need.selectable


# --------------------------------------------------------------------------- jobs table


def _job(**kw):
    base = {
        "id": 1,
        "name": "j",
        "status": "running",
        "last_step": 50,
        "total_steps": 200,
        "started_at": 1000.0,
        "created_at": 900.0,
        "gpu_ids": "0,1",
        "cpu_procs": None,
        "tokens_per_s": 12345.0,
        "submitted_by": "ana",
    }
    base.update(kw)
    return SimpleNamespace(**base)


def test_eta_from_average_pace():
    # 50 steps in 100 s → 150 remaining steps take 300 s.
    assert frames.job_eta_seconds("running", 1000.0, 50, 200, now=1100.0) == pytest.approx(300.0)
    assert frames.job_eta_seconds("queued", None, 0, 200, now=1100.0) is None
    assert frames.job_eta_seconds("running", 1000.0, 0, 200, now=1100.0) is None
    assert frames.job_eta_seconds("completed", 1000.0, 200, 200, now=1100.0) is None


def test_jobs_table_rows():
    table = frames.jobs_table([_job(), _job(id=2, status="queued", gpu_ids="", cpu_procs=2, last_step=0)], now=1100.0)
    assert list(table.columns) == frames.JOB_TABLE_COLUMNS
    first, second = table.to_dict("records")
    assert first["Progress"] == 0.25 and first["ETA"] == "0:05:00" and first["GPUs"] == "GPU 0,1"
    assert first["Tokens/s"] == "12,345 tok/s" and first["Submitted by"] == "ana"
    assert second["GPUs"] == "CPU × 2" and second["ETA"] == "—" and second["Progress"] == 0.0


def test_parse_job_param():
    assert forms.parse_job_param("12") == 12
    assert forms.parse_job_param(None) is None
    assert forms.parse_job_param("abc") is None
    assert forms.parse_job_param("-3") is None


# --------------------------------------------------------------------------- metric frames


def test_metrics_long_drops_missing():
    frame = pd.DataFrame({"step": [10, 20], "loss": [1.0, 0.5], "fvu": [None, 0.2], "lr": [1e-3, 1e-3]})
    long = frames.metrics_long(frame)
    assert set(long["metric"]) == {"loss", "fvu", "lr"} and len(long) == 5
    assert frames.metrics_long(pd.DataFrame()).empty


def test_data_wait_summary_says_which_side_is_the_limit():
    assert frames.data_wait_summary(pd.DataFrame()) is None
    assert frames.data_wait_summary(pd.DataFrame({"step": [1], "data_wait": [None]})) is None
    value, meaning = frames.data_wait_summary(pd.DataFrame({"step": [1, 2], "data_wait": [0.9, 0.03]}))
    assert value == "3%" and "compute is the limit" in meaning
    value, meaning = frames.data_wait_summary(pd.DataFrame({"step": [1, 2], "data_wait": [0.0, 0.35]}))
    assert value == "35%" and "reading" in meaning and "is the limit" in meaning


def test_peak_memory_by_rank_takes_the_max_per_rank():
    frame = pd.DataFrame({"peak_mem": [[100, 200], [150, 180], [None, 250]]})
    peaks = frames.peak_memory_by_rank(frame)
    assert peaks["rank"].tolist() == [0, 1] and peaks["peak_bytes"].tolist() == [150, 250]
    as_json = pd.DataFrame({"peak_mem_json": [json.dumps([1, 2])]})
    assert frames.peak_memory_by_rank(as_json)["peak_bytes"].tolist() == [1, 2]


# --------------------------------------------------------------------------- logs


def test_tail_text_reads_only_the_end(tmp_path):
    log = tmp_path / "stdout.log"
    log.write_text("".join(f"step {i}\n" for i in range(100_000)))
    tail = logs.tail_text(log, max_bytes=100)
    assert tail.endswith("step 99999\n")
    assert tail.splitlines()[0].startswith("step 9999")  # the partial first line was dropped
    assert len(tail) <= 100
    assert logs.tail_text(tmp_path / "missing.log") == ""


# --------------------------------------------------------------------------- SAE files and zip


def _fake_sae(directory: Path, weights: bytes = b"w" * 1000) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "architecture": "topk"}))
    (directory / "sae_weights.safetensors").write_bytes(weights)
    (directory / "sparsity.safetensors").write_bytes(b"s")
    (directory / "eval.json").write_text(json.dumps({"fvu": 0.1}))
    return directory


def test_find_trained_saes_skips_checkpoints_and_sorts_newest_job_first(tmp_path):
    _fake_sae(tmp_path / "jobs" / "2")
    _fake_sae(tmp_path / "jobs" / "10")
    _fake_sae(tmp_path / "jobs" / "10" / "checkpoints" / "step_100")
    _fake_sae(tmp_path / "imported" / "gemma-l12")
    (tmp_path / "jobs" / "3").mkdir()
    (tmp_path / "jobs" / "3" / "cfg.json").write_text("{}")  # no weights: not an SAE
    found = [p.relative_to(tmp_path).as_posix() for p in outputs.find_trained_saes(tmp_path)]
    assert found == ["jobs/10", "jobs/2", "imported/gemma-l12"]


def test_build_sae_zip_is_stored_complete_and_tracks_freshness(tmp_path):
    sae = _fake_sae(tmp_path / "sae", weights=os.urandom(50_000))
    zip_path = sae / files.SAE_ZIP_FILE
    assert not outputs.zip_is_current(zip_path, sae)
    outputs.build_sae_zip(sae)
    assert outputs.zip_is_current(zip_path, sae)
    assert not (sae / (files.SAE_ZIP_FILE + ".partial")).exists()
    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == sorted(files.SAE_ZIP_MEMBERS)
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
        assert zf.read("sae_weights.safetensors") == (sae / "sae_weights.safetensors").read_bytes()
    later = time.time() + 5
    os.utime(sae / "sae_weights.safetensors", (later, later))  # retrained: the zip is stale
    assert not outputs.zip_is_current(zip_path, sae)


def test_build_sae_zip_refuses_a_folder_without_an_sae(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained SAE"):
        outputs.build_sae_zip(tmp_path)


def test_file_reader_opens_only_when_called(tmp_path):
    path = tmp_path / "f.bin"
    reader = downloads.file_reader(path)  # the file does not exist yet: nothing is opened here
    path.write_bytes(b"abc")
    with reader() as fh:
        assert fh.read() == b"abc"


def test_firing_histogram_and_dead_count():
    values = np.array([-10.0, -10.0, -3.0, -2.5, -2.0, -1.0])
    assert frames.dead_latents(values) == 2
    hist = frames.firing_histogram(values, bins=4)
    assert hist["latents"].sum() == 4
    assert hist["log10_freq_start"].min() == pytest.approx(-3.0)
    assert frames.firing_histogram(np.full(3, -10.0)).empty


def test_read_log10_frequency(tmp_path):
    from safetensors.numpy import save_file

    save_file({"sparsity": np.array([-1.0, -10.0], dtype=np.float32)}, str(tmp_path / "sparsity.safetensors"))
    assert outputs.read_log10_frequency(tmp_path / "sparsity.safetensors").tolist() == [-1.0, -10.0]
    assert outputs.read_log10_frequency(tmp_path / "missing.safetensors") is None
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert outputs.read_log10_frequency(tmp_path / "junk.safetensors") is None


def test_load_snippets_name_the_folder(tmp_path):
    ours, theirs = labels.load_snippets(tmp_path / "jobs" / "7")
    assert f"load({str(tmp_path / 'jobs' / '7')!r})" in ours and "from sae_core.sae import load" in ours
    assert "SAE.load_from_disk(" in theirs and str(tmp_path / "jobs" / "7") in theirs


def test_eval_figures_formats_known_keys_in_order():
    shown = labels.eval_figures(
        {"l0": 31.96, "fvu": 0.08123, "mmcs": 0.97, "steps": 300, "junk": 1, "dead_fraction": None}
    )
    assert shown == {"FVU": "0.0812", "L0": "32.0", "MMCS (feature recovery)": "0.970", "Steps": "300"}


# --------------------------------------------------------------------------- monitor frames


def _gpu(index, processes=(), **kw):
    base = {
        "index": index,
        "name": "NVIDIA H100",
        "memory_used": 10,
        "memory_total": 100,
        "util_gpu": 50.0,
        "power_w": 100.0,
        "power_limit_w": 700.0,
        "processes": list(processes),
    }
    base.update(kw)
    return SimpleNamespace(**base)


def _proc(pid, job_id=None, user="bob", command="/usr/bin/python3 train.py --x"):
    return SimpleNamespace(pid=pid, gpu_memory=2 * 1024**3, user=user, command=command, job_id=job_id)


def test_gpu_users_and_process_frame():
    gpu = _gpu(0, [_proc(10, job_id=4), _proc(11, job_id=4), _proc(12)])
    assert labels.gpu_users(gpu) == ["job 4", "pid 12 · bob · python3"]
    frame = frames.process_frame(SimpleNamespace(gpus=[gpu, _gpu(1)]))
    assert frame["PID"].tolist() == [10, 11, 12] and frame["Job"].tolist() == ["4", "4", ""]
    assert frame["GPU memory"].iloc[0] == "2.0 GiB"


def test_aggregate_now_means_util_and_sums_memory_and_power():
    totals = frames.aggregate_now([_gpu(0, util_gpu=20.0), _gpu(1, util_gpu=60.0, memory_used=30)])
    assert totals["util_gpu"] == 40.0 and totals["memory_used"] == 40 and totals["memory_total"] == 200
    assert totals["power_w"] == 200.0 and totals["power_limit_w"] == 1400.0


def test_gpu_history_long_memory_in_percent():
    t = pd.to_datetime([0, 1], unit="s", utc=True)
    series = pd.DataFrame({"t": t, "gpu": [0, 0], "util_gpu": [10.0, None], "mem_used": [20, 40], "mem_total": [80, 0]})
    long = frames.gpu_history_long(series)
    memory = long[long["metric"] == "mem %"]["value"].tolist()
    assert memory == [25.0]  # a zero total gives no point rather than inf
    assert long[long["metric"] == "util %"]["value"].tolist() == [10.0]


def test_gpu_summary_lines():
    assert "No GPU sample yet" in labels.gpu_summary(None)
    none = SimpleNamespace(gpus=[], reason="NVML library not found", t=100.0)
    assert labels.gpu_summary(none, now=101.0).startswith("No NVIDIA GPU found: NVML library not found")
    eight = SimpleNamespace(gpus=[_gpu(i) for i in range(8)], reason=None, t=100.0)
    assert labels.gpu_summary(eight, now=101.0) == "8 × NVIDIA H100"
    assert "is the launcher running?" in labels.gpu_summary(eight, now=1000.0)


def test_chart_specs_are_fresh_copies():
    spec = charts.gpu_history_spec()
    spec["mark"] = "mutated"
    assert charts.gpu_history_spec()["mark"] != "mutated"
    assert "facet" in charts.metrics_spec()
    assert charts.firing_histogram_spec()["mark"]["type"] == "bar"


def test_the_train_page_suggests_keeping_a_stream_beside_the_datasets(tmp_path):
    from sae_core.ui.forms import suggested_cache_to

    assert suggested_cache_to(tmp_path, "EleutherAI/pythia-70m") == str(tmp_path / "pythia-70m-stream")
    assert suggested_cache_to(tmp_path, "/models/gpt2/") == str(tmp_path / "gpt2-stream")
    assert suggested_cache_to(tmp_path, "") == str(tmp_path / "model-stream")
