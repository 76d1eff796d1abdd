"""The documented systemd install hands the sink's secret (a postgres sink's dsn, a webhook's
token or password) to the service alone, as the streams' (LoadCredential=): `status`, `dlq
list`, `offset` and the others exited 78 asking for it in an operator's shell, though only
`run`, `preflight` and `dlq replay` open the sink. A postgres state store's dsn stays needed
by every command that reads the state. Real files, real CLI processes (this worktree's code),
a real PostgreSQL server for the state on it."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support import cli, dead_letter

from consumer.config import StateSettings, load_settings, secret_values
from consumer.config.loading import UnsetSecret, effective, unset_secrets
from consumer.core.records import CommitBatch
from consumer.errors import ConfigError, ExitCode
from consumer.state import open_store

REPO = Path(__file__).resolve().parents[2]
SINK_SECRET = "sink-secret-FROM-THE-CREDSTORE-3"
APP_KEY = "app-key-FROM-THE-CREDSTORE-1"
CLIENT_SECRET = "client-secret-FROM-THE-CREDSTORE-2"

# sink table (without its secret) -> the secret's key
SINKS: dict[str, tuple[str, str]] = {
    "webhook-bearer": (
        'type = "webhook"\nurl = "https://hooks.example.com/in"\nauth = "bearer"',
        "sink.token",
    ),
    "webhook-basic": (
        'type = "webhook"\nurl = "https://hooks.example.com/in"\nauth = "basic"\n'
        'username = "opera"',
        "sink.password",
    ),
    "postgres": ('type = "postgres"\ntable = "opera_events"', "sink.dsn"),
}


def shell_env(**extra: str) -> dict[str, str]:
    """An operator's shell: no credentials directory, no OPERA_CONSUMER_ variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "CREDENTIALS_DIRECTORY" and not k.upper().startswith("OPERA_CONSUMER_")
    }
    return {**env, "PYTHONPATH": str(REPO), **extra}


def secret_of(key: str) -> str:
    """The credential's value: a DSN the driver reads, or a token or password."""
    if key == "sink.dsn":
        return f"postgresql://opera:{SINK_SECRET}@127.0.0.1:9/events"
    return SINK_SECRET


def installed(tmp_path: Path, sink: str, state: str = "") -> tuple[Path, Path]:
    """A config without secrets and the credentials directory systemd makes for the service
    (every secret: the streams', the sink's)."""
    table, key = SINKS[sink]
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[streams.main]
gateway_url = "https://gw.example.com"
chain_code = "CHAIN1"

[streams.main.auth]
client_id = "cid"
enterprise_id = "ENT1"

[state]
path = "{tmp_path / "state.db"}"
{state}

[sink]
{table}
"""
    )
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "streams__main__app_key").write_text(APP_KEY)
    (creds / "streams__main__auth__client_secret").write_text(CLIENT_SECRET)
    (creds / key.replace(".", "__")).write_text(secret_of(key))
    return config, creds


async def seeded(state: StateSettings) -> None:
    """The store the daemon made, with a dead letter in it."""
    store = await open_store(state)
    try:
        await store.commit(CommitBatch(dead_letters=[dead_letter(1)]))
    finally:
        await store.close()


@pytest.mark.parametrize("sink", list(SINKS))
def test_the_state_store_commands_run_without_the_sink_secret(tmp_path: Path, sink: str) -> None:
    config, _ = installed(tmp_path, sink)
    asyncio.run(seeded(StateSettings(path=tmp_path / "state.db")))
    env = shell_env()
    for args in (
        ["status"],
        ["status", "--json"],
        ["dlq", "list"],
        ["dlq", "show", "1"],
        ["dlq", "replay", "--all", "--dry-run"],
        ["offset", "show"],
        ["offset", "set", "main", "12", "--execute"],
        ["offset", "reset", "main", "--highest"],
        ["dlq", "purge", "--all"],
    ):
        done = cli(*args, "--config", str(config), env=env)
        assert done.returncode == 0, (args, done.stderr)
        assert "sink." not in done.stderr and "sink__" not in done.stderr, (args, done.stderr)
    listed = cli("dlq", "list", "--json", "--config", str(config), env=env)
    assert json.loads(listed.stdout) == []  # the purge went through


@pytest.mark.parametrize("sink", list(SINKS))
@pytest.mark.parametrize("args", [["run"], ["preflight"], ["dlq", "replay", "--all"]])
def test_the_commands_that_deliver_still_need_it(
    tmp_path: Path, sink: str, args: list[str]
) -> None:
    """With the streams' secrets given and the sink's file absent from the credentials: 78
    before anything connects, naming the sink's key (and not the streams', which `dlq
    replay` without orchestration does not use)."""
    config, creds = installed(tmp_path, sink)
    key = SINKS[sink][1]
    (creds / key.replace(".", "__")).unlink()
    asyncio.run(seeded(StateSettings(path=tmp_path / "state.db")))
    done = cli(*args, "--config", str(config), env=shell_env(CREDENTIALS_DIRECTORY=str(creds)))
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert f"{key}:" in done.stderr, done.stderr
    assert f"LoadCredential={key.replace('.', '__')}:" in done.stderr
    assert "app_key" not in done.stderr and "client_secret" not in done.stderr


@pytest.mark.parametrize("sink", list(SINKS))
def test_check_config_says_what_run_lacks(tmp_path: Path, sink: str) -> None:
    config, creds = installed(tmp_path, sink)
    key = SINKS[sink][1]
    done = cli("check-config", "--config", str(config), env=shell_env())
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert json.loads(done.stdout)["sink"][key.split(".")[1]] == "(not given)"
    assert "invalid configuration for `run` (the rest is valid" in done.stderr
    assert f"  {key}: not given" in done.stderr
    assert f"LoadCredential={key.replace('.', '__')}:" in done.stderr
    assert "streams.main.app_key: not given" in done.stderr
    assert "configuration OK" not in done.stderr

    given = cli(
        "check-config", "--config", str(config), env=shell_env(CREDENTIALS_DIRECTORY=str(creds))
    )
    assert given.returncode == 0, given.stderr
    assert "configuration OK" in given.stderr
    assert json.loads(given.stdout)["sink"][key.split(".")[1]] == "**********"
    assert SINK_SECRET not in given.stdout + given.stderr


@pytest.mark.usefixtures("hermetic_config")
def test_a_sink_secret_asked_for_after_all_is_a_configuration_error(tmp_path: Path) -> None:
    config, _ = installed(tmp_path, "postgres")
    settings = load_settings(config, stream_secrets=False, sink_secrets=False)
    assert unset_secrets(settings) == [
        "streams.main.app_key",
        "streams.main.auth.client_secret",
        "sink.dsn",
    ]
    dsn = getattr(settings.sink, "dsn", None)
    assert isinstance(dsn, UnsetSecret)
    with pytest.raises(ConfigError) as info:
        dsn.get_secret_value()
    assert "sink.dsn: not given to this command" in str(info.value)
    assert "OPERA_CONSUMER_SINK__DSN" in str(info.value)
    assert secret_values(settings) == []  # nothing to mask, and no error
    assert effective(settings)["sink"]["dsn"] == "(not given)"
    # Only the sink's: the streams' secrets are still asked for.
    with pytest.raises(ConfigError) as info:
        load_settings(config, sink_secrets=False)
    assert "streams.main.app_key" in str(info.value) and "sink.dsn" not in str(info.value)


def test_a_given_sink_secret_is_kept_and_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, creds = installed(tmp_path, "webhook-bearer")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = load_settings(config, stream_secrets=False, sink_secrets=False)
    token = getattr(settings.sink, "token", None)
    assert token is not None and token.get_secret_value() == SINK_SECRET
    assert unset_secrets(settings) == []
    assert SINK_SECRET in secret_values(settings)


async def test_a_postgres_state_store_dsn_stays_required(postgres_dsn: str, tmp_path: Path) -> None:
    """State and sink on PostgreSQL, both DSNs credentials (the sink's may be the state's
    very database): `status` runs with the state's alone, and without it says so (78)."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    state = f'backend = "postgres"\nschema = "{schema}"'
    config, creds = installed(tmp_path, "postgres", state=state)
    (creds / "state__dsn").write_text(postgres_dsn)
    (creds / "sink__dsn").write_text(postgres_dsn)
    settings: dict[str, Any] = {"backend": "postgres", "dsn": postgres_dsn, "schema": schema}
    await seeded(StateSettings(**settings))
    try:
        state_only = tmp_path / "state-only"
        state_only.mkdir()
        (state_only / "state__dsn").write_text(postgres_dsn)
        env = shell_env(CREDENTIALS_DIRECTORY=str(state_only))
        for args in (["status", "--json"], ["dlq", "list", "--json"], ["offset", "show"]):
            done = await asyncio.to_thread(cli, *args, "--config", str(config), env=env)
            assert done.returncode == 0, (args, done.stderr)
        listed = await asyncio.to_thread(
            cli, "dlq", "list", "--json", "--config", str(config), env=env
        )
        assert [row["unique_event_id"] for row in json.loads(listed.stdout)] == ["uid-1"]

        none = await asyncio.to_thread(cli, "status", "--config", str(config), env=shell_env())
        assert none.returncode == ExitCode.CONFIG
        assert "state.dsn" in none.stderr and "sink.dsn" not in none.stderr

        run = await asyncio.to_thread(cli, "check-config", "--config", str(config), env=env)
        assert run.returncode == ExitCode.CONFIG
        assert "  sink.dsn: not given" in run.stderr and "state.dsn" not in run.stderr
    finally:
        conn = await asyncpg.connect(postgres_dsn, timeout=10)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
