"""The gate's check of a sweep on a real lab.db, real activations and the fake NVML: the data once, the layout
"auto" resolves to (batch, members, or a refusal naming both figures), explicit layouts, and what is queued."""

from __future__ import annotations

from collections import namedtuple

import pytest

from sae_core.gpu import host, memory
from sae_core.jobs import store, submission
from sae_core.jobs.placement import Submission
from sae_core.sweep import Sweep, sweep_from_dict
from tests.fakes import fake_pynvml as fake
from tests.fakes.fixtures import fake_gpus  # noqa: F401  (fixture)

GiB = fake.GiB
D_IN = 32  # the toy set's width


def make_sweep(toy_path, grid: dict, **base) -> Sweep:
    values = {"activation_source": str(toy_path), "batch_size": 256, "total_steps": 20, "k": 4, **base}
    return sweep_from_dict({**values, "sweep": grid})


def wide(toy_path, placement: str = "auto", members: int = 4, **base) -> Sweep:
    """Wide members on a small batch: "members" (half of them per GPU) needs less than "batch" on 2 GPUs."""
    return make_sweep(toy_path, {"init_seed": list(range(members))}, d_sae=262144, placement=placement, **base)


def gpus_with_free(fake_gpus, free: int, n: int = 2) -> None:  # noqa: F811
    fake_gpus.set(n_gpus=n, memory_used=80 * GiB - free)


def figures(sweep: Sweep, n: int) -> dict[str, int]:
    return {layout: memory.sweep_estimate(sweep, n, D_IN, layout).total_bytes for layout in ("batch", "members")}


def test_one_process_takes_batch_and_the_queued_sweep_says_so(lab_home, toy_path):
    sweep = make_sweep(toy_path, {"d_sae": [64, 128]})
    job, verdict = submission.submit(sweep, Submission(None, 1, name="grid"))
    assert verdict.ok and verdict.config.placement == "batch"
    (note,) = verdict.notes
    assert note.startswith("sweep placement: batch (2 members on each of 1 process, 256 tokens per process per step;")
    queued = store.job_config(store.require_job(job.id))
    assert isinstance(queued, Sweep) and queued.placement == "batch" and job.kind == "sweep"
    assert [m.name for m in queued.members] == ["d_sae=64", "d_sae=128"]


def test_auto_takes_batch_when_it_fits(lab_home, toy_path, fake_gpus):  # noqa: F811
    sweep = wide(toy_path)
    need = figures(sweep, 2)
    assert need["members"] < need["batch"]
    gpus_with_free(fake_gpus, need["batch"] + GiB)
    verdict = submission.check(sweep, Submission("0,1", None))
    assert verdict.ok, verdict.describe()
    assert verdict.config.placement == "batch"
    assert verdict.notes == [
        f"sweep placement: batch (4 members on each of 2 GPUs, 128 tokens per GPU per step; "
        f"~{need['batch'] / GiB:.1f} GiB per GPU)"
    ]


def test_auto_deals_members_out_when_batch_does_not_fit(lab_home, toy_path, fake_gpus):  # noqa: F811
    sweep = wide(toy_path)
    need = figures(sweep, 2)
    gpus_with_free(fake_gpus, (need["batch"] + need["members"]) // 2)
    job, verdict = submission.submit(sweep, Submission("0,1", None))
    assert verdict.notes == [
        f"sweep placement: members (4 members on 2 GPUs, 2 per GPU; ~{need['members'] / GiB:.1f} GiB per GPU)"
    ]
    assert store.job_config(store.require_job(job.id)).placement == "members"


def test_auto_refuses_naming_both_figures_and_nothing_is_queued(lab_home, toy_path, fake_gpus):  # noqa: F811
    sweep = wide(toy_path)
    need = figures(sweep, 2)
    gpus_with_free(fake_gpus, need["members"] - GiB)
    with pytest.raises(submission.SubmissionRejected) as refused:
        submission.submit(sweep, Submission("0,1", None))
    ((field, message),) = [(p.field, p.message) for p in refused.value.problems]
    assert field == "gpus"
    assert f"placement batch needs about {need['batch'] / GiB:.1f} GiB per GPU" in message
    assert f"placement members needs about {need['members'] / GiB:.1f} GiB per GPU" in message
    assert f"GPU 0 has {(need['members'] - GiB) / GiB:.1f} GiB free" in message
    assert store.list_jobs() == []


def test_an_explicit_layout_is_checked_as_asked(lab_home, toy_path, fake_gpus):  # noqa: F811
    need = figures(wide(toy_path), 2)
    gpus_with_free(fake_gpus, (need["batch"] + need["members"]) // 2)
    verdict = submission.check(wide(toy_path, "batch"), Submission("0,1", None))
    ((field, message),) = [(p.field, p.message) for p in verdict.problems]
    assert field == "gpus" and f"placement batch needs about {need['batch'] / GiB:.1f} GiB per GPU" in message
    assert "members needs" not in message and "placement auto" in message
    verdict = submission.check(wide(toy_path, "members"), Submission("0,1", None))
    assert verdict.ok and verdict.config.placement == "members"


def test_more_ranks_than_members_is_refused_for_members_and_auto_splits_the_batch(lab_home, toy_path, fake_gpus):  # noqa: F811
    fake_gpus.set(n_gpus=4)
    sweep = make_sweep(toy_path, {"d_sae": [64, 128]})
    verdict = submission.check(sweep.with_placement("members"), Submission("0,1,2,3", None))
    ((field, message),) = [(p.field, p.message) for p in verdict.problems]
    assert field == "placement" and "4 GPUs its own members, but the sweep has 2, so 2 would idle" in message
    assert submission.check(sweep, Submission("0,1,2,3", None)).config.placement == "batch"


def test_a_batch_that_does_not_split_leaves_members(lab_home, toy_path, monkeypatch):
    monkeypatch.setenv(host.CPU_BUDGET_ENV, "2")
    sweep = make_sweep(toy_path, {"d_sae": [64, 128]}, batch_size=255)
    verdict = submission.check(sweep, Submission(None, 2))
    assert verdict.ok and verdict.config.placement == "members", verdict.describe()
    verdict = submission.check(sweep.with_placement("batch"), Submission(None, 2))
    ((field, message),) = [(p.field, p.message) for p in verdict.problems]
    assert (
        field == "batch_size" and "placement batch: batch_size 255 does not divide evenly across 2 processes" in message
    )


def ram(monkeypatch, available: int) -> None:
    """psutil reports `available` bytes of RAM (the OS boundary; the estimate and the rule are the real ones)."""
    memory_info = namedtuple("svmem", "total available")
    monkeypatch.setattr(host.psutil, "virtual_memory", lambda: memory_info(64 * GiB, available))


def test_a_cpu_sweep_checks_the_hosts_ram_for_the_group(lab_home, toy_path, monkeypatch):
    monkeypatch.setenv(host.CPU_BUDGET_ENV, "2")
    sweep = make_sweep(toy_path, {"init_seed": [0, 1]}, d_sae=65536)
    need = {layout: memory.sweep_host_bytes(sweep, 2, D_IN, layout) for layout in ("batch", "members")}
    ram(monkeypatch, need["batch"] + 1)
    verdict = submission.check(sweep, Submission(None, 2))
    assert verdict.ok and verdict.config.placement == "batch"
    assert verdict.notes == [
        "sweep placement: batch (2 members on each of 2 processes, 128 tokens per process per step; "
        f"~{need['batch'] / GiB:.1f} GiB of RAM in all)"
    ]
    ram(monkeypatch, min(need.values()) - 1)
    verdict = submission.check(sweep, Submission(None, 2))
    ((field, message),) = [(p.field, p.message) for p in verdict.problems]
    assert field == "cpu_procs" and "this machine has" in message and "GiB available" in message
    assert all(f"placement {layout} needs about {n / GiB:.1f} GiB of RAM" in message for layout, n in need.items())


def test_the_data_is_checked_once_for_every_member(lab_home, toy_path, tmp_path):
    sweep = make_sweep(toy_path, {"d_sae": [64, 128]}, activation_source=str(tmp_path / "missing.safetensors"))
    verdict = submission.check(sweep, Submission(None, 1))
    assert [p.field for p in verdict.problems] == ["activation_source"]
