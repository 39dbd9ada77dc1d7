"""Where training metrics go. The trainer writes every record to each sink; sinks decide how.

`metrics.jsonl` in the output dir always; the SQLite store too when the job was started by the
launcher (SAE_LAB_JOB_ID set), so the web pages can chart it live.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol


class MetricsSink(Protocol):
    def write(self, record: dict) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per line, flushed per record so a crash loses nothing logged."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def default_sinks(out_dir: str | Path) -> list[MetricsSink]:
    sinks: list[MetricsSink] = [JsonlSink(Path(out_dir) / "metrics.jsonl")]
    job_id = os.environ.get("SAE_LAB_JOB_ID")
    if job_id:
        from .store import SqliteMetricsSink  # only jobs started by the launcher pay for SQLModel

        sinks.append(SqliteMetricsSink(job_id=int(job_id), home=None))
    return sinks


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
