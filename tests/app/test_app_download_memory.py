"""A multi-GB SAE must not be read into the server's memory on reruns of the page that offers it.

The peak resident memory of this (AppTest = server) process is sampled every few ms while the page
reruns; a control script that does read the file shows the same measurement catches a 1 GB read."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil
import pytest
from streamlit.testing.v1 import AppTest

from sae_core import files, outputs
from sae_core.jobs import store

SIZE = 1024**3
MiB = 1024**2


class PeakRss:
    """Highest RSS seen while the block runs, minus the RSS when it started."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.proc = psutil.Process()

    def __enter__(self) -> PeakRss:
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _sparse(path: Path, size: int = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size)  # no disk blocks, but reading it yields `size` bytes
    return path


def _big_sae(directory: Path) -> Path:
    (directory).mkdir(parents=True, exist_ok=True)
    (directory / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 4096, "d_sae": 65536, "k": 64}))
    _sparse(directory / "sae_weights.safetensors")
    (directory / "eval.json").write_text(json.dumps({"fvu": 0.1}))
    _sparse(directory / files.SAE_ZIP_FILE, SIZE + 4096)  # a prepared zip, newer than its members
    assert outputs.zip_is_current(directory / files.SAE_ZIP_FILE, directory)
    return directory


@pytest.mark.parametrize("page", ["views/jobs.py", "views/saes.py"])
def test_offered_1gb_download_is_not_read_on_reruns(lab, page):
    job_id = lab.job("completed")
    _big_sae(Path(store.get_job(job_id).out_dir))
    at = lab.page(page)
    assert not at.exception, [e.value for e in at.exception]
    buttons = [b for b in at.get("download_button") if b.key in ("job_download_zip", "saes_download")]
    assert len(buttons) == 1 and "1.0 GiB" in buttons[0].proto.label
    at.run()  # warm caches
    with PeakRss() as rss:
        for _ in range(5):
            at.run()
    assert not at.exception
    assert rss.growth < 100 * MiB, f"peak RSS grew {rss.growth / MiB:.0f} MiB over 5 reruns"


def test_the_measurement_catches_a_page_that_reads_the_file(tmp_path):
    big = _sparse(tmp_path / "big.bin")

    def eager_page(path: str) -> None:
        import streamlit as st

        with open(path, "rb") as fh:
            st.download_button("Download", data=fh.read(), file_name="big.bin")

    at = AppTest.from_function(eager_page, args=(str(big),), default_timeout=60)
    with PeakRss() as rss:
        at.run()
    assert rss.growth > 900 * MiB
