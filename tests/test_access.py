"""The door of the shared URL: back-off for guessing, the warning when nothing guards the app, and the
app's secrets kept out of the processes it starts."""

from __future__ import annotations

import logging

import pytest

from sae_core import access


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_five_free_guesses_then_the_wait_doubles_per_client():
    clock = Clock()
    throttle = access.GuessThrottle(clock=clock)
    for _ in range(4):
        throttle.failed("10.0.0.7")
        assert throttle.wait_s("10.0.0.7") == 0
    waits = []
    for _ in range(4):
        throttle.failed("10.0.0.7")
        waits.append(throttle.wait_s("10.0.0.7"))
    assert waits == [1.0, 2.0, 4.0, 8.0]
    assert throttle.wait_s("10.0.0.8") == 0  # another client is not slowed by one guesser alone
    clock.t += 8
    assert throttle.wait_s("10.0.0.7") == 0  # the wait passes
    throttle.succeeded("10.0.0.7")
    throttle.failed("10.0.0.7")
    assert throttle.wait_s("10.0.0.7") == 0  # a right password starts the count again


def test_many_addresses_do_not_buy_more_guesses():
    clock = Clock()
    throttle = access.GuessThrottle(clock=clock, global_free=20)
    for n in range(21):
        throttle.failed(f"10.0.1.{n}")  # one guess each from 21 addresses
    assert throttle.wait_s("10.0.9.9") == 2.0  # everyone waits, a newcomer too
    clock.t += 700  # outside the window the past failures are forgotten
    assert throttle.wait_s("10.0.9.9") == 0


def test_waits_are_capped_and_failures_logged_with_the_address(caplog):
    throttle = access.GuessThrottle(clock=Clock(), max_wait_s=300)
    with caplog.at_level(logging.WARNING, logger="sae_core.access"):
        for _ in range(30):
            throttle.failed("192.0.2.1")
    assert throttle.wait_s("192.0.2.1") == 300
    assert "wrong password from 192.0.2.1 (30 in a row)" in caplog.text


@pytest.mark.parametrize(
    ("address", "password", "warned"),
    [(None, None, True), ("0.0.0.0", None, True), ("10.1.2.3", None, True), ("127.0.0.1", None, False),
     ("localhost", None, False), (None, "s3cret", False)],
)  # fmt: skip
def test_a_warning_when_the_network_reaches_an_unguarded_app(address, password, warned):
    warning = access.exposure_warning(address, password)
    assert (warning is not None) == warned
    if warned:
        assert "SAE_LAB_PASSWORD" in warning and "--server.address 127.0.0.1" in warning


def test_secrets_stay_behind():
    env = {"SAE_LAB_PASSWORD": "x", "SAE_LAB_API_TOKEN": "y", "SAE_LAB_HOME": "/lab", "PATH": "/bin", "MY_KEY": "z"}
    assert access.without_secrets(env) == {"SAE_LAB_HOME": "/lab", "PATH": "/bin", "MY_KEY": "z"}


# --------------------------------------------------------------------------- X-Forwarded-For (issue 21, item 9d)


def proxies(value: str) -> list:
    return access.trusted_proxies({access.TRUSTED_PROXIES_ENV: value})


def test_without_a_configured_proxy_every_forwarded_claim_is_one_client():
    # Streamlit's server takes X-Forwarded-For's word from loopback by default: what the app sees as the peer
    # may already be the claim. Rotating it must not make new clients, nor reach the log.
    seen = {access.client_address(f"10.0.0.{i}", f"10.0.0.{i}", []) for i in range(50)}
    assert seen == {access.UNVERIFIED_FORWARD}
    assert access.client_address(None, "admin logged in", []) == access.UNVERIFIED_FORWARD
    assert access.client_address("192.0.2.7", None, []) == "192.0.2.7"  # no header: the connection itself
    assert access.client_address(None, "", []) == access.UNKNOWN_CLIENT  # loopback, as Streamlit reports it
    assert access.client_address(object(), None, []) == access.UNKNOWN_CLIENT  # AppTest's stand-in


def test_a_configured_proxy_is_believed_for_the_address_it_appended_and_no_further():
    nginx = proxies("10.1.0.5, 10.2.0.0/16")
    assert access.client_address("10.1.0.5", "198.51.100.9", nginx) == "198.51.100.9"
    # a client's own claim comes first; each proxy appends: the right-most non-proxy address is the client's
    assert access.client_address("10.1.0.5", "1.2.3.4, 198.51.100.9, 10.2.3.4", nginx) == "198.51.100.9"
    assert access.client_address("203.0.113.3", "1.2.3.4", nginx) == "203.0.113.3"  # not a proxy: its own peer
    assert access.client_address("10.1.0.5", "not an address", nginx) == access.UNVERIFIED_FORWARD
    loopback = proxies("127.0.0.1")  # nginx on this machine; Streamlit reports loopback as None
    assert access.client_address(None, "198.51.100.9", loopback) == "198.51.100.9"


def test_the_proxy_settings_are_checked_at_start():
    assert access.proxy_warning({}) is None
    assert "not addresses" in access.proxy_warning({access.TRUSTED_PROXIES_ENV: "10.0.0.1, proxy.example"})
    # Streamlit's server trusts loopback unless told otherwise: with a proxy elsewhere, say so
    warning = access.proxy_warning({access.TRUSTED_PROXIES_ENV: "10.1.0.5"})
    assert "FORWARDED_ALLOW_IPS" in warning and "127.0.0.1,::1" in warning
    assert access.proxy_warning({access.TRUSTED_PROXIES_ENV: "10.1.0.0/24", "FORWARDED_ALLOW_IPS": "10.1.0.5"}) is None
    assert access.proxy_warning({access.TRUSTED_PROXIES_ENV: "10.1.0.5", "FORWARDED_ALLOW_IPS": "*"}) is not None


def test_guesses_with_rotating_forwarded_addresses_share_one_back_off():
    throttle = access.GuessThrottle(clock=Clock())
    for i in range(5):
        throttle.failed(access.client_address(None, f"203.0.113.{i}", []))
    assert throttle.wait_s(access.client_address(None, "203.0.113.99", [])) > 0
