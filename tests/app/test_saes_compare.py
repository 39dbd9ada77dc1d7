"""The SAEs page's comparison view (AppTest): a sweep's members or SAEs picked, L0 against FVU (and CE loss
recovered once evaluated) with the Pareto frontier, a sortable table, a click opening Explore, and "Evaluate
all" queueing one evaluation job of every SAE through the gate."""

from __future__ import annotations

import json
import shutil

from sae_core.files import EVAL_FILE
from sae_core.jobs import store
from sae_core.model.evaluate import main as evaluate_main
from sae_core.ui import charts
from tests.app.test_app_pages import _fake_sae, no_exception, texts
from tests.conftest import write_json
from tests.fakes import fake_pynvml as fake

# (name, l0, fvu): k=8 has more active latents and a worse FVU than k=4 (off the frontier); k=4 and k=16 trade off
FIGURES = [("k=4", 4.0, 0.30), ("k=8", 8.0, 0.35), ("k=16", 16.0, 0.10)]


def fake_sweep(home, figures=FIGURES):
    run = home / "jobs" / "5"
    members = []
    for name, l0, fvu in figures:
        _fake_sae(run / name)
        (run / name / EVAL_FILE).write_text(json.dumps({"l0": l0, "fvu": fvu}))
        members.append({"name": name, "overrides": {"k": int(name[2:])}})
    write_json(run / "sweep.json", {"placement": "batch", "world_size": 1, "members": members})
    return run


def compare_table(at):
    return next(df.value for df in at.dataframe if "frontier_fvu" in df.value.columns)


def compare_page(lab):
    at = lab.page("views/saes.py", user_name="ana")
    at.radio(key="saes_view").set_value("Compare").run()
    no_exception(at)
    return at


def test_a_sweep_is_compared_with_its_frontier_and_table(lab):
    lab.sample(fake.no_driver())
    fake_sweep(lab.home)
    at = compare_page(lab)
    assert at.radio(key="compare_mode").value == "A sweep"
    table = compare_table(at)
    assert table["name"].tolist() == ["k=4", "k=8", "k=16"]
    assert table["folder"].tolist() == ["jobs/5/k=4", "jobs/5/k=8", "jobs/5/k=16"]
    assert table["frontier_fvu"].tolist() == [True, False, True]  # k=8: more latents and a worse FVU than k=4
    assert json.loads(table["config"].tolist()[1]) == {"k": 8}
    (chart,) = at.get("vega_lite_chart")  # no CE loss score yet: only the FVU chart
    spec = json.loads(chart.proto.spec)
    assert [p["name"] for p in spec.get("params", [])] == [charts.COMPARE_SELECTION] or any(
        p.get("name") == charts.COMPARE_SELECTION for layer in spec["layer"] for p in layer.get("params", [])
    )
    assert "No CE loss score yet" in texts(at)


def test_picked_saes_are_compared_and_a_bad_evaluation_is_refused_by_name(lab):
    lab.sample(fake.no_driver())
    run = fake_sweep(lab.home)
    _fake_sae(lab.home / "jobs" / "9")
    at = compare_page(lab)
    at.radio(key="compare_mode").set_value("SAEs I pick").run()
    assert "Pick two SAEs or more" in texts(at)
    at.multiselect(key="compare_saes").set_value([lab.home / "jobs" / "9", run / "k=16"]).run()
    no_exception(at)
    table = compare_table(at)
    assert table["name"].tolist() == ["jobs/9", "jobs/5/k=16"]
    assert table["config"].tolist() == ["", '{"k": 16}']
    at.button(key="compare_evaluate_submit").click().run()
    no_exception(at)
    assert "model: the SAE's training data names no model" in texts(at)
    assert store.list_jobs() == []


def test_evaluate_all_queues_one_job_of_the_sweep_then_charts_ce_loss_score(lab, trained):
    lab.sample(fake.no_driver())
    assert lab.engine
    run = lab.home / "jobs" / "6"
    for name in ("k=8", "k=8b"):
        shutil.copytree(trained["sae"], run / name)
    members = [{"name": "k=8", "overrides": {"k": 8}}, {"name": "k=8b", "overrides": {"k": 8, "init_seed": 1}}]
    write_json(run / "sweep.json", {"placement": "batch", "world_size": 1, "members": members})
    at = compare_page(lab)
    at.number_input(key="compare_contexts").set_value(3)
    at.button(key="compare_evaluate_submit").click().run()
    no_exception(at)
    (job,) = store.list_jobs()
    assert job.kind == "evaluate" and json.loads(job.config_json)["sae"] == str(run)
    assert f"Evaluation job {job.id} queued." in texts(at)
    request = write_json(lab.home / "request.json", json.loads(job.config_json))
    assert evaluate_main(["--config", str(request), "--out", job.out_dir]) == 0
    at = compare_page(lab)
    table = compare_table(at)
    assert table["ce_loss_score"].notna().all()
    assert len(at.get("vega_lite_chart")) == 2
