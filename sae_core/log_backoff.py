"""A problem that comes back on every pass of a loop (a full disk, a locked or vanished database) is logged once,
then again only with back-off while it lasts, and once more when it clears: one line per distinct problem,
not a traceback a second. Used by the launcher's queue loop and its GPU sampler."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

FIRST_REPEAT_S = 60.0  # a problem still there is said again after a minute, then after 2, 4, ... minutes
MAX_REPEAT_S = 3600.0


@dataclass
class _Seen:
    count: int
    first: float
    next_report: float
    gap: float


class ProblemLog:
    """What `loop` logs about its failing passes. `failed(exc)` on each failed pass, `succeeded()` on each good
    one. Exceptions of the `expected` types (the environment's: disk, permissions, database) are one line;
    anything else is a bug, and its first occurrence also logs the traceback."""

    def __init__(
        self,
        logger: logging.Logger,
        loop: str,
        expected: tuple[type[BaseException], ...] = (OSError,),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.logger, self.loop, self.expected, self.clock = logger, loop, expected, clock
        self._seen: dict[str, _Seen] = {}  # the problems of the current run of failures

    def failed(self, exc: BaseException) -> None:
        problem, now = describe(exc), self.clock()
        seen = self._seen.get(problem)
        if seen is None:
            self._seen[problem] = _Seen(1, now, now + FIRST_REPEAT_S, FIRST_REPEAT_S)
            trace = None if isinstance(exc, self.expected) else exc
            self.logger.error("%s failed: %s; retrying (said again only while it lasts)", self.loop, problem,
                              exc_info=trace)  # fmt: skip
            return
        seen.count += 1
        if now >= seen.next_report:
            self.logger.error(
                "%s still failing (%d times in %.0f s): %s", self.loop, seen.count, now - seen.first, problem
            )
            seen.gap = min(seen.gap * 2, MAX_REPEAT_S)
            seen.next_report = now + seen.gap

    def succeeded(self) -> None:
        if self._seen:
            failures = sum(seen.count for seen in self._seen.values())
            self.logger.info("%s works again (after %d failed passes)", self.loop, failures)
            self._seen.clear()


def describe(exc: BaseException) -> str:
    """The problem in one line: the exception's type and the first line of what it says."""
    said = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {said[:300]}" if said else type(exc).__name__
