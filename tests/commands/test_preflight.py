"""opera-consumer preflight against the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from pg import sql
from support import count_lines, make_settings, running, toml_config, wait_until

from consumer.config import load_settings
from consumer.sandbox import SandboxOptions


def preflight(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consumer", "preflight", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def postgres_config(
    tmp_path: Path,
    url: str,
    dsn: str,
    schema: str,
    *,
    timeout_s: float | None = None,
    sink: str | None = None,
) -> Path:
    """toml_config's settings with the state store in ``schema`` on PostgreSQL."""
    config = toml_config(tmp_path, url, sink=sink)
    state = f'backend = "postgres"\ndsn = "{dsn}"\nschema = "{schema}"'
    if timeout_s is not None:
        state += f"\ntimeout_s = {timeout_s:g}"
    text = config.read_text().replace(f'path = "{tmp_path / "state.db"}"', state)
    config.write_text(text.replace("commit_max_events = 500\n", ""))
    return config


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
    # The bundled sandbox config (launcher.stream_config, as `make demo` writes it) draws no
    # warning: it gives an enterprise_id, so a newcomer's first preflight is clean.
    assert [line for line in done.stdout.splitlines() if not line.startswith("PASS")] == []
    assert "enterprise_id" not in done.stderr
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
    # Persistent: a server that keeps nothing is a WARN (tests/sinks/test_redis_durability.py).
    server = redis_factory(users={"opera": ("redis-pw-5e1f", "~opera:* +@all")}, appendonly=True)
    for password, expected in (("redis-pw-5e1f", "PASS"), ("wrong-password", "FAIL")):
        url = server.url(user="opera", password=password)
        sink = f'[sink]\ntype = "redis"\nurl = "{url}"\n'
        done = await asyncio.to_thread(preflight, toml_config(tmp_path, gw.url, sink=sink))
        assert levels(done.stdout)["sink"] == expected, done.stdout
        assert password not in done.stdout + done.stderr


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root``: (size, mtime in ns)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def refused_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_refused_port_fails_at_once_naming_the_url(tmp_path: Path):
    """Issue #13: a wrong port made preflight retry for 1 min 33 s without naming the URL."""
    port = refused_port()
    config = toml_config(tmp_path, f"http://127.0.0.1:{port}")
    done = await asyncio.to_thread(preflight, config)
    assert done.returncode == 1, done.stdout + done.stderr
    assert levels(done.stdout)["token"] == "FAIL"
    token = next(line for line in done.stdout.splitlines() if line[19:37].strip() == "token")
    assert f"http://127.0.0.1:{port}/oauth/v1/tokens" in token and "connection refused" in token
    assert "Traceback" not in done.stderr
    # One attempt, no retry loop (a retry logs this before each wait; the daemon retries).
    assert "token request failed; retrying" not in done.stderr, done.stderr


@contextlib.asynccontextmanager
async def plain_http_server() -> AsyncIterator[int]:
    """A server that answers anything with a plain HTTP 400, as a web server does to a TLS
    ClientHello; yields its port."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("server", ["sandbox", "answers-400"])
async def test_https_against_a_plain_http_server_names_a_tls_error(
    sandbox_factory, tmp_path: Path, server: str
):
    """Issue #13: it took 1 min 47 s and ended with an empty reason. The sandbox waits for a
    request line that never comes (the handshake times out); a web server answers 400."""
    async with contextlib.AsyncExitStack() as stack:
        if server == "sandbox":
            url = (await sandbox_factory()).url.replace("http://", "https://")
        else:
            url = f"https://127.0.0.1:{await stack.enter_async_context(plain_http_server())}"
        config = toml_config(tmp_path, url, "[http]\nconnect_timeout_s = 2.0")
        done = await asyncio.to_thread(preflight, config)
    assert done.returncode == 1
    token = next(line for line in done.stdout.splitlines() if line[19:37].strip() == "token")
    assert token.startswith("FAIL") and f"{url}/oauth/v1/tokens" in token, done.stdout
    assert "TLS error" in token and "plain-HTTP" in token, token


async def test_preflight_creates_and_changes_nothing(sandbox_factory, tmp_path: Path):
    """Issue #13: it created the state directory and database. Nothing is created before the
    first run (the items say the daemon will create them), nor touched after it."""
    gw = await sandbox_factory(backlog=5)
    config = toml_config(
        tmp_path,
        gw.url,
        sink='[sink]\npath = "out/events.jsonl"',
    )
    text = config.read_text().replace(f'path = "{tmp_path / "state.db"}"', 'path = "var/state.db"')
    config.write_text(text)
    before = tree(tmp_path)
    done = await asyncio.to_thread(preflight, config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert tree(tmp_path) == before
    got = levels(done.stdout)
    assert got["state store"] == got["sink"] == "PASS"
    assert f"{tmp_path / 'var' / 'state.db'} does not exist yet" in done.stdout
    assert f"{tmp_path / 'out' / 'events.jsonl'} does not exist yet" in done.stdout

    # After a run: the store, its directory and the sink are there, and stay as they are.
    async with running(load_settings(config)):
        await wait_until(lambda: count_lines(tmp_path / "out" / "events.jsonl") >= 5)
    before = tree(tmp_path)
    done = await asyncio.to_thread(preflight, config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{tmp_path / 'var' / 'state.db'} writable" in done.stdout
    assert tree(tmp_path) == before  # no -wal/-shm, no new mtime


async def test_postgres_state_and_sink_are_tried_and_rolled_back(
    sandbox_factory, tmp_path: Path, postgres_server
):
    """The schema and the table the daemon would create are created in a transaction that
    is rolled back: their privileges are tried, and nothing is left behind."""
    gw = await sandbox_factory(backlog=5)
    dsn = postgres_server.dsn()
    sink = f'[sink]\ntype = "postgres"\ndsn = "{dsn}"\ntable = "rolled_back_events"\n'
    config = postgres_config(tmp_path, gw.url, dsn, "preflight_untouched", sink=sink)
    done = await asyncio.to_thread(preflight, config)
    assert done.returncode == 0, done.stdout + done.stderr
    got = levels(done.stdout)
    assert got["state store"] == got["sink"] == "PASS", done.stdout
    assert not await sql(
        dsn,
        "fetchval",
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
        "preflight_untouched",
    )
    assert await sql(dsn, "fetchval", "SELECT to_regclass('rolled_back_events')") is None


async def test_a_postgres_state_store_that_does_not_answer_fails_in_time(
    sandbox_factory, tmp_path: Path, postgres_server
):
    """The set-up waits for the migration lock (a daemon migrating, or stuck, holds it): the
    item fails within [state] timeout_s, naming the store and the timeout, instead of
    holding the checklist for ever; and nothing is left behind."""
    from consumer.state.postgres import migration_lock_key

    gw = await sandbox_factory(backlog=5)
    dsn = postgres_server.dsn()
    config = postgres_config(tmp_path, gw.url, dsn, "preflight_locked", timeout_s=1)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", migration_lock_key("preflight_locked"))
        done = await asyncio.to_thread(preflight, config)  # its timeout only catches a hang
    finally:
        await conn.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert levels(done.stdout)["state store"] == "FAIL", done.stdout
    assert f"state store PostgreSQL {postgres_server.host}:{postgres_server.port}/" in done.stdout
    assert "(schema preflight_locked): trying the set-up: no answer within 1 s" in done.stdout
    assert not await sql(
        dsn,
        "fetchval",
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
        "preflight_locked",
    )


def test_a_servers_words_are_one_bounded_line_without_controls():
    """A detail carries a server's words (a close reason, a connection status): the checklist
    prints each on one line, bounded, with no control reaching the terminal."""
    from consumer.commands.preflight import DETAIL_LIMIT, Item, _Checks

    items: list[Item] = []
    checks = _Checks(items.append)
    said = "Active\n\x1b[2J\x9b\u202e"
    checks.add("WARN", "main", "connection status", said + "x" * 5000)
    (item,) = items
    shown = "Active\\n\\x1b[2J\\x9b\\u202e" + "x" * (DETAIL_LIMIT - len(said)) + "…"
    assert item.detail == shown and shown.isprintable()
    assert not checks.failed


def run_once(config: Path) -> subprocess.CompletedProcess[str]:
    """``run`` as a process; here it refuses to start, so it ends by itself."""
    return subprocess.run(
        [sys.executable, "-m", "consumer", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def adopt(config: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "sink", "adopt", "--execute", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


NO_LENGTH = "holds 10 bytes, but the state store has no committed length for it"


async def test_a_jsonl_file_the_state_store_has_no_length_for_fails_as_run_refuses_it(
    sandbox_factory, tmp_path: Path
):
    """preflight said PASS where run refused (exit 78): a new state store beside a non-empty
    events.jsonl. It asks the sink itself now, and FAILs with run's words and fix."""
    gw = await sandbox_factory(backlog=5)
    config = toml_config(tmp_path, gw.url)
    (tmp_path / "events.jsonl").write_text('{"old":1}\n')
    before = tree(tmp_path)
    done = await asyncio.to_thread(preflight, config)
    assert done.returncode == 1, done.stdout + done.stderr
    assert levels(done.stdout)["sink"] == "FAIL", done.stdout
    assert NO_LENGTH in done.stdout and "sink adopt" in done.stdout
    assert tree(tmp_path) == before  # nothing created, nothing cut
    ran = await asyncio.to_thread(run_once, config)
    assert ran.returncode == 78, ran.stderr
    assert NO_LENGTH in ran.stderr and "sink adopt" in ran.stderr
    # The store run created has no length either; once adopted, both go on.
    done = await asyncio.to_thread(preflight, config)
    assert levels(done.stdout)["sink"] == "FAIL", done.stdout
    await asyncio.to_thread(adopt, config)
    done = await asyncio.to_thread(preflight, config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert levels(done.stdout)["sink"] == "PASS", done.stdout


async def test_the_jsonl_length_is_read_from_a_postgres_state_store(
    sandbox_factory, tmp_path: Path, postgres_server
):
    """The same with the PostgreSQL state store: its committed length is read in the
    rolled-back transaction."""
    gw = await sandbox_factory(backlog=5)
    dsn = postgres_server.dsn()
    config = postgres_config(tmp_path, gw.url, dsn, "preflight_jsonl")
    (tmp_path / "events.jsonl").write_text('{"old":1}\n')
    try:
        done = await asyncio.to_thread(preflight, config)
        assert levels(done.stdout).get("sink") == "FAIL", done.stdout + done.stderr
        assert NO_LENGTH in done.stdout
        await asyncio.to_thread(adopt, config)
        done = await asyncio.to_thread(preflight, config)
        assert done.returncode == 0, done.stdout + done.stderr
        assert levels(done.stdout)["state store"] == levels(done.stdout)["sink"] == "PASS"
    finally:
        await sql(dsn, "execute", "DROP SCHEMA IF EXISTS preflight_jsonl CASCADE")


async def test_preflight_connects_as_the_daemon_does_with_the_unconfirmed_options(
    sandbox_factory, tmp_path: Path
):
    """upgrade_authorization and init_enterprise_id change what the daemon sends; preflight
    sends the same (a gateway that wants them would otherwise fail preflight and not the
    daemon, or the other way round), and says what is valid but probably wrong."""
    gw = await sandbox_factory(backlog=5, require_upgrade_authorization=True, enterprise_id="E1")
    connection = {"upgrade_authorization": "true", "init_enterprise_id": "true"}
    config = toml_config(tmp_path, gw.url, connection=connection)
    text = config.read_text()
    given = next(line for line in text.splitlines() if line.startswith("enterprise_id"))
    config.write_text(text.replace(given, 'enterprise_id = "E1"', 1))
    done = await asyncio.to_thread(preflight, config)
    assert done.returncode == 0, done.stdout + done.stderr
    got = levels(done.stdout)
    assert got["gateway"] == got["authentication"] == "PASS", done.stdout
    assert gw.stats.init_enterprise_ids == ["E1"]

    # Without the enterprise id (client_credentials, the default grant): said, as a warning.
    gw = await sandbox_factory(backlog=5)
    config = toml_config(tmp_path, gw.url)
    text = config.read_text()
    given = next(line for line in text.splitlines() if line.startswith("enterprise_id"))
    config.write_text(text.replace(given + "\n", "", 1))  # the sandbox's config gives one
    done = await asyncio.to_thread(preflight, config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert levels(done.stdout)["auth.enterprise_id"] == "WARN", done.stdout


def with_metrics_port(config: Path, port: int) -> Path:
    text = config.read_text()
    assert "[metrics]\nport = 0\n" in text
    config.write_text(text.replace("[metrics]\nport = 0\n", f"[metrics]\nport = {port}\n"))
    return config


def port_in_time_wait() -> int:
    """A loopback port whose listener is gone, a connection it closed first in TIME_WAIT: as
    after any daemon stop that closed a scrape's connection."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = int(server.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = server.accept()
            conn.close()  # the server's side closes first: its end waits in TIME_WAIT
            client.recv(1)
    return port


async def test_a_stopped_daemons_metrics_port_is_free(sandbox_factory, tmp_path: Path):
    """Issue: "in use (a running daemon?)" after every daemon stop, for the TIME_WAIT of its
    last connections: the probe bound without SO_REUSEADDR, which the daemon's server sets."""
    gw = await sandbox_factory(backlog=5)
    port = port_in_time_wait()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the old probe did: refused
    done = await asyncio.to_thread(
        preflight, with_metrics_port(toml_config(tmp_path, gw.url), port)
    )
    line = next(x for x in done.stdout.splitlines() if "metrics address" in x)
    assert line.startswith("PASS") and f"127.0.0.1:{port} free" in line, done.stdout
    assert done.returncode == 0, done.stdout + done.stderr


async def test_a_metrics_port_another_program_holds_fails(sandbox_factory, tmp_path: Path):
    """`run` exits 78 on a taken metrics port; preflight said WARN and "all checks passed"."""
    gw = await sandbox_factory(backlog=5)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = int(other.getsockname()[1])
        config = with_metrics_port(toml_config(tmp_path, gw.url), port)
        done = await asyncio.to_thread(preflight, config)
    line = next(x for x in done.stdout.splitlines() if "metrics address" in x)
    assert line.startswith("FAIL"), done.stdout
    assert "no opera-consumer holds the state store" in line and "[metrics] port" in line
    assert done.returncode == 1 and "all checks passed" not in done.stderr


async def test_the_running_daemons_metrics_port_is_a_warning(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=5)
    async with running(make_settings(tmp_path, gw.url)) as daemon:
        await wait_until(lambda: count_lines(tmp_path / "events.jsonl") >= 5)
        port = daemon.metrics_server.port  # same state store as the config below
        config = with_metrics_port(toml_config(tmp_path, gw.url), port)
        done = await asyncio.to_thread(preflight, config)
    line = next(x for x in done.stdout.splitlines() if "metrics address" in x)
    assert line.startswith("WARN") and "the running daemon" in line, done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
