"""Webhook secrets against a hostile receiver (issue #9 "Poison-proof", item 5).

The receiver (tests/receiver.py, on loopback) answers 400 and echoes everything it got: the
request line (as sent and percent-decoded), every header, and the decoded Basic credentials.
The daemon, fed by the sandbox, dead-letters every event; neither the DLQ rows nor any log line
may hold a secret of the webhook's configuration, in any form.
"""

from __future__ import annotations

import base64
import io
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import pytest
from bus_events import event
from log_capture import captured_logs
from receiver import Received, Receiver, Reply
from support import make_settings, running, truth_ids, wait_until

from consumer.config import WebhookSinkSettings
from consumer.errors import PermanentSinkError
from consumer.http_client import ERROR_BODY_BYTES
from consumer.logs import REDACTOR
from consumer.runtime.assembly import register_secrets
from consumer.sinks.webhook import WebhookSink

# The daemon runs this sink on uvloop by default (consumer.event_loop).
pytestmark = pytest.mark.both_loops

PASSWORD = "Pw-s3cr3t-91"
TOKEN = "tok-Q-7731"
SIGNATURE = "s1g+v4l/ue=9"  # percent-encoding changes it: the URL holds the encoded form
HEADER = "hdr-K3y-4402"
BASIC = base64.b64encode(f"user:{PASSWORD}".encode()).decode()


def forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), base64.b64encode(secret.encode()).decode()}


SECRETS = {BASIC, *forms(PASSWORD), *forms(TOKEN), *forms(SIGNATURE), *forms(HEADER)}


def echo(request: Received) -> Reply:
    """400, with the request echoed back: a receiver that reflects what it was sent."""
    lines = [f"{request.method} {request.path} HTTP/1.1", f"decoded: {unquote(request.path)}"]
    auth = request.header("Authorization") or ""
    if auth.startswith("Basic "):
        lines.append("credentials: " + base64.b64decode(auth[6:]).decode())
    # The interesting headers first: the DLQ keeps the first 300 characters.
    first = ("authorization", "x-api-key", "x-source")
    names = [*first, *(n for n in request.headers if n not in first)]
    lines += [f"{name}: {request.headers[name]}" for name in names if name in request.headers]
    return Reply(400, {"Content-Type": "text/plain"}, "\n".join(lines).encode())


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Every log line of the process (JSON), into a buffer; logging put back afterwards."""
    with captured_logs() as buffer:
        yield buffer


@pytest.mark.parametrize("batch_size", [1, 5])
async def test_no_webhook_secret_reaches_the_dlq_or_the_logs(
    sandbox_factory: Any, tmp_path: Path, logs: io.StringIO, batch_size: int
) -> None:
    """Issue #9 item 5: with the password in the URL, secrets in its query string and a secret
    header, a receiver echoing the request made the DLQ error and the "event dead-lettered"
    line carry ?token=..., the Basic credentials and the header value. Now every form of every
    secret is masked, while the echo itself (and the events) still land in the DLQ."""
    gw = await sandbox_factory(backlog=12)
    truth = truth_ids(gw.events("DEMO"))
    with Receiver(echo) as rx:
        port = rx.port
        url = (
            f"http://user:{PASSWORD}@127.0.0.1:{port}/in"
            f"?token={TOKEN}&sig={quote(SIGNATURE, safe='')}"
        )
        s = make_settings(
            tmp_path,
            gw.url,
            sink={
                "type": "webhook",
                "url": url,
                "auth": "none",
                "headers": {"X-Api-Key": HEADER, "X-Source": "opera"},
                "batch_size": batch_size,
            },
            pipeline={"sink_retry_initial_s": 0.05, "sink_retry_max_s": 0.2},
        )
        assert isinstance(s.sink, WebhookSinkSettings)
        async with running(s) as daemon:
            pipeline = daemon.pipelines["main"]
            await wait_until(lambda: pipeline.dead_lettered >= len(truth))
        requests = rx.requests
    # The secrets were really sent (and so echoed back)...
    assert requests
    first = requests[0]
    assert first.header("Authorization") == f"Basic {BASIC}"
    assert first.header("X-Api-Key") == HEADER
    assert f"token={TOKEN}" in first.path
    assert quote(SIGNATURE, safe="") in first.path
    # ...every event is in the DLQ with the receiver's answer...
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM dead_letters")]
    assert sorted(r["unique_event_id"] for r in rows) == sorted(truth)
    for row in rows:
        assert row["reason"] == "sink_rejected"
        assert "HTTP 400" in row["error"]
        assert "x-source: opera" in row["error"]  # the echo is there, only its secrets masked
        assert "authorization: Basic ***" in row["error"]
        assert "credentials: user:***" in row["error"]
        assert "x-api-key: ***" in row["error"]
        assert f"127.0.0.1:{port}/…:" in row["error"]  # where it POSTed, its path left out
        for column, value in row.items():
            for secret in SECRETS:
                assert secret not in str(value), (column, secret, value)
    # ...and no log line holds a secret either.
    text = logs.getvalue()
    assert text.count('"event dead-lettered"') >= len(truth)
    for line in text.splitlines():
        for secret in SECRETS:
            assert secret not in line, (secret, line)


def php_json(value: Any) -> bytes:
    """As PHP's json_encode writes by default: non-ASCII as \\uXXXX and "/" as "\\/"."""
    return json.dumps(value).replace("/", "\\/").encode()


# A password with a quote, a slash and non-ASCII, and whose Basic credentials' base64 holds a
# "/": every one of them is escaped in PHP's JSON, which no raw form matches.
JSON_PASSWORD = next(
    p
    for p in (f'Pw"/\u00e9-s3cr3t-{i}?' for i in range(1000))
    if "/" in base64.b64encode(f"user:{p}".encode()).decode()
)
JSON_BASIC = base64.b64encode(f"user:{JSON_PASSWORD}".encode()).decode()


def php_echo(request: Received) -> Reply:
    """400, with the request's headers and credentials echoed back as PHP writes JSON."""
    auth = request.header("Authorization") or ""
    credentials = base64.b64decode(auth.removeprefix("Basic ")).decode()
    echoed = {"authorization": auth, "credentials": credentials, **request.headers}
    return Reply(400, {"Content-Type": "application/json"}, php_json({"echo": echoed}))


async def test_secrets_echoed_as_php_json_reach_neither_the_dlq_nor_the_logs(
    sandbox_factory: Any, tmp_path: Path, logs: io.StringIO
) -> None:
    """A receiver echoing the request as JSON wrote ``Basic dXNl…\\/…``: no raw form of the
    secret matched it, and the DLQ error and the log lines held the credentials."""
    gw = await sandbox_factory(backlog=3)
    truth = truth_ids(gw.events("DEMO"))
    with Receiver(php_echo) as rx:
        s = make_settings(
            tmp_path,
            gw.url,
            sink={
                "type": "webhook",
                "url": rx.url,
                "auth": "basic",
                "username": "user",
                "password": JSON_PASSWORD,
            },
            pipeline={"sink_retry_initial_s": 0.05, "sink_retry_max_s": 0.2},
        )
        async with running(s) as daemon:
            pipeline = daemon.pipelines["main"]
            await wait_until(lambda: pipeline.dead_lettered >= len(truth))
        requests = rx.requests
    assert requests[0].header("Authorization") == f"Basic {JSON_BASIC}"
    escaped = php_json({"echo": f"Basic {JSON_BASIC}", "credentials": JSON_PASSWORD}).decode()
    assert "\\/" in escaped and "\\u00e9" in escaped and '\\"' in escaped  # what is echoed
    # Any piece of them between what JSON escapes, at least 6 characters long, is a leak.
    both = f"{JSON_PASSWORD} {JSON_BASIC}"
    pieces = {p for p in re.split(r'[/"\u00e9 ]', both) if len(p) >= 6}
    assert "-s3cr3t-" in str(pieces)
    with sqlite3.connect(tmp_path / "state.db") as db:
        errors = [row[0] for row in db.execute("SELECT error FROM dead_letters")]
    assert len(errors) == len(truth)
    for error in errors:
        assert '"authorization": "***"' in error and '"credentials": "user:***"' in error, error
        assert "x-opera-stream" in error.lower()  # the rest of the echo is there
        for piece in pieces:
            assert piece not in error, (piece, error)
    text = logs.getvalue()
    assert text.count('"event dead-lettered"') >= len(truth)
    for piece in pieces:
        assert piece not in text, piece


def pieces_of(secret: str, size: int = 12) -> list[str]:
    """Every ``size``-character piece of ``secret``: none may show, not even cut short."""
    return [secret[i : i + size] for i in range(len(secret) - size + 1)]


async def test_basic_credentials_set_as_a_header_are_masked_decoded(tmp_path: Path) -> None:
    """``headers = {Authorization = "Basic <base64>"}`` (as receivers' docs often say) instead
    of auth = "basic": only the header's value and its base64 were registered, and a receiver
    echoing the credentials decoded put the password in the dead letter and every log line.
    Now they are masked as auth = "basic" masks them (the user name left readable)."""
    password = "Pw-s3cr3t-91/é"
    basic = base64.b64encode(f"hook:{password}".encode()).decode()

    def echo_decoded(request: Received) -> Reply:
        auth = request.header("Authorization") or ""
        said = base64.b64decode(auth.removeprefix("Basic ")).decode()
        text = f"credentials: {said}\nencoded: {quote(said, safe='')}"
        return Reply(401, {"Content-Type": "text/plain"}, text.encode())

    with Receiver(echo_decoded) as rx:
        cfg = WebhookSinkSettings(
            type="webhook", url=rx.url, headers={"Authorization": f"Basic {basic}"}
        )
        register_secrets(make_settings(tmp_path, "http://127.0.0.1:9", sink=cfg.model_dump()))
        async with aiohttp.ClientSession() as http:
            sink = WebhookSink(cfg, http)
            await sink.open(None)
            with pytest.raises(PermanentSinkError) as info:
                await sink.write("main", [event(1)])
        assert rx.requests[0].header("Authorization") == f"Basic {basic}"  # it was sent
    for text in (str(info.value), REDACTOR.scrub(f"{password} {quote(password, safe='')}")):
        assert password not in text and quote(password, safe="") not in text, text
    assert "credentials: hook:***" in str(info.value) and "encoded: hook%3A***" in str(info.value)


async def test_a_token_echoed_past_the_error_body_read_leaves_no_piece_of_it() -> None:
    """A receiver answering 400 with the request's Authorization echoed over and over: only
    ERROR_BODY_BYTES of the body are read, the copy of the token at that cut is cut in two,
    and the whole copies before it masked to "***" put the start of the cut one within the
    excerpt kept. Now the end of a body the read cut is never shown."""
    token = "eyJhbGciOiJIUzI1NiJ9." + "eyJzY29wZSI6IndlYmhvb2sifQ" * 56 + ".c2lnbmF0dXJlLWhtYWM"

    def echo_again(request: Received) -> Reply:
        line = (request.header("Authorization") or "") + "\n"
        return Reply(400, {"Content-Type": "text/plain"}, (line * 80).encode())

    with Receiver(echo_again) as rx:
        cfg = WebhookSinkSettings(type="webhook", url=rx.url, auth="bearer", token=token)
        async with aiohttp.ClientSession() as http:
            sink = WebhookSink(cfg, http)
            await sink.open(None)
            with pytest.raises(PermanentSinkError) as info:
                await sink.write("main", [event(1)])
        assert rx.requests[0].header("Authorization") == f"Bearer {token}"  # it was sent
    assert len(f"Bearer {token}\n") * 80 > ERROR_BODY_BYTES  # the read cut a copy of it
    text = str(info.value)
    assert "HTTP 400" in text, text
    leaked = [p for p in pieces_of(token) if p in text]
    assert not leaked, f"a piece of the bearer token is in the dead letter's error: {text!r}"
