"""A sweep on the Jobs page (AppTest): its members' status table from their folders and latest metrics, and one
chart with a line per member, the members chosen in a multiselect."""

from __future__ import annotations

import json

import pyarrow as pa

from sae_core.jobs import metrics
from tests.app.test_app_pages import _fake_sae, no_exception, texts

MEMBERS = ["d_sae=64,k=4", "d_sae=64,k=8", "d_sae=128,k=4"]


def sweep_job(lab, status: str = "running") -> int:
    """A training job whose folder holds a sweep: one member completed, one failed, one still training."""
    job_id = lab.job(status)
    out = lab.home / "jobs" / str(job_id)
    entries = [{"name": name, "overrides": {"k": int(name[-1])}} for name in MEMBERS]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"placement": "batch", "world_size": 1, "members": entries}))
    _fake_sae(out / MEMBERS[0])
    (out / MEMBERS[1]).mkdir()
    (out / MEMBERS[1] / "error.txt").write_text("loss: not finite at step 20 (lr too high)")
    (out / MEMBERS[2]).mkdir()
    points = [
        metrics.metric_point_from_record(
            job_id, {"step": s, "member": m, "loss": 1.0 / s + i, "fvu": 0.5 / s, "l0": 4.0 + i}
        )
        for s in (10, 20, 30)
        for i, m in enumerate(MEMBERS)
    ]
    metrics.write_metric_points(job_id, points)
    return job_id


def chart_members(at) -> set[str]:
    """The members the one member chart draws (its Arrow data's `member` column), coloured by member."""
    (chart,) = at.get("vega_lite_chart")
    assert json.loads(chart.proto.spec)["encoding"]["color"]["field"] == "member"
    table = pa.ipc.open_stream(chart.proto.data.data).read_all()
    return set(table.column("member").to_pylist())


def test_a_sweep_shows_its_members_and_a_line_per_member(lab):
    job_id = sweep_job(lab)
    at = lab.page("views/jobs.py")
    at.query_params["job"] = str(job_id)
    at.run()
    no_exception(at)
    assert "**Members**: 1 of 3 completed" in texts(at)
    table = next(df.value for df in at.dataframe if "Member" in df.value.columns)
    assert table["Member"].tolist() == MEMBERS
    assert table["Status"].tolist() == ["completed", "failed", "running"]
    assert table["Step"].tolist() == [30, 30, 30]
    assert table["FVU"].tolist()[0] == 0.0812  # eval.json's figure for a completed member
    assert table["FVU"].tolist()[2] == 0.5 / 30  # the latest metric of one still training
    assert "not finite" in table["Error"].tolist()[1]
    assert at.selectbox(key="job_member_metric").value == "loss"
    shown = at.multiselect(key="job_members_shown")
    assert shown.value == MEMBERS
    assert chart_members(at) == set(MEMBERS)
    shown.set_value(MEMBERS[:1]).run()
    no_exception(at)
    assert chart_members(at) == {MEMBERS[0]}
    at.selectbox(key="job_member_metric").set_value("fvu").run()
    no_exception(at)
    (chart,) = at.get("vega_lite_chart")
    assert json.loads(chart.proto.spec)["encoding"]["y"]["title"] == "fvu"


def test_an_ended_sweep_calls_an_unfinished_member_not_finished(lab):
    job_id = sweep_job(lab, "failed")
    at = lab.page("views/jobs.py")
    at.query_params["job"] = str(job_id)
    at.run()
    no_exception(at)
    table = next(df.value for df in at.dataframe if "Member" in df.value.columns)
    assert table["Status"].tolist() == ["completed", "failed", "not finished"]
