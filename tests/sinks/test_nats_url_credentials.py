"""Credentials in a server URL (``nats://user:password@host``, which sink.servers accepts).

nats-py sends a URL's user information to that URL only: when it connects to another server
(another of the list, or one the cluster announced, as after a failover) it logs in without
credentials, the server answers "Authorization Violation" and the sink stopped the daemon
(SinkUnusable), telling the operator to set credentials they had set. It also sent them as
written, still percent-encoded. The sink now takes them out of the URLs, decoded, and gives
them to every server; URLs with different credentials, or other ones than sink.user /
sink.password / sink.token, are refused when the configuration is loaded (tests/config)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
from bus_events import event
from log_capture import captured_logs
from nats_server import NatsServer
from server_process import free_port

from consumer.config import NatsSinkSettings
from consumer.errors import ConfigError
from consumer.sinks.nats import NatsSink

USER = "opera"
PASSWORD = "nats-P@ss/w0rd:url-7731"  # '@', '/' and ':' percent-encoded in the URL
IN_URL = quote(PASSWORD, safe="")


def sink_for(servers: list[str], **fields: Any) -> NatsSink:
    values = {"type": "nats", "servers": servers, "duplicate_window_s": 3600.0, "timeout_s": 5.0}
    return NatsSink(NatsSinkSettings.model_validate(values | fields), {"main": "DEMO"})


async def test_the_credentials_of_one_url_log_in_to_every_server(
    nats_factory: Callable[..., NatsServer],
) -> None:
    """The first server of the list is down: the client goes on to the second, given without
    credentials (as a server the cluster announces is). It must log in there with the first
    URL's credentials, decoded."""
    server = nats_factory(users={USER: PASSWORD})
    down = f"nats://{USER}:{IN_URL}@127.0.0.1:{free_port()}"  # nothing listens there
    sink = sink_for([down, server.url])
    with captured_logs() as logs:
        try:
            await sink.open(None)
            await sink.write("main", [event(1), event(2)])
        finally:
            await sink.close()
    assert await server.message_count() == 2
    text = logs.getvalue() + repr(sink)
    assert PASSWORD not in text and IN_URL not in text


def test_the_urls_are_given_without_their_credentials() -> None:
    sink = sink_for(
        [f"nats://{USER}:{IN_URL}@127.0.0.1:4222", "tls://127.0.0.1:4443"],
        user=USER,
        password=PASSWORD,  # the same: no clash
    )
    options = sink._options()
    assert options["servers"] == ["nats://127.0.0.1:4222", "tls://127.0.0.1:4443"]
    assert (options["user"], options["password"]) == (USER, PASSWORD)
    assert PASSWORD in sink._secrets() and IN_URL in sink._secrets()
    # A lone name is a token (as nats-py reads nats://token@host), decoded.
    token = sink_for([f"nats://{IN_URL}@127.0.0.1:4222"])._options()
    assert token["token"] == PASSWORD and "user" not in token


@pytest.mark.parametrize(
    ("servers", "fields", "says"),
    [
        (["nats://a:Sec-1@h1:4222", "nats://a:Sec-2@h2:4222"], {}, "carry different credentials"),
        (["nats://a:Sec-1@h1:4222", "nats://Sec-5@h2:4222"], {}, "carry different credentials"),
        (["nats://a:Sec-1@h1:4222"], {"user": "b", "password": "Sec-1"}, "other credentials"),
        (["nats://a:Sec-1@h1:4222"], {"token": "Sec-1"}, "other credentials"),
        (["nats://Sec-3@h1:4222"], {"token": "Sec-4"}, "other credentials"),
    ],
)
def test_credentials_that_disagree_are_refused(
    servers: list[str], fields: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        sink_for(servers, **fields)
    text = str(refused.value)
    assert says in text and "sink.user and sink.password (or sink.token)" in text
    assert "Sec-" not in text
