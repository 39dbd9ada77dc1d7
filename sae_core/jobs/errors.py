"""The queue's refusals, phrased for a person."""

from __future__ import annotations


class JobError(ValueError):
    """A job operation that cannot be done (no such job, a final job cancelled, a bad placement...)."""
