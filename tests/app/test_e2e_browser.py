"""End to end in a real headless Chromium: a fresh SAE_LAB_HOME, `streamlit run app.py`, the toy dataset
created from the Home page, a 2-process CPU job submitted from the Train page, followed to `completed`
on the Jobs page (the app starts the real launcher daemon), the SAE zip downloaded through the browser
and loaded with sae_core. Skips without Chromium unless SAE_LAB_REQUIRE_BROWSER=1 (CI)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import psutil
import pytest

from sae_core.jobs import daemon_control
from sae_core.latents import read_inspection
from tests.conftest import REPO, subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("SAE_LAB_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def require_browser() -> str:
    path = chromium_path()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        message = "Chromium (Debian package `chromium`) and Python playwright are needed for the browser test"
        if os.environ.get("SAE_LAB_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (SAE_LAB_REQUIRE_BROWSER=1)")
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError("streamlit did not become healthy")


def start_streamlit(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    """`streamlit run app.py` on a loopback port, in its own process group (so it can be stopped whole)."""
    argv = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true"]
    argv += ["--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    # Module reloads on file change would re-declare the SQLModel tables mid-test.
    argv += ["--server.fileWatcherType", "none"]
    with open(log, "wb") as out:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def lab_env(home: Path, tmp_path: Path, scenario: dict | None = None, **extra: str) -> dict[str, str]:
    """A fresh lab with no GPU, as on CI: the fake NVML says "no driver" even on a GPU machine, so jobs
    are CPU jobs (or the fake GPUs of `scenario`)."""
    from tests.fakes import fake_pynvml

    fake = fake_pynvml.write_scenario(tmp_path / "gpus.json", scenario or fake_pynvml.no_driver())
    env = subprocess_env(SAE_LAB_HOME=str(home), OMP_NUM_THREADS="1", **fake_pynvml.env_for(fake), **extra)
    if "SAE_LAB_PASSWORD" not in extra:
        env.pop("SAE_LAB_PASSWORD", None)
    return env


def processes_of(home: Path) -> list[psutil.Process]:
    """Processes working in this lab (the daemon runs in SAE_LAB_HOME; job ranks under jobs/<id>)."""
    found = []
    for proc in psutil.process_iter(["cwd", "environ"]):
        try:
            env = proc.info.get("environ") or {}
            if env.get("SAE_LAB_HOME") == str(home) and proc.pid != os.getpid():
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def launcher_processes(home: Path) -> list[psutil.Process]:
    """The lab's processes that the app started (everything but the streamlit server itself)."""
    return [p for p in processes_of(home) if "streamlit" not in " ".join(p.cmdline())]


def stop_everything(server: subprocess.Popen, home: Path) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(5)
    status = daemon_control.daemon_status(home)
    if status.running and status.pid:
        os.kill(status.pid, signal.SIGTERM)  # the daemon stops its sampler and exits on SIGTERM
    deadline = time.time() + 20
    while processes_of(home) and time.time() < deadline:
        time.sleep(0.2)
    for proc in processes_of(home):  # anything left is a bug, but must not outlive the test
        proc.kill()


@contextlib.contextmanager
def running_lab(tmp_path: Path, scenario: dict | None = None, **extra_env: str):
    """(url, home) of a real app on a free port over a fresh SAE_LAB_HOME (and the fake GPUs of `scenario`);
    on exit the app, its launcher daemon and every job process are stopped, and none may be left."""
    home = tmp_path / "lab"
    home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_streamlit(port, lab_env(home, tmp_path, scenario, **extra_env), tmp_path / "streamlit.log")
    try:
        wait_healthy(url, server)
        yield url, home
    finally:
        stop_everything(server, home)
    assert not processes_of(home), "a lab process outlived the test"


def fill(page, label: str, value: str, attempts: int = 3) -> None:
    """Type into the field labelled `label` and commit it (Enter), as a person would; again if a rerun of the page
    that was still running when it was typed put the old value back."""
    field = page.get_by_label(label, exact=True)
    for _ in range(attempts):
        field.fill(value)
        field.press("Enter")
        page.wait_for_timeout(400)  # the rerun the Enter started
        if same_value(field.input_value(), value):
            return
    raise AssertionError(f"{label}: {value!r} did not stay in the field (it shows {field.input_value()!r})")


def same_value(shown: str, typed: str) -> bool:
    """A number field shows what was typed in its own format (2 -> 2.00)."""
    try:
        return float(shown.replace(",", "")) == float(typed.replace(",", ""))
    except ValueError:
        return shown == typed


def button(page, label: str):
    return page.get_by_role("button", name=re.compile(re.escape(label)))


def test_toy_dataset_cpu_job_to_completion_and_download(tmp_path):
    chromium = require_browser()
    from playwright.sync_api import expect, sync_playwright

    with running_lab(tmp_path) as (url, home), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(accept_downloads=True, viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)

        # Home: a first run offers the toy dataset.
        button(page, "Create toy dataset").click()
        expect(page.get_by_text("Created")).to_be_visible()
        assert (home / "datasets" / "toy.safetensors").is_file()

        # Train: a small 2-process CPU job.
        page.goto(url + "/train")
        expect(page.get_by_text("the job runs as CPU processes")).to_be_visible()
        for label, value in (("d_sae (latents)", "128"), ("k (active latents per token)", "8"), ("Steps", "60"),
                             ("Checkpoint every (steps)", "30"), ("Job name", "e2e"), ("Your name", "e2e-bot")):  # fmt: skip
            fill(page, label, value)
        expect(page.get_by_text("2 process(es) × 2,048 tokens each per step")).to_be_visible()
        submit = button(page, "Submit")
        expect(submit).to_be_enabled()
        submit.click()
        expect(page.get_by_text("Job 1 queued.")).to_be_visible()
        page.get_by_role("link", name=re.compile("Open job 1")).click()

        # Jobs: the page refreshes itself until the launcher has run the job to the end.
        expect(page.locator("h3", has_text="e2e")).to_be_visible()
        expect(page.locator("h3", has_text="completed")).to_be_visible(timeout=240_000)

        button(page, "Prepare SAE download").click()
        with page.expect_download(timeout=60_000) as download_info:
            button(page, "Download SAE").click()
        zip_path = tmp_path / "sae.zip"
        download_info.value.save_as(zip_path)
        browser.close()

    with zipfile.ZipFile(zip_path) as zf:
        assert sorted(zf.namelist()) == ["cfg.json", "eval.json", "sae_weights.safetensors", "sparsity.safetensors"]
        zf.extractall(tmp_path / "sae")
    from sae_core.sae import load

    sae = load(tmp_path / "sae")
    assert (sae.d_in, sae.d_sae) == (64, 128)


def test_password_gate_holds_for_every_url(tmp_path):
    """With SAE_LAB_PASSWORD set, a deep link shows only the sign-in form until the password is given, then
    the page it named; the password never reaches the launcher the app starts."""
    chromium = require_browser()
    from playwright.sync_api import expect, sync_playwright

    with running_lab(tmp_path, SAE_LAB_PASSWORD="open sesame") as (url, _home), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(30_000)
        for path in ("/train", "/", "/jobs?job=1"):
            page.goto(url + path)
            expect(page.get_by_label("Password", exact=True)).to_be_visible()
            assert page.get_by_role("heading", name="Jobs").count() == 0
            assert page.get_by_text("Launcher", exact=True).count() == 0  # no sidebar either
            assert page.get_by_text("Page not found").count() == 0  # every page's URL asks for the password
        page.get_by_label("Password", exact=True).fill("wrong")
        button(page, "Enter").click()
        expect(page.get_by_text("Wrong password.")).to_be_visible()
        page.get_by_label("Password", exact=True).fill("open sesame")
        button(page, "Enter").click()
        expect(page.get_by_role("heading", name="Jobs")).to_be_visible()  # the page the deep link named
        expect(page.get_by_text("Launcher", exact=True)).to_be_visible()
        assert "/jobs" in page.url
        browser.close()
        deadline = time.time() + 30
        while not (lab_processes := launcher_processes(_home)) and time.time() < deadline:
            time.sleep(0.5)  # the app starts the launcher once signed in
        assert lab_processes, "the app started no launcher"
        for proc in lab_processes:
            assert "SAE_LAB_PASSWORD" not in proc.environ(), proc.cmdline()


def test_extract_from_a_model_then_train_evaluate_inspect_and_explore(tmp_path, hf):
    """The front door: a tiny GPT-2 in SAE_LAB_HOME/models and a text file in datasets/, an extraction with a
    training and an evaluation after it submitted from the Extract page, all run by the launcher, the SAE
    downloaded; then an inspection queued from the Explore page and a latent's top context opened there."""
    chromium = require_browser()
    from playwright.sync_api import expect, sync_playwright

    with running_lab(tmp_path) as (url, home), sync_playwright() as pw:
        shutil.copytree(hf["gpt2"], home / "models" / "tiny-gpt2")
        (home / "datasets").mkdir(exist_ok=True)
        shutil.copy(hf["corpus"], home / "datasets" / "corpus.txt")
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(accept_downloads=True, viewport={"width": 1400, "height": 1600})
        page.set_default_timeout(60_000)
        page.goto(url + "/extract")
        expect(page.get_by_text("GPT2LMHeadModel", exact=False)).to_be_visible(timeout=90_000)  # the hooks command
        for label, value in (("Tokens (rows)", "2000"), ("Context size", "32"), ("CPU processes", "1")):
            fill(page, label, value)
        page.get_by_text("Then train an SAE on the result").click()
        for label, value in (
            ("Expansion factor", "2"),
            ("Steps", "30"),
            ("Global batch", "256"),
            ("k (active latents per token)", "4"),
        ):
            fill(page, label, value)
        expect(page.get_by_text("d_sae = 2 × 32 = 64 · 200 rows held out for evaluation")).to_be_visible()
        page.get_by_text("Then evaluate it with the model").click()
        fill(page, "Held-out contexts to evaluate on", "4")
        fill(page, "Job name", "e2e-x")
        fill(page, "Your name", "e2e-bot")
        submit = button(page, "Submit")
        expect(submit).to_be_enabled()
        submit.click()
        expect(page.get_by_text("Extraction job 1 queued, then training job 2, then evaluation job 3.")).to_be_visible()

        page.goto(url + "/jobs?job=3")
        expect(page.locator("h3", has_text="e2e-x (evaluate)")).to_be_visible()
        final = page.locator("h3", has_text=re.compile("completed|failed|cancelled"))
        expect(final).to_be_visible(timeout=400_000)
        expect(page.locator("h3", has_text="completed")).to_be_visible(timeout=1_000)
        expect(page.get_by_text("CE loss recovered")).to_be_visible()
        page.goto(url + "/jobs?job=2")
        expect(page.locator("h3", has_text="completed")).to_be_visible()
        button(page, "Prepare SAE download").click()
        with page.expect_download(timeout=60_000) as download_info:
            button(page, "Download SAE").click()
        zip_path = tmp_path / "sae.zip"
        download_info.value.save_as(zip_path)

        page.goto(url + "/explore?sae=jobs/2")
        expect(page.get_by_text("has not been inspected yet")).to_be_visible()
        fill(page, "Rows to inspect", "2000")
        fill(page, "Your name", "e2e-bot")
        button(page, "Inspect this SAE").click()
        expect(page.get_by_text("Inspection job 4 queued.")).to_be_visible()
        page.goto(url + "/jobs?job=4")
        expect(page.locator("h3", has_text=re.compile("completed|failed|cancelled"))).to_be_visible(timeout=300_000)
        expect(page.locator("h3", has_text="completed")).to_be_visible(timeout=1_000)
        inspection = read_inspection(home / "jobs" / "2")
        latent = next(j for j in range(inspection.d_sae) if inspection.latent(j).top)
        top = inspection.latent(latent).top[0]
        page.goto(url + f"/explore?sae=jobs/2&latent={latent}")
        expect(page.get_by_text(f"Latent {latent}", exact=True)).to_be_visible()
        peak = page.locator(".sae-token[style*=outline]").first
        expect(peak).to_be_visible()
        expect(peak).to_have_text(top.tokens[top.peak].replace("\n", "↵"))
        browser.close()

    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(tmp_path / "sae")
    from sae_core.sae import load

    sae = load(tmp_path / "sae")
    assert (sae.d_in, sae.d_sae) == (32, 64)
    figures = json.loads((tmp_path / "sae" / "eval.json").read_text())
    assert figures["eval_contexts"] == 4 and "ce_loss_score" in figures  # the download carries the evaluation
