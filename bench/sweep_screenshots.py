"""Screenshots of a sweep for the README: its Jobs page (members, a loss line per member) and the SAEs page's
comparison view (L0 against FVU, the frontier), with the same headless Chromium as the e2e tests.

A throwaway SAE_LAB_HOME with the toy dataset and one real sweep job (8 members: TopK and BatchTopK, d_sae 256
and 1024, k 4 and 16; 2 CPU processes, placement members) that the app's launcher runs.

    .venv/bin/python -m bench.sweep_screenshots [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from sae_core.data.catalog import TOY_DEFAULTS
from sae_core.data.toy import write_toy
from sae_core.files import TOY_FILE
from sae_core.jobs import store, submission
from sae_core.jobs.placement import Submission
from sae_core.sweep import sweep_from_dict
from tests.app.test_e2e_browser import CHROMIUM_ARGS, chromium_path, running_lab

REPO = Path(__file__).resolve().parent.parent


def submit_sweep(home: Path) -> int:
    toy = home / "datasets" / TOY_FILE
    write_toy(toy, **TOY_DEFAULTS)
    grid = {"architecture": ["topk", "batchtopk"], "d_sae": [256, 1024], "k": [4, 16]}
    sweep = sweep_from_dict({"activation_source": str(toy), "total_steps": 300, "batch_size": 2048, "log_every": 5,
                             "checkpoint_every": 300, "device": "cpu", "sweep": grid})  # fmt: skip
    job, _ = submission.submit(sweep, Submission(None, 2, name="toy-grid", submitted_by="ana"))
    return job.id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="sae_lab_sweep_shots_"))
    try:
        with running_lab(tmp) as (url, home), sync_playwright() as pw:
            os.environ["SAE_LAB_HOME"] = str(home)
            job_id = submit_sweep(home)
            browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 1700})
            page.set_default_timeout(60_000)
            page.goto(url)  # the first visit starts the launcher daemon
            deadline = time.time() + 900
            while store.get_job(job_id).status not in ("completed", "failed", "cancelled") and time.time() < deadline:
                time.sleep(2)
            print("sweep job:", store.get_job(job_id).status)
            page.goto(f"{url}/jobs?job={job_id}")
            expect(page.locator("h3", has_text="toy-grid")).to_be_visible()
            time.sleep(3)
            page.screenshot(path=args.out / "sweep_jobs.png", full_page=True)
            page.set_viewport_size({"width": 1440, "height": 1100})
            page.goto(url + "/saes")
            page.get_by_text("Compare", exact=True).first.click()
            expect(page.locator("[data-testid='stVegaLiteChart']").first).to_be_visible()
            page.mouse.move(0, 0)
            time.sleep(3)
            page.screenshot(path=args.out / "sweep_compare.png", full_page=True)
            browser.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("screenshots in", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
