"""Training straight from a model, end to end in a real headless Chromium: a tiny GPT-2 in SAE_LAB_HOME/models and
a text in datasets/, "From a model" on the Train page with two hooks (a sweep over hook: one forward feeds both),
run by the launcher to completion on the Jobs page, and both hooks' SAEs side by side in the SAEs page's
comparison view. Skips without Chromium unless SAE_LAB_REQUIRE_BROWSER=1."""

from __future__ import annotations

import re
import shutil

import pytest

from sae_core.outputs import sweep_members
from tests.app.test_e2e_browser import CHROMIUM_ARGS, button, fill, require_browser, running_lab
from tests.hf_models import write_corpus

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def test_a_sweep_over_two_hooks_of_a_model_from_the_train_page_to_the_comparison_view(tmp_path, hf):
    chromium = require_browser()
    from playwright.sync_api import expect, sync_playwright

    with running_lab(tmp_path) as (url, home), sync_playwright() as pw:
        shutil.copytree(hf["gpt2"], home / "models" / "tiny-gpt2")
        (home / "datasets").mkdir(exist_ok=True)
        write_corpus(home / "datasets" / "corpus.txt", n_documents=1000)
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(60_000)
        page.goto(url + "/train")
        page.get_by_text("From a model", exact=True).click()
        expect(page.get_by_text("GPT2LMHeadModel", exact=False)).to_be_visible(timeout=90_000)
        hooks = page.get_by_role("combobox", name=re.compile("Hooks"))
        hooks.click()
        page.get_by_role("option", name=re.compile(r"transformer\.h\.[01] ")).first.click()
        page.keyboard.press("Escape")
        for label, value in (("d_sae (latents)", "64"), ("k (active latents per token)", "4"), ("Steps", "20"),
                             ("Global batch (tokens per step)", "128"), ("Context size", "16"),
                             ("Checkpoint every (steps)", "10"), ("Job name", "gpt2-hooks"),
                             ("Your name", "e2e-bot")):  # fmt: skip
            fill(page, label, value)
        submit = button(page, "Submit")
        expect(submit).to_be_enabled()
        submit.click()
        expect(page.get_by_text("Job 1 queued.")).to_be_visible()

        page.goto(url + "/jobs?job=1")
        expect(page.locator("h3", has_text="gpt2-hooks")).to_be_visible()
        expect(page.locator("h3", has_text=re.compile("completed|failed|cancelled"))).to_be_visible(timeout=300_000)
        expect(page.locator("h3", has_text="completed")).to_be_visible(timeout=1_000)
        members = sweep_members(home / "jobs" / "1")
        assert sorted(m.name for m in members) == ["hook=transformer.h.0", "hook=transformer.h.1"]
        assert all(m.status == "completed" and m.figures["holdout_kind"] == "contexts" for m in members)

        page.goto(url + "/saes")
        page.get_by_text("Compare", exact=True).first.click()
        expect(page.locator("[data-testid='stVegaLiteChart']").first).to_be_visible()
        expect(page.get_by_text("hook=transformer.h.1").first).to_be_attached()  # a row of the table
        browser.close()
