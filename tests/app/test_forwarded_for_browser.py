"""The password back-off cannot be dodged with X-Forwarded-For (issue 21, item 9d), in a real browser against a
real server on loopback, where Streamlit's server believes the header by default. Between them a forwarder on
loopback (what anyone with a shell or an SSH tunnel on the machine can run) adds another X-Forwarded-For to each
connection: six wrong guesses count as one client's six, and no claimed address reaches the log."""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import threading

import pytest

from tests.app.test_e2e_browser import CHROMIUM_ARGS, button, require_browser, running_lab


@contextlib.contextmanager
def forwarder_claiming_addresses(upstream_port: int):
    """A loopback TCP forwarder to `upstream_port` that puts `X-Forwarded-For: 203.0.113.N` (N counting up per
    connection) into the first request of each connection; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    numbers = itertools.count(1)

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def serve(client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        head = b""
        while b"\r\n" not in head and (data := client.recv(65536)):
            head += data
        line, rest = head.split(b"\r\n", 1)
        upstream.sendall(line + f"\r\nX-Forwarded-For: 203.0.113.{next(numbers)}\r\n".encode() + rest)
        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                threading.Thread(target=serve, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@pytest.mark.slow
def test_rotating_x_forwarded_for_neither_resets_the_back_off_nor_reaches_the_log(tmp_path):
    chromium = require_browser()
    from playwright.sync_api import expect, sync_playwright

    with running_lab(tmp_path, SAE_LAB_PASSWORD="open sesame") as (url, _home), sync_playwright() as pw:
        with forwarder_claiming_addresses(int(url.rsplit(":", 1)[1])) as port:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            for i in range(6):
                context = browser.new_context()  # a new connection each time: a new claimed address
                page = context.new_page()
                page.set_default_timeout(30_000)
                page.goto(f"http://127.0.0.1:{port}")
                page.get_by_label("Password", exact=True).fill(f"guess {i}")
                button(page, "Enter").click()
                expect(page.get_by_text(re.compile("Wrong password|Too many wrong passwords"))).to_be_visible()
                context.close()
            browser.close()
        log = (tmp_path / "streamlit.log").read_text()
    said = re.findall(r"wrong password from (.+) \((\d+) in a row\)", log)
    assert [count for _, count in said] == ["1", "2", "3", "4", "5", "6"], log
    assert {who for who, _ in said} == {"a request with an unverified X-Forwarded-For"}
    assert "203.0.113." not in log
