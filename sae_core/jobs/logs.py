"""A job's console logs: where they are, and their last lines without reading a huge file whole."""

from __future__ import annotations

import os
from pathlib import Path

from ..db.tables import Job
from ..files import LOGS_DIR


def log_dir_of(job: Job) -> Path:
    return Path(job.out_dir) / LOGS_DIR


def tail_text(path: Path, max_bytes: int = 16_384) -> str:
    """The end of a (possibly huge) log, at most `max_bytes` of it, from a line start; "" if missing."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    if size > max_bytes and "\n" in text:
        text = text.split("\n", 1)[1]  # drop the partial first line
    return text


def tail_lines(path: Path, max_lines: int = 15, max_chars: int = 1500, max_bytes: int = 64_000) -> str:
    """The last `max_lines` non-blank lines of a log (at most `max_chars`), for error messages."""
    lines = [line.rstrip() for line in tail_text(path, max_bytes).splitlines() if line.strip()]
    return "\n".join(lines[-max_lines:])[-max_chars:]
