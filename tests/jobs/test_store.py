"""Store operations on a real lab.db: submission, queue decisions, lifecycle, metrics."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from sae_core import db
from sae_core.config import ConfigError, ExtractConfig, TrainConfig
from sae_core.db.tables import ACTIVE_STATUSES, Job
from sae_core.jobs import metrics, scheduler, store
from sae_core.jobs.placement import Submission


def make_cfg(**overrides) -> TrainConfig:
    base = dict(activation_source="/nowhere.safetensors", d_sae=64, k=8, batch_size=256, total_steps=20)
    return TrainConfig(**{**base, **overrides})


def job(id_: int, gpus: str = "", cpu: int | None = None, created: float = 0.0) -> Job:
    """An unsaved Job for the pure queue planner."""
    return Job(id=id_, gpu_ids=gpus, cpu_procs=cpu, config_json="{}", created_at=created, status="queued")


def ids(jobs) -> list[int]:
    return [j.id for j in jobs]


# --------------------------------------------------------------------------- submission


def test_submit_assigns_id_out_dir_and_default_name(lab_home):
    first = store.submit_job(make_cfg(), Submission("0,1", None, submitted_by="ada"))
    second = store.submit_job(make_cfg(), Submission(None, 2, name="  probe run "))
    assert (first.id, second.id) == (1, 2)
    assert first.name == "job-1" and second.name == "probe run"
    assert first.out_dir == str(lab_home / "jobs" / "1")
    assert first.gpu_list == [0, 1] and first.world_size == 2 and not first.is_cpu_job
    assert second.gpu_ids == "" and second.cpu_procs == 2 and second.is_cpu_job
    stored = store.get_job(1)
    assert stored.status == "queued" and stored.total_steps == 20 and stored.submitted_by == "ada"
    assert TrainConfig.model_validate_json(stored.config_json) == make_cfg()


@pytest.mark.parametrize(
    ("gpus", "cpu", "message"),
    [
        ("0,0", None, "listed twice"),
        ("-1", None, "0 or more"),
        ("a", None, "not a GPU index"),
        ("0", 2, "not both"),
        (None, None, "needs GPUs"),
        (None, 0, "cpu_procs"),
    ],
)
def test_submit_rejects_bad_placement_and_writes_nothing(lab_home, gpus, cpu, message):
    with pytest.raises(store.JobError, match=message):
        store.submit_job(make_cfg(), Submission(gpus, cpu))
    assert store.list_jobs() == []


def test_submit_rejects_batch_that_does_not_split(lab_home):
    with pytest.raises(ConfigError, match="batch_size 256 does not divide evenly across 3"):
        store.submit_job(make_cfg(), Submission(None, 3))
    assert store.list_jobs() == []


# --------------------------------------------------------------------------- queue planner (pure)


def test_plan_backfills_a_later_job_whose_gpu_is_free():
    running = [job(1, "1")]
    queued = [job(2, "1"), job(3, "0")]  # 2 waits for GPU 1; 3 must not wait behind it
    assert ids(scheduler.plan_starts(queued, running, cpu_budget=2, now=10)) == [3]


def test_plan_keeps_submission_order_on_a_shared_gpu():
    queued = [job(5, "0"), job(4, "0,1"), job(6, "1")]
    # 4 is first (lowest id) and takes both GPUs; 5 and 6 wait.
    assert ids(scheduler.plan_starts(queued, [], cpu_budget=2, now=10)) == [4]


def test_plan_long_waiting_wide_job_reserves_its_free_gpus():
    running = [job(1, "1")]
    queued = [job(2, "0,1", created=0.0), job(3, "0", created=50.0)]
    assert ids(scheduler.plan_starts(queued, running, 2, now=100.0, reserve_after_s=600)) == [3]
    # after 10 minutes of waiting, job 2 keeps GPU 0 free for itself
    assert ids(scheduler.plan_starts(queued, running, 2, now=700.0, reserve_after_s=600)) == []


def test_plan_cpu_jobs_share_the_cpu_budget():
    queued = [job(1, cpu=2), job(2, cpu=2), job(3, cpu=2)]
    assert ids(scheduler.plan_starts(queued, [], cpu_budget=4, now=0)) == [1, 2]
    assert ids(scheduler.plan_starts(queued[2:], queued[:2], cpu_budget=4, now=0)) == []
    # a job wider than the budget still runs, alone
    assert ids(scheduler.plan_starts([job(7, cpu=8)], [], cpu_budget=2, now=0)) == [7]
    assert ids(scheduler.plan_starts([job(7, cpu=8)], [job(1, cpu=1)], cpu_budget=2, now=0)) == []


def test_plan_gpu_and_cpu_jobs_do_not_block_each_other():
    running = [job(1, "0,1")]
    queued = [job(2, "0"), job(3, cpu=1)]
    assert ids(scheduler.plan_starts(queued, running, cpu_budget=1, now=0)) == [3]


def test_claim_marks_starting_and_never_double_books(lab_home):
    for gpus in ("0", "0", "1", "0,1"):
        store.submit_job(make_cfg(), Submission(gpus, None))
    first = scheduler.claim_runnable(cpu_budget=2)
    assert ids(first) == [1, 3]
    assert {j.status for j in first} == {"starting"}
    assert scheduler.claim_runnable(cpu_budget=2) == []  # GPUs 0 and 1 are held now
    holders = {gpu: job.id for job in store.list_jobs(ACTIVE_STATUSES) for gpu in job.gpu_list}
    assert holders == {0: 1, 1: 3}
    store.finish_job(1, "completed", exit_code=0)
    assert ids(scheduler.claim_runnable(cpu_budget=2)) == [2]


def extract_cfg(**overrides) -> ExtractConfig:
    return ExtractConfig(
        **{"model": "/m", "hook": "model.layers.0", "dataset": "/d.txt", "n_tokens": 5000, **overrides}
    )


def test_an_extraction_job_counts_rows_and_reads_back_its_config(lab_home):
    extraction = store.submit_job(extract_cfg(), Submission(None, 3))  # any number of ranks: they split whole shards
    assert (extraction.kind, extraction.total_steps, extraction.world_size) == ("extract", 5000, 3)
    assert store.job_config(store.get_job(extraction.id)) == extract_cfg()
    training = store.submit_job(
        make_cfg(activation_source=extraction.out_dir), Submission(None, 1, depends_on=extraction.id)
    )
    assert (training.kind, training.depends_on) == ("train", extraction.id)
    assert isinstance(store.job_config(training), TrainConfig)


def test_plan_a_dependent_job_waits_for_its_parent_to_complete_and_holds_nothing_meanwhile():
    child = job(2, "0")
    child.depends_on = 1
    later = job(3, "0")
    for status in ("queued", "starting", "running"):
        assert ids(scheduler.plan_starts([child, later], [], 1, now=0, parent_status={1: status})) == [3]
    assert ids(scheduler.plan_starts([child, later], [], 1, now=0, parent_status={1: "completed"})) == [2]


def test_claim_cancels_the_dependents_of_a_failed_or_cancelled_job_with_the_reason(lab_home):
    failed = store.submit_job(extract_cfg(), Submission(None, 1))
    child = store.submit_job(make_cfg(activation_source=failed.out_dir), Submission(None, 1, depends_on=failed.id))
    cancelled = store.submit_job(extract_cfg(), Submission(None, 1))
    orphan = store.submit_job(
        make_cfg(activation_source=cancelled.out_dir), Submission(None, 1, depends_on=cancelled.id)
    )
    assert ids(scheduler.claim_runnable(cpu_budget=4)) == [failed.id, cancelled.id]
    store.finish_job(failed.id, "failed", exit_code=2, error="error: hook: 'x' is not a module\nmore")
    store.finish_job(cancelled.id, "cancelled", exit_code=None, error="cancelled by ada")
    assert scheduler.claim_runnable(cpu_budget=4) == []
    child_after, orphan_after = store.get_job(child.id), store.get_job(orphan.id)
    assert child_after.status == "cancelled" and orphan_after.status == "cancelled"
    assert child_after.error == f"job {failed.id} (extract) it depends on failed: error: hook: 'x' is not a module"
    assert orphan_after.error.startswith(f"job {cancelled.id} (extract) it depends on cancelled")


def test_claim_starts_a_dependent_once_its_parent_completed(lab_home):
    parent = store.submit_job(extract_cfg(), Submission("0", None))
    child = store.submit_job(make_cfg(activation_source=parent.out_dir), Submission("0", None, depends_on=parent.id))
    assert ids(scheduler.claim_runnable(cpu_budget=1)) == [parent.id]
    store.finish_job(parent.id, "completed", exit_code=0)
    assert ids(scheduler.claim_runnable(cpu_budget=1)) == [child.id]


# --------------------------------------------------------------------------- lifecycle


def test_cancel_queued_is_immediate_and_running_is_a_request(lab_home):
    running = store.submit_job(make_cfg(), Submission("1", None))
    queued = store.submit_job(make_cfg(), Submission("1", None))  # waits behind `running` for GPU 1
    assert ids(scheduler.claim_runnable(cpu_budget=1)) == [running.id]
    store.mark_running(running.id, pid=12345, pid_start_time=1.0)
    assert store.request_cancel(queued.id).status == "cancelled"
    job_after = store.request_cancel(running.id)
    assert job_after.status == "running" and job_after.cancel_requested
    with pytest.raises(store.JobError, match="already cancelled"):
        store.request_cancel(queued.id)
    with pytest.raises(store.JobError, match="no job with id 99"):
        store.request_cancel(99)


def test_finish_is_recorded_once(lab_home):
    j = store.submit_job(make_cfg(), Submission(None, 1))
    assert store.finish_job(j.id, "failed", exit_code=1, error="boom")
    assert not store.finish_job(j.id, "completed", exit_code=0)
    stored = store.get_job(j.id)
    assert (stored.status, stored.exit_code, stored.error) == ("failed", 1, "boom")
    assert stored.finished_at is not None
    with pytest.raises(ValueError, match="not final"):
        store.finish_job(j.id, "running")


def test_list_jobs_filters_and_orders(lab_home):
    for _ in range(3):
        store.submit_job(make_cfg(), Submission(None, 1))
    store.request_cancel(2)
    assert ids(store.list_jobs()) == [3, 2, 1]
    assert ids(store.list_jobs(["queued"], newest_first=False)) == [1, 3]
    assert ids(store.list_jobs(limit=1)) == [3]
    with pytest.raises(store.JobError, match="unknown"):
        store.list_jobs(["paused"])


def test_job_to_dict_is_json_ready(lab_home):
    j = store.submit_job(make_cfg(), Submission("0,1", None))
    data = json.loads(json.dumps(store.job_to_dict(j)))
    assert data["gpu_ids"] == [0, 1] and data["world_size"] == 2 and data["config"]["d_sae"] == 64


# --------------------------------------------------------------------------- metrics


def record(step: int, **extra) -> dict:
    rec = dict(
        step=step,
        tokens=step * 256,
        loss=1.0 / step,
        mse=0.5,
        fvu=0.1,
        l0=8.0,
        dead_fraction=0.0,
        lr=1e-3,
        tokens_per_s=1000.0 + step,
        aux_loss=None,
        peak_mem=[100, 200],
        time=1000.0 + step,
        total_steps=50,
    )
    rec.update(extra)
    return rec


def test_sink_writes_rows_and_progress_and_ignores_events(lab_home):
    j = store.submit_job(make_cfg(), Submission(None, 1))
    sink = metrics.SqliteMetricsSink(j.id, flush_interval_s=0.05)
    for step in (10, 20, 30):
        sink.write(record(step, unknown_key="ignored"))
    sink.write({"event": "done", "fvu": 0.1})
    sink.write({"tokens": 5})  # no step: not a metrics record
    sink.write({**record(35), "step": "thirty-five"})  # malformed: dropped, never blocks the rows after it
    sink.close()
    frame = metrics.metrics_frame(j.id)
    assert frame["step"].tolist() == [10, 20, 30]
    assert frame["peak_mem"].iloc[0] == [100, 200] and frame["peak_mem_max"].iloc[0] == 200
    assert frame["aux_loss"].isna().all()
    assert sink.dropped == 1
    stored = store.get_job(j.id)
    assert stored.last_step == 30 and stored.tokens_per_s == 1030.0 and stored.last_metric_at is not None


def test_named_loss_terms_and_stats_become_columns_whatever_their_names(lab_home):
    j = store.submit_job(make_cfg(), Submission(None, 1))
    named = {"losses": {"mse": 0.5, "inner_mse_128": 0.7, "aux": float("nan")}, "stats": {"sparsity_coefficient": 2.0}}
    points = [metrics.metric_point_from_record(j.id, record(s, **named)) for s in (10, 20)]
    points.append(metrics.metric_point_from_record(j.id, record(30)))  # a record without them
    metrics.write_metric_points(j.id, points)
    frame = metrics.metrics_frame(j.id)
    assert metrics.named_columns(frame) == ["loss: mse", "loss: inner_mse_128", "loss: aux", "sparsity_coefficient"]
    assert frame["loss: inner_mse_128"].tolist()[:2] == [0.7, 0.7] and pd.isna(frame["loss: inner_mse_128"].iloc[2])
    assert frame["loss: aux"].isna().all()  # a non-finite figure is stored as missing
    assert frame["sparsity_coefficient"].iloc[0] == 2.0


def test_metrics_frame_thins_evenly_keeping_ends(lab_home):
    j = store.submit_job(make_cfg(), Submission(None, 1))
    metrics.write_metric_points(j.id, [metrics.metric_point_from_record(j.id, record(s)) for s in range(1, 101)])
    thin = metrics.metrics_frame(j.id, max_points=10)
    assert len(thin) == 10 and thin["step"].iloc[0] == 1 and thin["step"].iloc[-1] == 100
    assert thin["step"].is_monotonic_increasing
    assert list(metrics.metrics_frame(999).columns) == list(metrics.METRIC_COLUMNS)


def test_backfill_adds_only_missing_records(lab_home):
    j = store.submit_job(make_cfg(), Submission(None, 1))
    metrics.write_metric_points(j.id, [metrics.metric_point_from_record(j.id, record(10))])
    out = lab_home / "jobs" / str(j.id)
    out.mkdir(parents=True)
    lines = [json.dumps(record(s)) for s in (10, 20, 30)] + [json.dumps({"event": "done"}), '{"step": 4']
    (out / "metrics.jsonl").write_text("\n".join(lines))
    assert metrics.backfill_metrics_from_jsonl(store.get_job(j.id)) == 2
    assert metrics.metrics_frame(j.id)["step"].tolist() == [10, 20, 30]
    assert metrics.backfill_metrics_from_jsonl(store.get_job(j.id)) == 0


def _hold_write_lock(path, seconds: float):
    """Another connection takes the write lock (BEGIN IMMEDIATE) and keeps it `seconds`."""
    import sqlite3
    import threading

    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE job SET name = name")
    timer = threading.Timer(seconds, lambda: (conn.execute("COMMIT"), conn.close()))
    timer.start()
    return timer


def test_locked_database_never_stalls_write_and_rows_land_later(lab_home):
    j = store.submit_job(make_cfg(), Submission(None, 1))
    sink = metrics.SqliteMetricsSink(j.id, flush_interval_s=0.05, close_timeout_s=10)
    timer = _hold_write_lock(str(lab_home / "lab.db"), 1.5)
    worst = 0.0
    for step in range(1, 201):
        started = time.perf_counter()
        sink.write(record(step))
        worst = max(worst, time.perf_counter() - started)
        if step % 20 == 0:
            time.sleep(0.05)  # the flush thread is now blocked on the lock
    assert worst < 0.05, f"write() blocked {worst:.3f} s"
    # a submission in the meantime waits for the lock (busy timeout) and succeeds
    other = store.submit_job(make_cfg(), Submission(None, 1))
    timer.join()
    sink.close()
    assert other.id == j.id + 1
    assert metrics.metric_count(j.id) == 200


def test_failed_flush_is_retried(lab_home, monkeypatch):
    monkeypatch.setattr(db.engine, "BUSY_TIMEOUT_MS", 100)  # give up on the lock quickly
    db.dispose_engines()
    j = store.submit_job(make_cfg(), Submission(None, 1))
    sink = metrics.SqliteMetricsSink(j.id, flush_interval_s=0.05, close_timeout_s=10)
    timer = _hold_write_lock(str(lab_home / "lab.db"), 0.6)
    sink.write(record(1))
    time.sleep(0.3)
    timer.join()
    sink.close()
    assert sink.failed_flushes >= 1 and "locked" in (sink.last_error or "")
    assert metrics.metric_count(j.id) == 1


def test_long_read_transaction_does_not_block_submission_or_metrics(lab_home):
    import sqlite3

    first = store.submit_job(make_cfg(), Submission(None, 1))
    reader = sqlite3.connect(str(lab_home / "lab.db"), isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM job").fetchone() == (1,)  # snapshot taken, kept open
    try:
        started = time.perf_counter()
        second = store.submit_job(make_cfg(), Submission(None, 1))
        sink = metrics.SqliteMetricsSink(first.id, flush_interval_s=0.01)
        sink.write(record(1))
        sink.close()
        assert time.perf_counter() - started < 5
        assert metrics.metric_count(first.id) == 1 and second.id == 2
        # the reader still sees its snapshot: WAL let the writers through without disturbing it
        assert reader.execute("SELECT count(*) FROM job").fetchone() == (1,)
    finally:
        reader.execute("COMMIT")
        reader.close()


def test_backfill_reads_each_member_of_a_sweep_by_member_and_step(lab_home):
    j = store.submit_job(make_cfg(), Submission(None, 1))
    # one member's step 10 reached the database; the same step of the other member did not
    metrics.write_metric_points(j.id, [metrics.metric_point_from_record(j.id, {**record(10), "member": "k=4"})])
    out = lab_home / "jobs" / str(j.id)
    members = [{"name": "k=4", "overrides": {"k": 4}}, {"name": "k=8", "overrides": {"k": 8}}]
    for member in members:
        (out / member["name"]).mkdir(parents=True)
        lines = [json.dumps({**record(s), "member": member["name"]}) for s in (10, 20)]
        (out / member["name"] / "metrics.jsonl").write_text("\n".join([*lines, json.dumps({"event": "done"})]))
    (out / "sweep.json").write_text(json.dumps({"placement": "batch", "world_size": 1, "members": members}))
    assert metrics.backfill_metrics_from_jsonl(store.get_job(j.id)) == 3
    frame = metrics.metrics_frame(j.id)
    assert sorted(zip(frame["member"], frame["step"], strict=True)) == [
        ("k=4", 10),
        ("k=4", 20),
        ("k=8", 10),
        ("k=8", 20),
    ]
    assert metrics.backfill_metrics_from_jsonl(store.get_job(j.id)) == 0
