"""The shared URL's door: which password (if any) guards the app, a constant-time check of a guess, a
back-off for whoever guesses (and who that is, behind a proxy or not), and keeping the app's secrets out of
the processes it starts."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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


# --------------------------------------------------------------------------- who is guessing

TRUSTED_PROXIES_ENV = "SAE_LAB_TRUSTED_PROXIES"
# Streamlit's server (uvicorn) replaces the connection's address with X-Forwarded-For's when the connection
# comes from an address in FORWARDED_ALLOW_IPS, loopback by default.
SERVER_FORWARD_ENV, SERVER_FORWARD_DEFAULT = "FORWARDED_ALLOW_IPS", "127.0.0.1,::1"
UNKNOWN_CLIENT = "unknown address"  # Streamlit names no address (a loopback connection)
UNVERIFIED_FORWARD = "a request with an unverified X-Forwarded-For"  # one client, whatever the header claims

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_proxies(env: Mapping[str, str]) -> list[IPNetwork]:
    """SAE_LAB_TRUSTED_PROXIES: the addresses or networks (CIDR) of the reverse proxies in front of the app,
    separated by commas; none by default. Entries that are not addresses are left out (proxy_warning says so)."""
    networks = []
    for entry in env.get(TRUSTED_PROXIES_ENV, "").split(","):
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            continue
    return networks


def client_address(peer: object, forwarded_for: object, proxies: Sequence[IPNetwork]) -> str:
    """The client a password guess is counted and logged against.

    `peer` is the address Streamlit reports (None on loopback), `forwarded_for` the request's X-Forwarded-For.
    Without a configured proxy nobody vouches for that header, and Streamlit's server may already have taken
    its word (from loopback): every request carrying it is then one client, so rotating it buys no guesses
    and writes nothing of it into the log. With proxies, a request from one of them is the right-most address
    its chain of proxies appended; any other request is its own peer."""
    if not isinstance(forwarded_for, str) or not forwarded_for.strip():
        return _address(peer) or UNKNOWN_CLIENT
    if not proxies:
        return UNVERIFIED_FORWARD
    hop = _address(peer) or "127.0.0.1"  # Streamlit reports loopback as no address
    if not _among(hop, proxies):
        return _address(peer) or UNKNOWN_CLIENT
    for entry in reversed(forwarded_for.split(",")):
        address = _address(entry.strip())
        if address is None:
            return UNVERIFIED_FORWARD
        if not _among(address, proxies):
            return address
    return UNVERIFIED_FORWARD  # only proxies in the chain


def proxy_warning(env: Mapping[str, str]) -> str | None:
    """A warning when SAE_LAB_TRUSTED_PROXIES holds something that is not an address, or when Streamlit's server
    believes X-Forwarded-For from addresses that are not the configured proxies (their word would reach the
    app as the connection's own address)."""
    raw = [e.strip() for e in env.get(TRUSTED_PROXIES_ENV, "").split(",") if e.strip()]
    proxies = trusted_proxies(env)
    if len(proxies) < len(raw):
        return f"{TRUSTED_PROXIES_ENV} holds entries that are not addresses or networks (CIDR); they are ignored"
    if not proxies:
        return None  # the header is never believed: nothing to match
    server = env.get(SERVER_FORWARD_ENV, SERVER_FORWARD_DEFAULT)
    believed = [e.strip() for e in server.split(",") if e.strip()]
    if all(_within(entry, proxies) for entry in believed):
        return None
    return (
        f"Streamlit's server believes X-Forwarded-For from {server} ({SERVER_FORWARD_ENV}) but {TRUSTED_PROXIES_ENV} "
        f"names {env[TRUSTED_PROXIES_ENV]}: start the app with {SERVER_FORWARD_ENV} set to the proxies too "
        "(`make run` does)."
    )


def _address(value: object) -> str | None:
    """`value` as a canonical IP address, or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def _within(entry: str, proxies: Sequence[IPNetwork]) -> bool:
    """Whether the address or network `entry` lies inside one of `proxies` ("*" or a name: it does not)."""
    try:
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    # subnet_of needs networks of one version: the check before it makes sure
    return any(network.version == p.version and network.subnet_of(p) for p in proxies)  # type: ignore[arg-type]


def _among(address: str, networks: Sequence[IPNetwork]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in network for network in networks)


# --------------------------------------------------------------------------- child processes


def is_secret(name: str) -> bool:
    """SAE_LAB_PASSWORD and any other SAE_LAB_* variable that names a secret."""
    return name.startswith("SAE_LAB_") and any(word in name for word in _SECRET_WORDS)


def without_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """A copy of `env` for a child process (the daemon, a job): the app's secrets stay behind."""
    return {name: value for name, value in env.items() if not is_secret(name)}
