"""The Explore page (AppTest) on an SAE trained on a real tiny GPT-2's activations and inspected by the real
inspect entry: the no-inspect state queues the job, the table and its search, a latent's view with its text,
histogram, effects and neighbours, the permalink both ways, bad URLs; and the shaded text escapes tokens."""

from __future__ import annotations

import json
import shutil

import pytest

from sae_core.jobs import store
from sae_core.latents import read_inspection
from sae_core.model.inspect import main as inspect_main
from sae_core.ui.explore import shaded_text_html
from tests.app.test_app_pages import no_exception, texts
from tests.conftest import write_json
from tests.fakes import fake_pynvml as fake


@pytest.fixture
def lab_sae(lab, trained):
    assert lab.engine  # the lab's database first: job folders without it would be a lost history
    sae = lab.home / "jobs" / "4"
    shutil.copytree(trained["sae"], sae, ignore=shutil.ignore_patterns("inspect"))
    lab.sample(fake.no_driver())
    return sae


def inspected(lab, sae):
    config = write_json(lab.home / "inspect.json", {"sae": str(sae), "device": "cpu", "top_k": 6})
    assert inspect_main(["--config", str(config), "--out", str(lab.home / "inspect-out")]) == 0
    return read_inspection(sae)


def test_without_inspect_data_the_page_queues_the_inspect_job(lab, lab_sae):
    at = lab.page("views/explore.py", user_name="ana")
    no_exception(at)
    assert "has not been inspected yet" in texts(at)
    at.number_input(key="explore_tokens").set_value(1500)
    at.button(key="inspect_submit").click().run()
    no_exception(at)
    (job,) = store.list_jobs()
    assert job.kind == "inspect" and json.loads(job.config_json)["tokens"] == 1500 and job.submitted_by == "ana"
    assert f"Inspection job {job.id} queued." in texts(at)


def test_the_permalink_opens_a_latent_with_its_text_histogram_effects_and_neighbours(lab, lab_sae):
    inspection = inspected(lab, lab_sae)
    index = next(j for j in range(inspection.d_sae) if inspection.latent(j).top)
    view = inspection.latent(index)
    at = lab.page(None)
    at.query_params["sae"] = "jobs/4"
    at.query_params["latent"] = str(index)
    at.switch_page("views/explore.py").run()
    no_exception(at)
    assert at.number_input(key="explore_latent").value == index
    assert f"Latent {index}" in [s.value for s in at.subheader]
    assert f"?sae=jobs/4&latent={index}" in [c.value for c in at.code]
    shown = {m.label: m.value for m in at.metric}
    assert shown["Latents"] == "64" and shown["Frequency"] == f"{view.frequency:.3%}"
    htmls = [h.proto.body for h in at.get("html")]
    peak = view.top[0].tokens[view.top[0].peak]
    assert len(htmls) >= len(view.top) and any(peak.strip() in body for body in htmls)
    links = [link for link in at.get("page_link") if "Latent " in link.proto.label]
    assert len(links) == len(view.nearest) and f"latent={view.nearest[0][0]}" in links[0].proto.query_string
    assert len(at.get("vega_lite_chart")) == 2  # the density of all latents, this latent's activations
    # another latent from the number box: the URL follows
    other = (index + 1) % inspection.d_sae
    at.number_input(key="explore_latent").set_value(other).run()
    no_exception(at)
    assert at.query_params["latent"] in ([str(other)], str(other))


def test_the_table_searches_by_number_and_by_token(lab, lab_sae):
    inspection = inspected(lab, lab_sae)
    at = lab.page("views/explore.py")
    table = at.dataframe[0]  # the latents table comes first (then the latent's logit effects)
    assert len(table.value) == 64 and list(table.value.columns)[:3] == ["Latent", "Frequency", "Max activation"]
    at.text_input(key="explore_search").input("7").run()
    assert list(at.dataframe[0].value["Latent"]) == [7]
    word = inspection.text(int(inspection.logit_top_ids[5][0]))
    at.text_input(key="explore_search").input(word.strip()).run()
    assert 5 in list(at.dataframe[0].value["Latent"])


@pytest.mark.parametrize("latent", ["999", "-1", "x"])
def test_a_latent_out_of_range_in_the_url_is_no_crash(lab, lab_sae, latent):
    inspected(lab, lab_sae)
    at = lab.page(None)
    at.query_params["sae"] = "jobs/4"
    at.query_params["latent"] = latent
    at.switch_page("views/explore.py").run()
    no_exception(at)
    assert at.number_input(key="explore_latent").value == 0


def test_an_sae_outside_the_home_in_the_url_is_not_opened(lab, lab_sae):
    at = lab.page(None)
    at.query_params["sae"] = "../../etc"
    at.switch_page("views/explore.py").run()
    no_exception(at)
    assert at.selectbox(key="explore_sae").value == "jobs/4" and "etc" not in texts(at)


def test_token_text_is_escaped_in_the_shaded_html():
    markup = shaded_text_html(["<script>alert(1)</script>", " **b**", "\n"], [0.5, 1.0, 0.0], 1, 1.0)
    assert "<script>" not in markup and "&lt;script&gt;alert(1)&lt;/script&gt;" in markup
    assert " **b**" in markup and "↵" in markup  # markdown is not HTML: it stays as typed
    assert markup.count('class="sae-token"') == 3 and "outline" in markup.split('class="sae-token"')[2]


def test_a_streamed_transcoder_opens_with_its_modules_input_as_the_examples(lab, kept_transcoder):
    assert lab.engine
    sae = lab.home / "jobs" / "5"
    shutil.copytree(kept_transcoder["sae"], sae, ignore=shutil.ignore_patterns("inspect"))
    lab.sample(fake.no_driver())
    inspection = inspected(lab, sae)
    assert inspection.summary["transcoder"] and inspection.summary["activations"].endswith(".mlp.input")
    index = next(j for j in range(inspection.d_sae) if inspection.latent(j).top)
    at = lab.page(None)
    at.query_params["sae"] = "jobs/5"
    at.query_params["latent"] = str(index)
    at.switch_page("views/explore.py").run()
    no_exception(at)
    assert "A transcoder of transformer.h.0.mlp" in texts(at)
    assert f"Latent {index}" in [s.value for s in at.subheader]
    peak = inspection.latent(index).top[0]
    assert any(peak.tokens[peak.peak].strip() in h.proto.body for h in at.get("html"))
    assert len(at.dataframe) == 2  # the latents table, and the logit effects through the unembedding
