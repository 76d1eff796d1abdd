"""Orchestration's transport errors against a REST server that echoes the request's
credentials in an answer aiohttp cannot parse: the error quotes the bad line, and neither the
retry warning nor the TransientSinkError may show a piece of the token or the app key (a real
loopback server)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
import pytest
from bus_events import event
from log_capture import log_records
from support import make_settings, serving

from consumer.config import OrchestrationSettings
from consumer.errors import TransientSinkError
from consumer.logs import REDACTOR
from consumer.runtime.assembly import register_secrets
from consumer.sandbox import SandboxOptions
from consumer.sinks.orchestration import Orchestrator

RESOURCES = {"Reservation": "/rsv/v1/hotels/{hotelId}/reservations/{primaryKey}"}
JWT = (
    "eyJhbGciOiJSUzI1NiJ9."
    + "eyJzdWIiOiJvcGVyYS1jbGllbnQiLCJleHAiOjE3MDAwMDAwMDB9" * 30
    + ".c2lnbmF0dXJl"
)
RETRYING = "orchestration GET failed; retrying"


def pieces(secret: str, size: int) -> list[str]:
    """Every ``size``-character piece of ``secret``: none may show, not even cut short."""
    return [secret[i : i + size] for i in range(len(secret) - size + 1)]


class Tokens:
    def __init__(self, token: str) -> None:
        self.token = token

    async def access_token(self) -> str:
        return self.token

    def invalidate(self, rejected: str | None = None) -> None:
        pass


def header(head: bytes, name: bytes) -> bytes:
    for line in head.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return b""


@pytest.mark.parametrize("which", ["token", "app_key"])
async def test_an_echoed_credential_in_a_transport_error_is_masked_before_the_cut(
    tmp_path: Path, which: str
) -> None:
    """A malformed status line echoing the bearer token (or the x-app-key): aiohttp's
    ClientResponseError quotes it, reason() cut it at 200 characters with only the URL masked,
    and the log redactor (which knows both) came after the cut: the start of the secret was
    left in the retry warning and in the error."""
    app_key = SandboxOptions().app_key
    settings = make_settings(tmp_path, "http://127.0.0.1:9")
    register_secrets(settings)  # as the daemon does: the app key is known to the redactor
    REDACTOR.add_token(JWT, 3600)  # as the token provider does when it gets one

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            if which == "token":
                echoed, pad = header(head, b"authorization"), b""  # "Bearer <jwt>"
            else:
                # The padding puts the key across character 200 of the message.
                echoed, pad = header(head, b"x-app-key"), b"p" * 91
            writer.write(b"HTTP/1.1 2x0 " + pad + echoed + b"\r\n\r\n")
            await writer.drain()
        writer.close()

    async with serving(handle) as port, aiohttp.ClientSession() as http:
        orchestrator = Orchestrator(
            OrchestrationSettings(
                enabled=True,
                resources=RESOURCES,
                coalesce_ms=0.0,
                base_url=f"http://127.0.0.1:{port}",
                max_attempts=2,
                rate_per_s=1000,
                retry_max_s=0.01,
            ),
            http,
            {"main": (settings.streams["main"], Tokens(JWT))},
        )
        with log_records() as logs, pytest.raises(TransientSinkError) as info:
            await orchestrator.enrich("main", [event(1)])
    secret, size = (JWT, 12) if which == "token" else (app_key, 8)
    warned = [str(r.get("error")) for r in logs if r["event"] == RETRYING]
    assert warned, logs
    shown = [REDACTOR.scrub(str(info.value)), *warned]  # the error as any log line shows it
    assert all("Bad status line" in s and "***" in s for s in shown), shown  # it was echoed
    leaked = [(p, s) for s in shown for p in pieces(secret, size) if p in s]
    assert not leaked, f"a piece of the {which} is shown: {leaked[0][0]!r} in {leaked[0][1]!r}"
