"""The shared URL's door: which password (if any) guards the app, a constant-time check of a guess, a
back-off for whoever guesses, and keeping the app's secrets out of the processes it starts."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("sae_core.access")

PASSWORD_ENV = "SAE_LAB_PASSWORD"
_SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "KEY")
LOOPBACK_ADDRESSES = ("127.0.0.1", "localhost", "::1")


def configured_password(env: Mapping[str, str], secrets_get: Callable[[str], Any] | None = None) -> str | None:
    """SAE_LAB_PASSWORD from the environment, else from st.secrets; None (or empty) = no gate."""
    value = env.get(PASSWORD_ENV)
    if not value and secrets_get is not None:
        try:
            value = secrets_get(PASSWORD_ENV)
        except Exception:  # no secrets.toml at all is the common case, not an error
            value = None
    return str(value) if value else None


def password_matches(given: str, expected: str) -> bool:
    """Constant-time compare, so response time does not leak how much of a guess was right."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def exposure_warning(address: str | None, password: str | None) -> str | None:
    """A warning when the app answers on every interface (Streamlit's default) and no password guards it."""
    if password or (address or "").strip() in LOOPBACK_ADDRESSES:
        return None
    where = f"address {address}" if address and address.strip() not in ("0.0.0.0", "::") else "every interface"
    return (
        f"SAE Lab listens on {where} without a password: anyone who reaches this machine can queue and cancel "
        f"jobs. Set {PASSWORD_ENV}, or start it with --server.address 127.0.0.1."
    )


# --------------------------------------------------------------------------- guessing


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0


class GuessThrottle:
    """Exponential back-off for wrong passwords, per client address and for everyone together.

    The first `free_tries` failures in a row of a client cost nothing; each later one doubles the wait
    before that client's next guess is looked at (1 s, 2 s, 4 s, ... up to `max_wait_s`). Across all
    clients, more than `global_free` failures within `window_s` make everyone wait the same way, so many
    addresses do not buy more guesses. A right password clears its client's count."""

    def __init__(
        self,
        free_tries: int = 5,
        global_free: int = 20,
        window_s: float = 600.0,
        max_wait_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.free_tries, self.global_free, self.window_s, self.max_wait_s = (
            free_tries,
            global_free,
            window_s,
            max_wait_s,
        )
        self.clock = clock
        self._clients: dict[str, _Failures] = {}
        self._recent: list[float] = []  # times of failures within the window, any client
        self._lock = threading.Lock()

    def wait_s(self, client: str) -> float:
        """Seconds `client` must wait before a guess is checked (0: now)."""
        now = self.clock()
        with self._lock:
            self._recent = [t for t in self._recent if now - t < self.window_s]
            mine = self._clients.get(client, _Failures())
            waits = [self._backoff(mine.count, self.free_tries, mine.last, now)]
            if self._recent:
                waits.append(self._backoff(len(self._recent), self.global_free, self._recent[-1], now))
            return max(waits)

    def failed(self, client: str) -> int:
        """Record a wrong password; returns the client's failures in a row. Logged with the address."""
        now = self.clock()
        with self._lock:
            mine = self._clients.setdefault(client, _Failures())
            mine.count, mine.last = mine.count + 1, now
            self._recent.append(now)
            count = mine.count
        log.warning("wrong password from %s (%d in a row)", client, count)
        return count

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)

    def _backoff(self, failures: int, free: int, last: float, now: float) -> float:
        if failures < free:
            return 0.0
        return max(0.0, min(self.max_wait_s, 2.0 ** (failures - free)) - (now - last))


# One per app process: every browser session of the shared URL shares it.
THROTTLE = GuessThrottle()


# --------------------------------------------------------------------------- child processes


def is_secret(name: str) -> bool:
    """SAE_LAB_PASSWORD and any other SAE_LAB_* variable that names a secret."""
    return name.startswith("SAE_LAB_") and any(word in name for word in _SECRET_WORDS)


def without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` for a child process (the daemon, a job): the app's secrets stay behind."""
    return {name: value for name, value in env.items() if not is_secret(name)}
