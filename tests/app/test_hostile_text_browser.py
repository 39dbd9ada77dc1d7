"""Issue 21 §1 in a real headless Chromium: a lab whose every user-typed field holds markdown and HTML (job
names, submitters, errors and configs in lab.db; dataset, text, model and SAE folder names; an SAE's cfg.json;
token texts of an inspection; a GPU's name) renders on every page with no link or image made from them, no
request to the host they name, and no Deploy button. Skips without Chromium unless SAE_LAB_REQUIRE_BROWSER=1."""

from __future__ import annotations

import json
import re
import shutil
import urllib.parse

import pytest

from sae_core import db
from sae_core.config import ExtractConfig, TrainConfig
from sae_core.data.toy import write_toy
from sae_core.db.tables import Job
from sae_core.jobs import store
from sae_core.jobs.placement import Submission
from sae_core.latents import read_inspection
from sae_core.model.inspect import main as inspect_main
from sae_core.outputs import build_sae_zip
from sae_core.ui.html import WORD_JOINER
from tests.app.test_e2e_browser import CHROMIUM_ARGS, require_browser, running_lab
from tests.conftest import write_json
from tests.fakes import fake_pynvml as fake

pytestmark = [pytest.mark.slow, pytest.mark.browser]

# Nothing listens on 127.0.0.1:9 (discard): a fetch there is the tracking pixel the issue describes.
HOSTILE = (
    "![t](http://127.0.0.1:9/pixel.png) [Session expired: sign in again](http://127.0.0.1:9/phish) "
    "<img src=pwn-x onerror=alert(1)> http://127.0.0.1:9/auto www.pwn.example ana@pwn.example :red[x]"
)
# A file name holds no '/': relative links and images, which would resolve on the app's own host.
HOSTILE_NAME = "![t](pwn.png) [Session expired](pwn-phish) www.pwn.example"
HOSTILE_TOKEN = "![t](http://127.0.0.1:9/tok.png)<img src=pwn-tok onerror=alert(1)>"

# Every link and image on the page, every element with an event handler attribute: those not of the app.
FOREIGN_ELEMENTS = """() => {
  const foreign = (u) => {
    try { const url = new URL(u, location.href);
          return url.host !== location.host || /pwn|phish|pixel|xss/i.test(url.pathname); }
    catch (e) { return true; }
  };
  const found = [];
  for (const a of document.querySelectorAll('a[href]')) if (foreign(a.href)) found.push(a.outerHTML);
  for (const el of document.querySelectorAll('img, iframe, source, video, audio'))
    if (foreign(el.src || el.srcset || '')) found.push(el.outerHTML);
  for (const el of document.querySelectorAll('[onerror], [onload], [onclick]')) found.push(el.outerHTML);
  return found.map((html) => html.slice(0, 200));
}"""


def hostile_lab(home, trained, hub_cache) -> dict[str, str]:
    """Fill the lab: datasets, a text, a model, an inspected SAE whose folder name, cfg.json and token texts are
    hostile, and jobs whose every text field is; returns (page title, URL path) of every page to open."""
    datasets, models = home / "datasets", home / "models"
    datasets.mkdir()
    models.mkdir()
    write_toy(datasets / f"{HOSTILE_NAME}.safetensors", tokens=4096, d_in=16, features=32, seed=0)
    (datasets / f"{HOSTILE_NAME}.txt").write_text("some text\n")
    (models / HOSTILE_NAME).mkdir()
    (models / HOSTILE_NAME / "config.json").write_text(json.dumps({"model_type": HOSTILE}))
    (hub_cache / f"models--pwn--{HOSTILE_NAME.replace('/', '')}").mkdir()

    sae = home / "saes" / HOSTILE_NAME
    shutil.copytree(trained["sae"], sae, ignore=shutil.ignore_patterns("inspect"))
    config = write_json(home / "inspect.json", {"sae": str(sae), "device": "cpu", "top_k": 6})
    assert inspect_main(["--config", str(config), "--out", str(home / "inspect-out")]) == 0
    tokens = sae / "inspect" / "tokens.json"
    tokens.write_text(json.dumps(dict.fromkeys(json.loads(tokens.read_text()), HOSTILE_TOKEN)))
    cfg = json.loads((sae / "cfg.json").read_text())
    cfg.update({"architecture": HOSTILE, "dtype": HOSTILE, "k": HOSTILE, "d_in": HOSTILE})
    cfg["metadata"] = {**cfg.get("metadata", {}), "trained_architecture": HOSTILE}
    write_json(sae / "cfg.json", cfg)
    build_sae_zip(sae)  # its download button's tooltip names the folder

    engine = db.get_engine(home)
    train = store.submit_job(
        TrainConfig(activation_source=HOSTILE, d_sae=64, total_steps=100), Submission("0", None), engine=engine
    )
    extract = ExtractConfig(
        model=HOSTILE, hook="h.0", dataset=HOSTILE, text_field=HOSTILE, split=HOSTILE, n_tokens=1000
    )
    extraction = store.submit_job(extract, Submission(None, 1), engine=engine)
    with db.write_session(engine) as session:  # rows as a person (or a hand-edited database) left them
        for job_id, status in ((train.id, "failed"), (extraction.id, "completed")):
            job = session.get(Job, job_id)
            job.name, job.submitted_by, job.status = HOSTILE, HOSTILE, status
            job.error = f"{HOSTILE}\n# {HOSTILE}"
            session.add(job)
        session.get(Job, train.id).out_dir = str(sae)
    latent = next(j for j in range(64) if read_inspection(sae).latent(j).top)
    sae_param = urllib.parse.quote(str(sae.relative_to(home)))
    return [
        ("SAE Lab", "/"),
        ("Monitor", "/monitor"),
        ("Train an SAE", "/train"),
        ("Extract activations", "/extract"),
        ("Jobs", f"/jobs?job={train.id}"),
        ("Jobs", f"/jobs?job={extraction.id}"),
        ("Trained SAEs", "/saes"),
        ("Explore latents", f"/explore?sae={sae_param}&latent={latent}"),
    ]


def settle(page, title: str) -> None:
    """The page's title is shown and the script has finished its run."""
    from playwright.sync_api import expect

    expect(page.get_by_role("heading", name=title, exact=True)).to_be_visible(timeout=60_000)
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=90_000)
    page.wait_for_timeout(1000)  # a fragment's first run


def shown(locator) -> str:
    """What a person reads in an element: its text without the invisible word joiners, spaces as one."""
    return " ".join(locator.inner_text().replace(WORD_JOINER, "").split())


def hover_every_tooltip(page) -> list[str]:
    """Tooltips render their markdown only while hovered: hover each and collect what appears."""
    found = []
    for target in page.locator('[data-testid="stTooltipHoverTarget"], [data-testid="stTooltipIcon"]').all():
        try:
            target.hover(timeout=2000)
        except Exception:  # noqa: BLE001  (hidden, or gone after a fragment's rerun)
            continue
        page.wait_for_timeout(300)
        found += page.evaluate(FOREIGN_ELEMENTS)
    return found


def test_hostile_text_renders_as_text_on_every_page(tmp_path, trained):
    chromium = require_browser()
    from playwright.sync_api import expect, sync_playwright

    hub_cache = tmp_path / "hf-hub"
    hub_cache.mkdir()
    gpus = fake.scenario(1, name=HOSTILE)
    with (
        running_lab(tmp_path, gpus, HF_HUB_CACHE=str(hub_cache)) as (url, home),
        sync_playwright() as pw,
    ):
        pages = hostile_lab(home, trained, hub_cache)
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2400})
        page.set_default_timeout(60_000)
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        for title, path in pages:
            page.goto(url + path)
            settle(page, title)
            if title == "Extract activations":  # the hooks command's refusal names the model's folder
                expect(page.get_by_test_id("stAlertContentError").first).to_be_visible(timeout=90_000)
            found = page.evaluate(FOREIGN_ELEMENTS) + hover_every_tooltip(page)
            assert found == [], (path, found)
            assert page.get_by_test_id("stAppDeployButton").count() == 0, path
            assert page.get_by_role("button", name="Deploy").count() == 0, path

        # Shown, as text (less the invisible word joiners): the job's name, the submitter, the error.
        page.goto(url + next(path for title, path in pages if title == "Jobs"))  # the training
        settle(page, "Jobs")
        assert HOSTILE in shown(page.locator("h3").first)
        assert HOSTILE in shown(page.get_by_test_id("stMetric").filter(has_text="Submitted by"))
        assert f"# {HOSTILE}" in shown(page.get_by_test_id("stAlertContentError").first)
        page.get_by_test_id("stSelectbox").first.click()  # the job picker's options: plain text
        page.wait_for_timeout(500)
        assert page.evaluate(FOREIGN_ELEMENTS) == []
        browser.close()

    assert [r for r in requests if is_hostile(r)] == []


def is_hostile(address: str) -> bool:
    """A request for what the hostile text names: its host, or a relative image or link on the app's host
    (the app's own URLs may carry the names in their query, as the Explore page's does)."""
    parts = urllib.parse.urlsplit(address)
    return parts.netloc == "127.0.0.1:9" or bool(re.search(r"pwn|phish|pixel|xss", parts.netloc + parts.path))
