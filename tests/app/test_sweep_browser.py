"""A sweep end to end in a real headless Chromium: a 2 x 2 grid submitted from the Train page, its members
followed on the Jobs page until the launcher completes them, the SAEs page's comparison view with the frontier,
and a click on a point that opens that member in Explore. Skips without Chromium unless SAE_LAB_REQUIRE_BROWSER=1."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest

from sae_core.outputs import sweep_members
from tests.app.test_e2e_browser import CHROMIUM_ARGS, button, fill, require_browser, running_lab

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def click_a_point(page, chart, attempts: int = 3) -> str:
    """Hover over the chart until Vega's tooltip shows a point, then click there; returns the tooltip's text.
    (The points' pixels are Vega's to place: the mouse finds them as a person's would.)"""
    for _ in range(attempts):
        page.wait_for_timeout(1000)  # the chart drawn after its data arrived
        if (found := hover_and_click(page, chart)) is not None:
            return found
    raise AssertionError("no point of the chart answered the mouse")


def hover_and_click(page, chart) -> str | None:
    box = chart.bounding_box()
    tooltip = page.locator("#vg-tooltip-element.visible")
    for y in range(int(box["y"]) + 5, int(box["y"] + box["height"]) - 5, 5):
        for x in range(int(box["x"]) + 40, int(box["x"] + box["width"]) - 5, 5):
            page.mouse.move(x, y)
            if tooltip.count():
                text = tooltip.inner_text()
                page.mouse.click(x, y)
                return text
    return None


def test_a_sweep_from_the_train_page_to_the_frontier_and_a_member_in_explore(tmp_path):
    chromium = require_browser()
    from playwright.sync_api import expect, sync_playwright

    with running_lab(tmp_path) as (url, home), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(60_000)
        page.goto(url)
        button(page, "Create toy dataset").click()
        expect(page.get_by_text("Created")).to_be_visible()

        page.goto(url + "/train")
        expect(page.get_by_text("the job runs as CPU processes")).to_be_visible()
        page.get_by_text("Train a grid of SAEs (sweep)").click()
        expect(page.get_by_label("d_sae values", exact=True)).to_be_visible(timeout=30_000)
        for label, value in (("Steps", "40"), ("Checkpoint every (steps)", "20"), ("Job name", "grid"),
                             ("Your name", "e2e-bot")):  # fmt: skip
            fill(page, label, value)
        fill(page, "d_sae values", "64, 128")
        fill(page, "k (active latents per token) values", "4, 8")
        expect(page.get_by_text(re.compile(r"4 SAEs"))).to_be_visible()
        submit = button(page, "Submit")
        expect(submit).to_be_enabled()
        submit.click()
        expect(page.get_by_text("Job 1 queued.")).to_be_visible()

        # Jobs: the sweep's members, each with its status, until the launcher has run them all.
        page.goto(url + "/jobs?job=1")
        expect(page.locator("h3", has_text="grid")).to_be_visible()
        expect(page.get_by_text("d_sae=128,k=8").first).to_be_attached()  # a cell of the members table
        expect(page.locator("h3", has_text="completed")).to_be_visible(timeout=300_000)
        assert [m.status for m in sweep_members(home / "jobs" / "1")] == ["completed"] * 4

        # SAEs: the comparison view of the sweep, its frontier, and a click that opens a member in Explore.
        page.goto(url + "/saes")
        page.get_by_text("Compare", exact=True).first.click()
        expect(page.get_by_text("L0", exact=False).first).to_be_visible()
        chart = page.locator("[data-testid='stVegaLiteChart']").first
        expect(chart).to_be_visible()
        shown = click_a_point(page, chart)
        page.wait_for_url(re.compile(r"/explore\?sae="), timeout=30_000)
        member = unquote(page.url.split("sae=", 1)[1]).removeprefix("jobs/1/")
        assert member in {m.name for m in sweep_members(home / "jobs" / "1")}
        assert member in shown  # the point clicked is the member opened
        expect(page.get_by_text("has not been inspected yet")).to_be_visible()
        page.screenshot(path=str(tmp_path / "explore.png"))
        browser.close()
