"""A sweep as a queued job, with real processes: the launcher runs it with torchrun, its members' metrics reach
lab.db by name, and a cancelled sweep resumes through the queue to the weights of an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_core import files
from sae_core.db.tables import FINAL_STATUSES
from sae_core.jobs import lifecycle, metrics, submission
from sae_core.jobs.placement import Submission
from sae_core.outputs import sweep_members
from sae_core.sweep import sweep_from_dict
from tests.conftest import tiny_config
from tests.jobs import test_launcher_procs
from tests.jobs.test_launcher_procs import job_processes_left, load_weights, wait_for, wait_status

lab = test_launcher_procs.lab  # the launcher tests' fixture: a lab home and its daemons, cleaned up after

pytestmark = pytest.mark.slow


def a_sweep(toy_path: Path, **changes):
    base = tiny_config(toy_path, **changes)
    base.pop("d_sae")
    return sweep_from_dict({**base, "sweep": {"d_sae": [32, 64], "k": [2, 4]}})


def test_a_two_rank_sweep_job_completes_with_every_members_metrics_in_the_store(lab, toy_path):
    home, start_daemon = lab
    start_daemon()
    job, _ = submission.submit(a_sweep(toy_path, total_steps=20).with_placement("members"), Submission(None, 2))
    assert job.kind == "sweep"
    job = wait_status(job.id, FINAL_STATUSES)
    assert job.status == "completed", job.error
    assert (Path(job.out_dir) / files.SWEEP_RESULT_FILE).is_file()
    members = sweep_members(job.out_dir)
    assert [m.status for m in members] == ["completed"] * 4
    frame = metrics.metrics_frame(job.id)
    assert sorted(frame["member"].unique()) == sorted(m.name for m in members)
    assert frame.groupby("member")["step"].max().tolist() == [20] * 4
    assert job_processes_left(job.id, home) == []


def test_a_cancelled_sweep_resumes_through_the_queue_to_the_weights_of_an_uninterrupted_one(lab, toy_path):
    home, start_daemon = lab
    start_daemon()
    sweep = a_sweep(toy_path, total_steps=300, log_every=20, checkpoint_every=20)
    reference, _ = submission.submit(sweep, Submission(None, 1, name="reference"))
    cancelled, _ = submission.submit(sweep, Submission(None, 1, name="to cancel"))
    last = Path(cancelled.out_dir) / sweep.members[-1].name / "checkpoints"
    wait_for(lambda: list(last.glob("step_*/COMPLETE")), 120, "the first checkpoint of the last member", poll=0.01)
    stopped, message = lifecycle.cancel_job(cancelled.id, wait_s=30)
    assert stopped.status == "cancelled", message
    assert not (Path(cancelled.out_dir) / files.SWEEP_RESULT_FILE).exists(), "the sweep finished before the cancel"
    resumed, _ = submission.resume(cancelled.id)
    resumed = wait_status(resumed.id, FINAL_STATUSES, timeout=240)
    reference = wait_status(reference.id, FINAL_STATUSES, timeout=240)
    assert (resumed.status, reference.status) == ("completed", "completed"), (resumed.error, reference.error)
    assert "resume: every member from step" in (Path(resumed.out_dir) / "logs" / "stdout.log").read_text()
    for member in sweep.members:
        got, want = load_weights(member.folder(resumed.out_dir)), load_weights(member.folder(reference.out_dir))
        assert all((got[name] == want[name]).all() for name in want), member.name
    assert job_processes_left(resumed.id, home) == []
