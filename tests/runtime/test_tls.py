"""wss: the daemon streams over TLS, and its connections share one TLS context
(consumer/runtime/tls.py). The sandbox speaks plain HTTP; a TLS proxy with a test CA's
certificate fronts it, and the CA is trusted through ``SSL_CERT_FILE`` (OpenSSL's default
verify paths, which ``ssl.create_default_context`` loads)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats_server import make_certificates
from support import count_lines, make_settings, running, sink_ids, truth_ids, wait_until

from consumer.runtime import tls
from consumer.sandbox import SandboxOptions


@pytest.fixture
def fresh_context() -> Iterator[None]:
    tls.client_context.cache_clear()
    yield
    tls.client_context.cache_clear()  # made to trust the test CA only


@contextlib.asynccontextmanager
async def tls_proxy(target: int, cert: Path, key: Path) -> AsyncIterator[int]:
    """TLS on 127.0.0.1 (a free port, yielded), plain TCP to ``target``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target)
        for t in (pipe(client_r, server_w), pipe(server_r, client_w)):
            task = asyncio.create_task(t)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        async with server:
            yield server.sockets[0].getsockname()[1]
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.both_loops  # a webhook daemon streams on uvloop (consumer.event_loop)
@pytest.mark.usefixtures("fresh_context")
async def test_wss_streams_and_its_connections_share_one_context(
    sandbox_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    certs = make_certificates(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))
    gw = await sandbox_factory(backlog=40)
    opts = SandboxOptions()
    auth = {
        "client_id": opts.client_id,
        "client_secret": opts.client_secret,
        "token_url": f"{gw.url}/oauth/v1/tokens",
    }
    sink = tmp_path / "events.jsonl"
    async with tls_proxy(gw.port, certs.server_cert, certs.server_key) as port:
        settings = make_settings(tmp_path, f"https://127.0.0.1:{port}", auth=auth)
        async with running(settings) as daemon:
            await wait_until(lambda: count_lines(sink) >= 40)
            await gw.disconnect_all(code=1001, reason="maintenance")
            gw.append("DEMO", 20)
            await wait_until(lambda: count_lines(sink) >= 60)
            assert daemon.runners["main"].stats.connections >= 2
    assert Counter(sink_ids(sink)) == Counter(truth_ids(gw.events("DEMO")))
    made = tls.client_context.cache_info()
    assert (made.misses, made.currsize) == (1, 1) and made.hits >= 1
