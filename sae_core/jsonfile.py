"""A JSON object read from a file a person named (a config, a manifest, a model's settings): only a regular file
of data, never more than a size limit, never blocking, and every problem a ConfigError phrased for a person."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .text import brief

MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; a bigger one is not read
# Kernel pseudo-files: /proc/kmsg and the like call themselves regular files of size 0, and reading one may
# block forever or return live kernel state; no config or manifest lives there.
PSEUDO_FILE_ROOTS = ("/proc", "/sys", "/dev")


class ConfigError(ValueError):
    """A configuration problem, phrased for a person: field name and what is allowed."""


def read_json_object(path: str | Path, what: str, holds: str, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """The JSON object in a regular file of at most `max_bytes`, or ConfigError saying what is wrong.

    Only a regular file is opened (a FIFO or a device would block the reader), never a kernel pseudo-file
    (PSEUDO_FILE_ROOTS); at most `max_bytes` are read whatever size the file claims, and nesting too deep
    for the parser is an error, not a crash."""
    path = Path(path)
    shown = brief(path)
    try:
        real = Path(os.path.realpath(path))
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {shown}") from None
    except (OSError, ValueError) as exc:  # a permission refused, a loop of links, a NUL byte in the name
        raise ConfigError(f"{what} {shown} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if any(real.is_relative_to(root) for root in PSEUDO_FILE_ROOTS):
        raise ConfigError(f"{what} {shown} is a kernel pseudo-file, not a file of data")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{what} {shown} is not a regular file")
    raw = _read_at_most(path, max_bytes, f"{what} {shown}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {shown} is not valid JSON: {brief(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{what} {shown} is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {shown} must hold a JSON object of {holds}")
    return data


def _read_at_most(path: Path, max_bytes: int, shown: str) -> bytes:
    """The bytes of the regular file at `path`; ConfigError past `max_bytes`. Opened without blocking and
    checked again once open: a FIFO put in its place after the check above cannot stall the reader."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"{shown} is not a regular file")
            raw = f.read(max_bytes + 1) if info.st_size <= max_bytes else b""
    except OSError as exc:
        raise ConfigError(f"{shown} cannot be read ({exc.strerror or exc})") from None
    if info.st_size > max_bytes or len(raw) > max_bytes:
        raise ConfigError(f"{shown} is larger than {max_bytes:,} bytes; at most {max_bytes:,} are read")
    return raw
