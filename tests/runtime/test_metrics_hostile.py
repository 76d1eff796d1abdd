"""The metrics listener (/metrics, /healthz, /readyz) against hostile clients: HEAD, malformed
heads, a thousand connections. It answers or closes, and never logs a flood or lets an
exception reach the event loop's exception handler."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from support import make_settings, running, wait_until

import consumer.logs
from consumer.runtime.daemon import Daemon
from consumer.runtime.metrics import Metrics

HOST = "127.0.0.1"
CRASH_MARKERS = ("Traceback", "never retrieved", "Unhandled exception", "Exception in callback")


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """The daemon's log lines as an operator sees them on a console (a traceback is several
    lines), in a StringIO; pytest's handlers are kept and everything is put back afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    consumer.logs.configure("info", "console", stream)
    root.handlers[:] = [*handlers, *root.handlers]
    structlog.configure(cache_logger_on_first_use=False)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**saved)


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Every call of the loop's exception handler ("Task exception was never retrieved",
    "Unhandled exception in client_connected_cb"...), still logged as asyncio would."""
    loop = asyncio.get_running_loop()
    calls: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()

    def record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        calls.append(context)
        loop.default_exception_handler(context)

    loop.set_exception_handler(record)
    yield calls
    loop.set_exception_handler(previous)


def assert_quiet(logs: io.StringIO, loop_errors: list[dict[str, Any]]) -> None:
    assert loop_errors == []
    text = logs.getvalue()
    assert not [m for m in CRASH_MARKERS if m in text], text[-4000:]


def port_of(daemon: Daemon) -> int:
    assert daemon.metrics_server is not None
    return daemon.metrics_server.port


async def exchange(port: int, data: bytes, *, eof: bool = False) -> bytes:
    """Send ``data`` on a raw connection (then a FIN if ``eof``) and read until the server
    closes; b"" if it closed (or reset) without a byte. Bounded by 60 s, ample on a loaded
    machine (issue #9 item 12)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    received = b""
    try:
        async with asyncio.timeout(60):
            with contextlib.suppress(ConnectionError):
                writer.write(data)
                await writer.drain()
                if eof:
                    writer.write_eof()
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    received += chunk
    finally:
        writer.close()
    return received


def status_of(response: bytes) -> int | None:
    """The status of a raw response, None for a close without one."""
    if not response:
        return None
    version, status, _ = response.split(b" ", 2)
    assert version == b"HTTP/1.1", response[:200]
    return int(status)


def header_of(response: bytes, name: str) -> str | None:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


async def streaming(tmp_path: Path, sandbox_factory: Any) -> Any:
    gw = await sandbox_factory(backlog=20)
    return running(make_settings(tmp_path, gw.url))


async def test_head_is_answered_without_a_body_and_other_methods_get_405(
    sandbox_factory: Any,
    tmp_path: Path,
    logs: io.StringIO,
    loop_errors: list[dict[str, Any]],
) -> None:
    """Issue #9 item 11: a HEAD /healthz raised h11.LocalProtocolError in the handler (a body
    sent for HEAD), which reached the loop's exception handler. HEAD gets the GET's status
    and headers, no body, on every path; another method gets 405 with ``Allow``.

    Issue #9 item 12: each raw exchange may take up to 60 s (not 20) on a loaded machine."""
    async with await streaming(tmp_path, sandbox_factory) as daemon:
        port = port_of(daemon)
        raw = await exchange(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(raw) == 200
        assert raw.endswith(b"\r\n\r\n"), raw  # the head, and not a byte after it
        assert header_of(raw, "Content-Length") == str(len(b'{"status": "ok"}'))
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}") as http:
            for path in ("/healthz", "/metrics", "/readyz", "/nope", "/healthz?probe=1"):
                # /readyz may change between the two requests on a loaded machine (a stream
                # reconnecting): ask again until two neighbouring answers describe one state.
                for _ in range(20):
                    get, head = await http.get(path), await http.head(path)
                    if head.status_code == get.status_code:
                        break
                assert head.status_code == get.status_code, path
                assert head.content == b"", path
                assert head.headers["content-type"] == get.headers["content-type"], path
            for method in ("POST", "PUT", "DELETE", "OPTIONS"):
                answer = await http.request(method, "/healthz")
                assert answer.status_code == 405, method
                assert answer.headers["allow"] == "GET, HEAD"
            assert (await http.get("/healthz")).status_code == 200
    assert_quiet(logs, loop_errors)


async def test_malformed_heads_get_400_or_a_close_without_a_traceback(
    sandbox_factory: Any,
    tmp_path: Path,
    logs: io.StringIO,
    loop_errors: list[dict[str, Any]],
) -> None:
    """Issue #9 item 11: a request target that does not parse (absolute-form garbage) logged a
    traceback per request. Malformed targets get 400; garbage gets 400 or a close; nothing is
    logged as a crash and the listener keeps answering.

    Issue #9 item 12: each raw exchange may take up to 60 s (not 20) on a loaded machine."""
    async with await streaming(tmp_path, sandbox_factory) as daemon:
        port = port_of(daemon)
        for target in (
            b"http://[::1/metrics",  # urlsplit: Invalid IPv6 URL
            b"http://[garbage]/healthz",
            b"/%ff%fe",  # percent escapes that are not UTF-8
            b"/health%zz",  # a percent sign without two hex digits
            b"/healthz%00",
        ):
            raw = await exchange(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(raw) == 400, (target, raw[:200])
        for garbage, eof in (
            (b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", False),
            (b"GET /\xff\xfe HTTP/1.1\r\n\r\n", False),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", False),
            (b"\x00\xff\xfe\r\n\r\n", False),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", True),  # a TLS hello, then FIN
            (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 200_000 + b"\r\n\r\n", False),
            (b"", True),
        ):
            raw = await exchange(port, garbage, eof=eof)
            assert status_of(raw) in (None, 400, 431), (garbage[:40], raw[:200])
        # absolute-form that parses is a request like any other
        raw = await exchange(port, b"GET http://127.0.0.1/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(raw) == 200
        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}") as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/metrics")).status_code == 200
    assert_quiet(logs, loop_errors)


async def _hostile(port: int, i: int) -> None:
    """One hostile connection of five kinds; whatever the server does, the client copes."""
    kind = i % 5
    with contextlib.suppress(OSError):
        if kind == 0:  # connects and says nothing
            _, writer = await asyncio.open_connection(HOST, port)
            writer.close()
        elif kind == 1:  # connects, says nothing, and resets
            _, writer = await asyncio.open_connection(HOST, port)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif kind == 2:  # garbage, then FIN
            await exchange(port, b"\x16\x03\x01\x00\xa5garbage \xff\xfe", eof=True)
        elif kind == 3:
            await exchange(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        else:
            await exchange(port, b"GET http://[::1/x%ff HTTP/1.1\r\nHost: x\r\n\r\n")


async def test_a_thousand_hostile_connections_leave_a_few_lines_and_a_working_listener(
    sandbox_factory: Any,
    tmp_path: Path,
    logs: io.StringIO,
    loop_errors: list[dict[str, Any]],
) -> None:
    """Issue #9 item 11: 1,100 connections to the metrics port logged thousands of lines (a
    traceback per connection). Connections beyond the cap are closed at once; 1,100 hostile
    ones (silent, reset, garbage, HEAD, bad targets) leave at most a handful of log lines,
    nothing reaches the loop's exception handler, and /healthz and /metrics answer after.

    Issue #9 item 12: the waits (the closes over the cap, each raw exchange, the listener
    answering again) are bounded by 60 s, not 20 or 10, so that a loaded machine passes."""
    async with await streaming(tmp_path, sandbox_factory) as daemon:
        await wait_until(lambda: daemon.runners["main"].state == "streaming")
        port = port_of(daemon)
        before = len(logs.getvalue().splitlines())

        # More silent connections than the listener keeps: the ones over its cap are closed
        # at once, without waiting for the head timeout of the others.
        held = [await asyncio.open_connection(HOST, port) for _ in range(100)]
        closed = [asyncio.create_task(reader.read()) for reader, _ in held]
        try:
            await wait_until(lambda: sum(t.done() for t in closed) >= 100 - 64, timeout=60)
            assert sum(t.done() for t in closed) < 100  # the listener kept some of them
        finally:
            for _, writer in held:
                writer.close()
            for task in closed:
                task.cancel()
            await asyncio.gather(*closed, return_exceptions=True)

        total, batch = 1100, 50
        for start in range(0, total, batch):
            await asyncio.gather(*(_hostile(port, i) for i in range(start, start + batch)))

        async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}") as http:

            async def answers(path: str) -> int:
                deadline = time.monotonic() + 60  # slots free as the server sees the last closes
                while time.monotonic() < deadline:
                    with contextlib.suppress(httpx.TransportError):
                        return (await http.get(path)).status_code
                    await asyncio.sleep(0.05)
                raise AssertionError(f"{path} never answered")

            assert await answers("/healthz") == 200
            assert await answers("/metrics") == 200
        lines = logs.getvalue().splitlines()[before:]
        assert len(lines) <= 20, "\n".join(lines[:60])
    assert_quiet(logs, loop_errors)


async def test_a_health_probe_is_answered_while_silent_connections_fill_the_listener(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The listener's 64 slots held by silent connections (re-opened as each times out: a few
    hundred bytes a second): a new connection was closed at once, so every /healthz probe
    failed and Docker's HEALTHCHECK or a liveness probe restarted a healthy daemon. A new
    connection now closes the oldest."""
    async with await streaming(tmp_path, sandbox_factory) as daemon:
        await wait_until(lambda: daemon.runners["main"].state == "streaming")
        port = port_of(daemon)
        server = daemon.metrics_server
        assert server is not None
        held = [await asyncio.open_connection(HOST, port) for _ in range(64)]
        try:
            await wait_until(lambda: len(server._handlers) == 64, timeout=60)
            response = await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(response) == 200
            async with asyncio.timeout(60):  # the oldest silent one was closed for it
                assert await held[0][0].read() == b""
        finally:
            for _, writer in held:
                writer.close()


async def test_a_failing_scrape_gets_500_and_one_log_line(
    sandbox_factory: Any,
    tmp_path: Path,
    logs: io.StringIO,
    loop_errors: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue #9 item 11: an exception the handler did not expect (here a collector that
    raises) reached the loop's exception handler, once per request. It gets a 500, and the
    log gets one line for the lot (the next ones are counted, at most one line a minute)."""

    def broken(self: Metrics) -> bytes:
        raise RuntimeError("collector broken")

    monkeypatch.setattr(Metrics, "scrape", broken)
    async with await streaming(tmp_path, sandbox_factory) as daemon, httpx.AsyncClient() as http:
        base = f"http://{HOST}:{port_of(daemon)}"
        for _ in range(5):
            assert (await http.get(f"{base}/metrics")).status_code == 500
        assert (await http.get(f"{base}/healthz")).status_code == 200
    assert loop_errors == []
    failed = [line for line in logs.getvalue().splitlines() if "a request failed" in line]
    assert len(failed) == 1, failed
    assert "collector broken" in logs.getvalue()
