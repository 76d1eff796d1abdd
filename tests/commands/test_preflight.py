"""opera-consumer preflight against the sandbox."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from support import count_lines, make_settings, running, toml_config, wait_until

from consumer.sandbox import SandboxOptions


def preflight(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consumer", "preflight", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def levels(out: str) -> dict[str, str]:
    return {
        line[19:37].strip(): line[:5].strip()
        for line in out.splitlines()
        if line[:4] in ("PASS", "WARN", "FAIL")
    }


async def test_every_item_passes_against_a_healthy_gateway(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=5)
    done = await asyncio.to_thread(preflight, toml_config(tmp_path, gw.url))
    assert done.returncode == 0, done.stdout + done.stderr
    got = levels(done.stdout)
    for item in (
        "token",
        "request headers",
        "gateway",
        "authentication",
        "round trip",
        "connection status",
        "subscription",
        "state store",
        "sink",
    ):
        assert got[item] == "PASS", (item, done.stdout)
    assert "Inactive" in done.stdout
    assert gw.stats.subscribes == [] or all("chainCode" not in s for s in gw.stats.subscribes)
    opts = SandboxOptions()
    for secret in (opts.app_key, opts.client_secret, *gw.issued_tokens):
        assert secret not in done.stdout + done.stderr


async def test_a_running_consumer_is_reported_and_left_alone(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=5)
    daemon_dir = tmp_path / "daemon"
    daemon_dir.mkdir()
    async with running(make_settings(daemon_dir, gw.url)) as daemon:
        await wait_until(lambda: count_lines(daemon_dir / "events.jsonl") >= 5)
        done = await asyncio.to_thread(preflight, toml_config(tmp_path, gw.url))
        assert levels(done.stdout)["connection status"] == "WARN"
        assert "another consumer" in done.stdout
        gw.append("DEMO", 3)
        await wait_until(lambda: count_lines(daemon_dir / "events.jsonl") >= 8)
        assert daemon.runners["main"].stats.connections == 1  # never disturbed
    assert done.returncode == 0


async def test_refused_credentials_fail_with_the_fix(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory()
    config = toml_config(tmp_path, gw.url)
    config.write_text(
        config.read_text().replace(
            'client_secret = "sandbox-secret"', 'client_secret = "nope-nope"'
        )
    )
    done = await asyncio.to_thread(preflight, config)
    assert done.returncode == 1
    assert levels(done.stdout)["token"] == "FAIL" and "client_id/client_secret" in done.stdout


async def test_the_postgres_sink_is_connected_and_a_bad_password_fails(
    sandbox_factory, tmp_path: Path, postgres_server
):
    gw = await sandbox_factory(backlog=5)
    for password, expected in ((None, "PASS"), ("wrong-password", "FAIL")):
        dsn = postgres_server.dsn(password=password)
        sink = f'[sink]\ntype = "postgres"\ndsn = "{dsn}"\ntable = "preflight_events"\n'
        config = toml_config(tmp_path, gw.url, sink=sink)
        done = await asyncio.to_thread(preflight, config)
        assert levels(done.stdout)["sink"] == expected, done.stdout
        assert (done.returncode == 0) == (expected == "PASS")
        assert "wrong-password" not in done.stdout + done.stderr


async def test_the_nats_sink_is_checked_without_publishing(
    sandbox_factory, tmp_path: Path, nats_server
):
    gw = await sandbox_factory(backlog=5)
    for on_start, expected in (("create", "PASS"), ("must-exist", "FAIL")):
        sink = f'[sink]\ntype = "nats"\nservers = ["{nats_server.url}"]\non_start = "{on_start}"\n'
        done = await asyncio.to_thread(preflight, toml_config(tmp_path, gw.url, sink=sink))
        assert levels(done.stdout)["sink"] == expected, done.stdout
        assert "OPERA" in done.stdout  # the stream, named either way
    # Nothing was created or published: a must-exist check still finds no stream.
    sink = f'[sink]\ntype = "nats"\nservers = ["{nats_server.url}"]\non_start = "must-exist"\n'
    done = await asyncio.to_thread(preflight, toml_config(tmp_path, gw.url, sink=sink))
    assert levels(done.stdout)["sink"] == "FAIL"


async def test_the_redis_sink_is_checked_and_a_bad_password_fails(
    sandbox_factory, tmp_path: Path, redis_factory
):
    gw = await sandbox_factory(backlog=5)
    server = redis_factory(users={"opera": ("redis-pw-5e1f", "~opera:* +@all")})
    for password, expected in (("redis-pw-5e1f", "PASS"), ("wrong-password", "FAIL")):
        url = server.url(user="opera", password=password)
        sink = f'[sink]\ntype = "redis"\nurl = "{url}"\n'
        done = await asyncio.to_thread(preflight, toml_config(tmp_path, gw.url, sink=sink))
        assert levels(done.stdout)["sink"] == expected, done.stdout
        assert password not in done.stdout + done.stderr
