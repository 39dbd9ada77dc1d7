"""Where training metrics go: the sink interface the trainer writes to, and the metrics.jsonl sink.

The trainer writes every record to each sink and knows nothing else about them; the entry point
(`sae_core.train`) adds the job store's SQLite sink when the launcher started the run.
"""

from __future__ import annotations

import json
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


def report_done(sinks: list[MetricsSink], summary: dict) -> None:
    """The run's last record (a "done" event with its summary) to every sink, which then closes; and the
    same summary on stdout, where the job's log shows it."""
    for sink in sinks:
        sink.write({"event": "done", **summary})
        sink.close()
    print(f"done: {json.dumps(summary)}", flush=True)
