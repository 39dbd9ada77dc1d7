"""The CLI with sweeps: `submit` queues one and prints its members and placement, `jobs` lists members under
their sweep (as their folders show them), `estimate` gives both layouts' figures. Real lab.db, fake NVML."""

from __future__ import annotations

import json

from sae_core.cli import estimate as cli_estimate
from sae_core.cli import jobs as cli_jobs
from sae_core.engine.run import main as train_main
from sae_core.files import REFUSED_FILE, SWEEP_FILE
from sae_core.gpu import memory
from sae_core.jobs import scheduler, store
from sae_core.jobs.placement import Submission
from sae_core.sweep import read_training_config
from tests.cli.test_cli_jobs import submit
from tests.fakes import fixtures

fake_gpus = fixtures.fake_gpus  # the fake-NVML fixture, registered in this module
GiB = memory.GiB


def write_sweep(tmp_path, toy_path, **overrides):
    cfg = {"activation_source": str(toy_path), "k": 4, "batch_size": 256, "total_steps": 20, "holdout_tokens": 1024,
           "sweep": {"d_sae": [64, 128], "k": [4, 8]}, **overrides}  # fmt: skip
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(cfg))
    return path


NAMES = ["d_sae=64,k=4", "d_sae=64,k=8", "d_sae=128,k=4", "d_sae=128,k=8"]


def test_submit_a_sweep_prints_its_members_and_placement(lab_home, tmp_path, toy_path, capsys):
    code, out, err = submit(capsys, "--config", str(write_sweep(tmp_path, toy_path)), "--cpu-procs", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("queued sweep job 1 (job-1) on CPU x1, placement batch: 4 member(s); output in ")
    assert lines[1:] == [f"  {name}" for name in NAMES]
    assert "note: sweep placement: batch (4 members on each of 1 process" in err
    assert store.get_job(1).kind == "sweep"


def test_submit_a_sweep_as_json_on_two_gpus(lab_home, tmp_path, toy_path, capsys, fake_gpus):
    fake_gpus.set(n_gpus=2)
    code, out, err = submit(capsys, "--config", str(write_sweep(tmp_path, toy_path)), "--gpus", "0,1", "--json")
    assert code == 0, err
    queued = json.loads(out)
    assert queued["placement"] == "batch" and queued["kind"] == "sweep" and queued["config"]["placement"] == "batch"
    assert [m["name"] for m in queued["members"]] == NAMES
    assert queued["members"][1]["overrides"] == {"d_sae": 64, "k": 8}
    assert queued["members"][0]["folder"] == f"{queued['out_dir']}/{NAMES[0]}"


def test_a_sweep_the_gate_refuses_is_rejected_naming_both_layouts(lab_home, tmp_path, toy_path, capsys, fake_gpus):
    fake_gpus.set(n_gpus=2, memory_used=80 * GiB - GiB // 2)  # half a GiB free: not even a CUDA context fits
    code, out, err = submit(capsys, "--config", str(write_sweep(tmp_path, toy_path)), "--gpus", "0,1")
    assert code == 2 and out == ""
    assert "rejected: gpus: the sweep does not fit: placement batch needs about" in err
    assert "placement members needs about" in err and store.list_jobs() == []


def test_a_bad_sweep_is_rejected_naming_the_field(lab_home, tmp_path, toy_path, capsys):
    path = write_sweep(tmp_path, toy_path, sweep={"batch_size": [256, 512]})
    code, _, err = submit(capsys, "--config", str(path), "--cpu-procs", "1")
    assert code == 2 and "sweep.batch_size: batch_size fixes the batch every member reads" in err


def train_member(tmp_path, toy_path, run_dir, member) -> None:
    """A member's folder as a single training with its config writes it."""
    cfg_path = tmp_path / f"{member.name}.json"
    cfg_path.write_text(member.config.to_json())
    assert train_main(["--config", str(cfg_path), "--out", str(member.folder(run_dir))]) == 0


def test_jobs_lists_a_sweeps_members_under_it(lab_home, tmp_path, toy_path, capsys):
    sweep = read_training_config(write_sweep(tmp_path, toy_path))
    job = store.submit_job(sweep.with_placement("batch"), Submission(None, 1, name="grid"))
    store.submit_job(sweep.shared, Submission(None, 1, name="single"))
    scheduler.claim_runnable(cpu_budget=2)
    store.mark_running(job.id, 1, 0.0)
    run_dir = lab_home / "jobs" / str(job.id)
    run_dir.mkdir(parents=True)
    plan = {
        "placement": "batch",
        "world_size": 1,
        "members": [{"name": m.name, "overrides": m.overrides} for m in sweep.members],
    }
    (run_dir / SWEEP_FILE).write_text(json.dumps(plan))
    train_member(tmp_path, toy_path, run_dir, sweep.members[0])  # completed
    failed = sweep.members[1].folder(run_dir)
    failed.mkdir()
    (failed / REFUSED_FILE).write_text("the loss is not finite at step 10 (nan)\n")
    running = sweep.members[2].folder(run_dir)
    running.mkdir()
    (running / "metrics.jsonl").write_text(json.dumps({"step": 10, "fvu": 0.25, "loss": 1.0}) + "\n")
    capsys.readouterr()  # the training's progress lines

    assert cli_jobs.cli_jobs([]) == 0
    lines = capsys.readouterr().out.splitlines()
    sweep_row = next(i for i, line in enumerate(lines) if line.split()[1] == "grid")
    members = [line.split() for line in lines[sweep_row + 1 : sweep_row + 5]]
    assert [m[0] for m in members] == NAMES and all(
        line.startswith("    ") for line in lines[sweep_row + 1 : sweep_row + 5]
    )
    assert members[0][1:4] == ["completed", "step", "20/20"] and members[0][4] == "fvu"
    assert members[1][1] == "failed" and "the loss is not finite at step 10 (nan)" in lines[sweep_row + 2]
    assert members[2][1:] == ["running", "step", "10/20", "fvu", "0.2500"]
    assert members[3] == [NAMES[3], "running"]
    single_row = next(i for i, line in enumerate(lines) if line.split()[1] == "single")
    assert len(lines) == 7  # the header, two jobs, four members: a single run has no member lines
    assert single_row not in range(sweep_row + 1, sweep_row + 5)

    assert cli_jobs.cli_jobs(["--json"]) == 0
    data = {j["name"]: j for j in json.loads(capsys.readouterr().out)}
    assert "members" not in data["single"]
    listed = data["grid"]["members"]
    assert [(m["name"], m["status"], m["step"]) for m in listed] == [
        (NAMES[0], "completed", 20), (NAMES[1], "failed", None), (NAMES[2], "running", 10), (NAMES[3], "running", None)
    ]  # fmt: skip
    assert listed[0]["fvu"] == json.loads((sweep.members[0].folder(run_dir) / "eval.json").read_text())["fvu"]
    assert listed[1]["error"] == "the loss is not finite at step 10 (nan)"


def test_a_queued_sweeps_members_wait_with_it(lab_home, tmp_path, toy_path, capsys):
    sweep = read_training_config(write_sweep(tmp_path, toy_path))
    store.submit_job(sweep.with_placement("batch"), Submission(None, 1))
    assert cli_jobs.cli_jobs(["--json"]) == 0
    (job,) = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["status"]) for m in job["members"]] == [(name, "queued") for name in NAMES]


def test_estimate_a_sweep_gives_both_layouts_per_gpu(tmp_path, toy_path, capsys):
    path = write_sweep(tmp_path, toy_path)
    sweep = read_training_config(path)
    assert cli_estimate.cli_estimate(["--config", str(path), "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    for layout in ("batch", "members"):
        figure = memory.sweep_estimate(sweep, 2, 32, layout).total_bytes / GiB
        assert f"placement {layout:<8} {figure:8.2f} GiB per GPU" in out
    assert "sweep of 4 member(s) on 2 GPU(s), d_in 32 (placement asked: auto)" in out
    assert "predicted tokens/s over one GPU" in out and "batch ≈" in out and "members ≈" in out
    assert cli_estimate.cli_estimate(["--config", str(path), "--gpus", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layouts"]["members"] == {"error": data["layouts"]["members"]["error"]}
    assert "8 ranks for 4 member(s)" in data["layouts"]["members"]["error"]
    assert data["layouts"]["batch"]["total_bytes"] == memory.sweep_estimate(sweep, 8, 32, "batch").total_bytes
    assert data["speedup"]["members"] is None and data["members"] == NAMES
