"""Why a job failed, in one paragraph: the root cause read from torchrun's error files and logs."""

from __future__ import annotations

import contextlib
import json
import re
import signal
from dataclasses import dataclass
from pathlib import Path

from ..files import EXIT_FILE, REFUSED_FILE, STDERR_LOG, TORCHRUN_ERROR_FILE, TORCHRUN_LOG_DIR
from .logs import tail_lines


def read_exit_code(log_dir: Path) -> int | None:
    """torchrun's exit code as recorded by jobwrap; None if it never got to write it."""
    try:
        return int(json.loads((Path(log_dir) / EXIT_FILE).read_text())["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


# Errors a rank raises because ANOTHER rank died first: never the root cause when a better one exists.
_SECONDARY_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "remote worker hanging",
    "SignalException",
    "got signal",
    "KeyboardInterrupt",
    "Broken pipe",
)


def _is_secondary(message: str) -> bool:
    return any(marker in message for marker in _SECONDARY_MARKERS)


def _error_message(data: dict) -> str:
    message = data.get("message", "")
    if isinstance(message, dict):
        message = message.get("message") or message.get("extraInfo", {}).get("py_callstack", "")
    return str(message).strip()


def _rank_error_files(log_dir: Path) -> list[tuple[bool, float, int, str]]:
    """(is_secondary, mtime, rank, message) for every per-rank error.json torchrun collected."""
    found = []
    for path in (Path(log_dir) / TORCHRUN_LOG_DIR).glob("*/attempt_*/*/error.json"):
        try:
            message = _error_message(json.loads(path.read_text()))
            rank = int(path.parent.name)
            mtime = path.stat().st_mtime
        except (OSError, ValueError, AttributeError):
            continue
        if message:
            found.append((_is_secondary(message), mtime, rank, message))
    return sorted(found)


@dataclass
class _ReportedFailure:
    rank: str
    exitcode: int
    traceback: str
    is_root: bool


def _torchrun_failures(stderr_text: str) -> list[_ReportedFailure]:
    """The failures listed in torchrun's last ChildFailedError report (its root cause flagged)."""
    _, sep, report = stderr_text.rpartition("ChildFailedError")
    if not sep:
        return []
    _, _, root_part = report.partition("Root Cause (first observed failure):")
    failures = []
    for block in re.split(r"^\s*\[\d+\]:\s*$", report, flags=re.MULTILINE)[1:]:
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, colon, value = line.strip().partition(":")
            if colon and key.strip() in ("rank", "exitcode", "traceback") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
        try:
            code = int(fields.get("exitcode", "").split(" ")[0])
        except ValueError:
            continue
        rank = fields.get("rank", "?").split(" ")[0]
        failures.append(
            _ReportedFailure(rank, code, fields.get("traceback", ""), bool(root_part) and block in root_part)
        )
    return failures


def _describe_reported(failure: _ReportedFailure) -> str:
    if failure.exitcode < 0:
        hint = ""
        if -failure.exitcode == signal.SIGKILL:
            hint = " (SIGKILL comes from a person, or from the host's out-of-memory killer: check `dmesg`)"
        return f"rank {failure.rank} was killed by {_signal_name(-failure.exitcode)}{hint}"
    detail = failure.traceback if "To enable traceback" not in failure.traceback else ""
    return f"rank {failure.rank} exited with code {failure.exitcode}" + (f": {detail}" if detail else "")


def _killed_rank(failures: list[_ReportedFailure]) -> _ReportedFailure | None:
    """A rank that died of a signal other than torchrun's own SIGTERM teardown (root cause first)."""
    killed = [f for f in failures if f.exitcode < 0 and -f.exitcode != signal.SIGTERM]
    return next((f for f in killed if f.is_root), killed[0] if killed else None)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def root_cause(log_dir: Path, exit_code: int | None) -> str:
    """A one-paragraph reason a job failed, best source first:
    1. a rank's own exception (per-rank error files; the first one written, never an error a rank
       raised only because a peer vanished, like gloo's "Connection reset by peer");
    2. a rank killed by a signal (torchrun's failure report: signals leave no error file);
    3. train's error.txt (refused before training: bad config or data);
    4. a peer-vanished error, torchrun's report, how torchrun itself ended, and last the log tail."""
    log_dir = Path(log_dir)
    errors = _rank_error_files(log_dir)
    primary = [e for e in errors if not e[0]]
    if primary:
        _, _, rank, message = primary[0]
        return f"rank {rank}: {message}"[:2000]
    copied = ""
    with contextlib.suppress(OSError, ValueError):
        copied = _error_message(json.loads((log_dir / TORCHRUN_ERROR_FILE).read_text()))
    if copied and not _is_secondary(copied):
        return copied[:2000]  # torchrun's copy of its root cause, when the per-rank files are gone
    failures = _torchrun_failures(tail_lines(log_dir / STDERR_LOG, max_lines=2000, max_chars=200_000))
    killed = _killed_rank(failures)
    if killed is not None:
        return _describe_reported(killed)
    refused = _read_text(log_dir.parent / REFUSED_FILE)
    if refused:
        return refused[:2000]
    if errors:
        _, _, rank, message = errors[0]
        return f"rank {rank}: {message}"[:2000]
    if copied:
        return copied[:2000]
    root = next((f for f in failures if f.is_root), failures[0] if failures else None)
    if root is not None:
        return _describe_reported(root)
    if exit_code is not None and exit_code < 0:
        return f"torchrun was killed by {_signal_name(-exit_code)}"
    short_tail = tail_lines(log_dir / STDERR_LOG)
    code = f"exit code {exit_code}" if exit_code is not None else "no exit code"
    return f"{code}; last lines of stderr:\n{short_tail}" if short_tail else f"{code}; stderr was empty"
