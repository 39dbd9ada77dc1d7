"""Values as people read them: numbers (bytes, durations, rates, percentages, power) and user-given text
kept short and on one line wherever a message repeats it."""

from __future__ import annotations

import math
import unicodedata

# A message repeats at most this much of a value a person gave (a path, a key, a name).
ECHO_CHARS = 200

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_bytes(n: float | None) -> str:
    """`12.3 GiB`; `—` when unknown (NVML may not report a figure)."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float | None) -> str:
    """`0:01:05`, `2 d 03:04:05`; `—` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "—"
    total = int(round(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days} d {hours:02d}:{minutes:02d}:{secs:02d}" if days else clock


def format_rate(tokens_per_s: float | None) -> str:
    if tokens_per_s is None or not math.isfinite(tokens_per_s):
        return "—"
    return f"{tokens_per_s:,.0f} tok/s"


def format_percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}%"


def power_label(power_w: float | None, limit_w: float | None) -> str:
    if power_w is None:
        return "—"
    return f"{power_w:.0f} / {limit_w:.0f} W" if limit_w else f"{power_w:.0f} W"


def brief(value: object, limit: int = ECHO_CHARS) -> str:
    """`value` as text for a message: at most `limit` characters, control characters shown as escapes."""
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def label_problem(value: str, limit: int) -> str | None:
    """Why `value` cannot be a name shown to colleagues (too long, control characters), or None."""
    if len(value) > limit:
        return f"at most {limit} characters, got {len(value):,}"
    if any(unicodedata.category(ch).startswith("C") for ch in value):
        return "no control characters (newlines, tabs, escapes)"
    return None
