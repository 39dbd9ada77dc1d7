"""A problem repeated every pass is logged once, then with back-off while it lasts, then once when it clears."""

from __future__ import annotations

import errno
import logging

from sae_core import log_backoff
from sae_core.log_backoff import ProblemLog

FULL = OSError(errno.ENOSPC, "No space left on device")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_distinct_problem_with_back_off_and_one_when_it_clears(caplog):
    caplog.set_level(logging.INFO)
    clock = Clock()
    problems = ProblemLog(logging.getLogger("test.loop"), "queue pass", clock=clock)
    for second in range(2 * 3600):  # two hours of a full disk, one failed pass a second
        clock.now = float(second)
        problems.failed(FULL)
    lines = [r.getMessage() for r in caplog.records]
    assert (
        lines[0]
        == "queue pass failed: OSError: [Errno 28] No space left on device; retrying (said again only while it lasts)"
    )
    # again after 1, 2, 4, ... minutes, then hourly: at 60, 180, 420, 900, 1860, 3780 and 7380 s (not reached)
    repeats = [line for line in lines[1:] if line.startswith("queue pass still failing")]
    assert len(lines) == 7 and len(repeats) == 6
    assert repeats[0] == "queue pass still failing (61 times in 60 s): OSError: [Errno 28] No space left on device"
    assert all(r.exc_info is None for r in caplog.records)  # the environment's trouble: no traceback
    caplog.clear()
    problems.failed(PermissionError(errno.EACCES, "Permission denied"))  # another problem: said at once
    problems.failed(FULL)  # the first, still in this run of failures: not said again yet
    problems.succeeded()
    problems.succeeded()
    assert [r.getMessage() for r in caplog.records] == [
        "queue pass failed: PermissionError: [Errno 13] Permission denied; retrying (said again only while it lasts)",
        f"queue pass works again (after {2 * 3600 + 2} failed passes)",
    ]


def test_an_unexpected_exception_keeps_its_traceback_once(caplog):
    problems = ProblemLog(logging.getLogger("test.loop"), "queue pass", clock=Clock())
    for _ in range(100):
        try:
            {}["missing"]
        except KeyError as exc:
            problems.failed(exc)
    (record,) = caplog.records
    assert record.exc_info is not None and record.getMessage().startswith("queue pass failed: KeyError: 'missing'")
    assert log_backoff.describe(RuntimeError("two\nlines")) == "RuntimeError: two"
