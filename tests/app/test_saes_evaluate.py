"""The SAEs page's model evaluation (AppTest): queue an evaluation of an SAE trained on a real tiny GPT-2's
activations, refuse one the model cannot serve with the named reason, show the figures once the job wrote
them; the Jobs page shows an evaluation's figures."""

from __future__ import annotations

import json
import shutil

from sae_core.files import EVAL_FILE, MODEL_EVAL_FILE
from sae_core.jobs import store
from sae_core.model.evaluate import main as evaluate_main
from tests.app.test_app_pages import _fake_sae, no_exception, texts
from tests.conftest import write_json
from tests.fakes import fake_pynvml as fake

MODEL_FIGURES = ("ce_loss_score", "kl_div_score", "ce_clean", "ce_spliced", "ce_zero_ablation", "kl_spliced")


def copy_sae(trained, lab):
    """The trained SAE as a job folder of this lab, without the figures of any earlier evaluation."""
    assert lab.engine  # the lab's database first: job folders without it would be a lost history
    sae = lab.home / "jobs" / "4"
    shutil.copytree(trained["sae"], sae)
    figures = json.loads((sae / EVAL_FILE).read_text())
    (sae / EVAL_FILE).write_text(json.dumps({k: v for k, v in figures.items() if not k.startswith(("ce_", "kl_"))}))
    return sae


def test_evaluate_with_the_model_queues_a_job_then_shows_its_figures(lab, trained):
    lab.sample(fake.no_driver())
    sae = copy_sae(trained, lab)
    at = lab.page("views/saes.py", user_name="ana")
    no_exception(at)
    assert not any(m.label == "CE loss recovered" for m in at.metric)
    at.number_input(key="saes_contexts").set_value(3)
    at.button(key="evaluate_submit").click().run()
    no_exception(at)
    (job,) = store.list_jobs()
    assert (job.kind, job.total_steps, job.cpu_procs, job.submitted_by) == ("evaluate", 3, 2, "ana")
    assert json.loads(job.config_json)["sae"] == str(sae)
    assert f"Evaluation job {job.id} queued." in texts(at)
    # the job itself (its entry, in this process), then the page shows the figures it added
    request = write_json(lab.home / "request.json", json.loads(job.config_json))
    assert evaluate_main(["--config", str(request), "--out", job.out_dir]) == 0
    at = lab.page("views/saes.py", user_name="ana")
    no_exception(at)
    shown = {m.label: m.value for m in at.metric}
    assert shown["Contexts"] == "3" and float(shown["CE loss recovered"]) == round(
        json.loads((sae / EVAL_FILE).read_text())["ce_loss_score"], 3
    )
    # and the Jobs page shows them for the evaluation job
    store.finish_job(job.id, "completed", 0, None)
    at = lab.page("views/jobs.py")
    no_exception(at)
    labels = {m.label for m in at.metric}
    assert {"Contexts", "CE loss recovered", "KL recovered"} <= labels
    assert (lab.home / "jobs" / str(job.id) / MODEL_EVAL_FILE).is_file()


def test_an_sae_from_elsewhere_is_refused_with_the_reason(lab):
    lab.sample(fake.no_driver())
    _fake_sae(lab.home / "jobs" / "3")
    at = lab.page("views/saes.py", user_name="ana")
    at.button(key="evaluate_submit").click().run()
    no_exception(at)
    assert "model: the SAE's training data names no model" in texts(at)
    assert store.list_jobs() == []
