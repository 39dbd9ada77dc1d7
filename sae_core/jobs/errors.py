"""The queue's refusals, phrased for a person, and the gate's answer to an error none of its checks named."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sae_core.gate")

UNEXPECTED = "could not be checked: an unexpected error (the server log has the details)"


class JobError(ValueError):
    """A job operation that cannot be done (no such job, a final job cancelled, a bad placement...)."""


def unexpected(field: str) -> tuple[str, str]:
    """(field, message) for the exception being handled: one line for the person, which names the field and
    reveals nothing of the server; the traceback goes to the server log. Call it inside an `except`."""
    log.exception("submission gate: unexpected error while checking %s", field)
    return field, f"{field}: {UNEXPECTED}"


def guarded(field: str, *, with_value: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """For one of the gate's checks, which returns its problems as [(field, message)] (or (value, problems)
    `with_value`): an exception it did not turn into a problem itself becomes `unexpected(field)`."""

    def decorate(check: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(check)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return check(*args, **kwargs)
            except Exception:  # noqa: BLE001  (the gate's safety net: logged, and named by field)
                problems = [unexpected(field)]
                return (None, problems) if with_value else problems

        return run

    return decorate
