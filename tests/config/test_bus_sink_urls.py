"""What the bus sinks' URLs say that the client libraries would misread, refused when the
configuration is loaded (`check-config` and `run` exit 78 naming the key and the fix, before
anything connects), saying nothing of the secrets:

* sink.url's database: redis-py reads redis://host/abc as database 0 and redis://host/1/2 as
  database 12, and the events went to another database than the one written;
* credentials in sink.servers' URLs that differ from one another or from sink.user /
  sink.password / sink.token: the nats sink gives one set to every server (nats-py sent a
  URL's only to that URL, and a failover logged in without them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.cli import main
from consumer.errors import ExitCode

SECRET = "bus-Url-Secret-6620"
BASE = """
[streams.main]
gateway_url = "https://gw.example.com/"
chain_code = "CHAIN1"
app_key = "app-key-0001"

[streams.main.auth]
client_id = "cid"
client_secret = "client-secret-0002"
"""

pytestmark = pytest.mark.usefixtures("hermetic_config")


@pytest.mark.parametrize(
    ("sink", "says"),
    [
        (f'type = "redis"\nurl = "redis://u:{SECRET}@127.0.0.1:6379/abc"', "must be a number"),
        ('type = "redis"\nurl = "redis://127.0.0.1:6379/1/2"', "must be a number"),
        ('type = "redis"\nurl = "rediss://127.0.0.1:6379/ops"', "must be a number"),
        ('type = "redis"\nurl = "redis://127.0.0.1:6379/-1"', "must be a number"),
        (
            f'type = "nats"\nservers = ["nats://a:{SECRET}@127.0.0.1:4222", '
            f'"nats://a:{SECRET}x@127.0.0.2:4222"]',
            "carry different credentials",
        ),
        (
            f'type = "nats"\nservers = ["nats://a:{SECRET}@127.0.0.1:4222"]\nuser = "b"\n'
            f'password = "{SECRET}"',
            "carries other credentials",
        ),
    ],
    ids=[
        "redis-word",
        "redis-two-segments",
        "rediss-word",
        "redis-negative",
        "nats-two-sets",
        "nats-url-and-fields",
    ],
)
def test_misread_bus_urls_are_refused_at_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sink: str, says: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(BASE + f"[sink]\n{sink}\n")
    for command in ("check-config", "run"):
        assert main([command, "--config", str(path)]) == ExitCode.CONFIG, command
        err = capsys.readouterr().err
        assert says in err and ("sink.url" in err or "sink.servers" in err), (command, err)
        assert SECRET not in err


@pytest.mark.parametrize(
    "sink",
    [
        'type = "redis"\nurl = "redis://127.0.0.1:6379"',
        'type = "redis"\nurl = "redis://127.0.0.1:6379/"',
        'type = "redis"\nurl = "redis://127.0.0.1:6379/15"',
        f'type = "nats"\nservers = ["nats://a:{SECRET}@127.0.0.1:4222", "nats://127.0.0.2:4222"]',
        f'type = "nats"\nservers = ["nats://a:{SECRET}@127.0.0.1:4222"]\nuser = "a"\n'
        f'password = "{SECRET}"',
    ],
)
def test_bus_urls_that_are_read_as_written_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sink: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(BASE + f"[sink]\n{sink}\n")
    assert main(["check-config", "--config", str(path)]) == ExitCode.OK, capsys.readouterr().err
    assert SECRET not in capsys.readouterr().out
