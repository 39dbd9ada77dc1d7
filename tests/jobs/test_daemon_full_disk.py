"""A full disk under the running launcher (issue 21, item 9e): its queue loop and its GPU sampler each say so in
one line, not a traceback every pass, and say once when it is over.

The disk cannot be filled for a test: the store layer's read of the queue and the sampler's write raise what a
full disk raises (OSError ENOSPC) while the test says so; everything else is the real daemon on a real lab.db."""

from __future__ import annotations

import errno
import logging
import threading
import time

from sae_core import db
from sae_core.gpu import history
from sae_core.jobs import daemon
from tests.fakes.fixtures import fake_gpus  # noqa: F401  (fixture)

PASSES = 40  # failed passes of each loop before the disk is freed


def test_a_full_disk_is_one_line_per_loop_not_a_traceback_a_pass(lab_home, fake_gpus, monkeypatch, caplog):  # noqa: F811
    caplog.set_level(logging.INFO)
    fake_gpus.set(n_gpus=1)
    db.get_engine()
    full = threading.Event()
    full.set()
    calls = {"queue": 0, "sample": 0}

    def failing(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            if full.is_set():
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(daemon.store, "list_jobs", failing("queue", daemon.store.list_jobs))
    monkeypatch.setattr(history, "write_probe", failing("sample", history.write_probe))
    stop = threading.Event()
    serving = threading.Thread(
        target=daemon.serve, args=(lab_home,), kwargs={"interval_s": 0.01, "sampler_interval_s": 0.01, "stop": stop}
    )
    serving.start()
    try:
        wait_until(lambda: min(calls.values()) >= PASSES)
        full.clear()
        freed_at = dict(calls)
        wait_until(lambda: all(calls[name] >= freed_at[name] + 3 for name in calls))
    finally:
        stop.set()
        serving.join(30)
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]  # every warning and error of the daemon
    assert sorted(r.getMessage().split(" failed:")[0] for r in said) == ["GPU sample", "launcher pass"]
    assert all("[Errno 28] No space left on device" in r.getMessage() and r.exc_info is None for r in said)
    again = [r.getMessage() for r in caplog.records if "works again" in r.getMessage()]
    assert sorted(line.split(" works again")[0] for line in again) == ["GPU sample", "launcher pass"]


def wait_until(condition, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the daemon's loops did not run"
        time.sleep(0.01)
