"""The documented systemd install keeps the OHIP secrets in /etc/credstore, handed to the
service alone (LoadCredential=): every command run from a shell exited 78 asking for them,
though only `run`, `preflight` and `dlq replay` with orchestration use them. Real files, real
CLI processes (this worktree's code)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from support import cli

from consumer.config import StateSettings, load_settings, secret_values
from consumer.config.loading import UnsetSecret, unset_secrets
from consumer.core.records import CommitBatch, DeadLetter
from consumer.errors import ConfigError, ExitCode
from consumer.state import open_store

REPO = Path(__file__).resolve().parents[2]
APP_KEY = "app-key-FROM-THE-CREDSTORE-1"
CLIENT_SECRET = "client-secret-FROM-THE-CREDSTORE-2"


def shell_env(**extra: str) -> dict[str, str]:
    """An operator's shell: no credentials directory, no OPERA_CONSUMER_ variables."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "CREDENTIALS_DIRECTORY" and not k.upper().startswith("OPERA_CONSUMER_")
    }
    return {**env, "PYTHONPATH": str(REPO), **extra}  # this worktree's code


def installed(tmp_path: Path, auth: str = "") -> tuple[Path, Path]:
    """A config without secrets (as the README's systemd section installs it) and the
    credentials directory systemd makes for the service from /etc/credstore."""
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[streams.main]
gateway_url = "https://gw.example.com"
chain_code = "CHAIN1"

[streams.main.auth]
client_id = "cid"
enterprise_id = "ENT1"
{auth}

[state]
path = "{tmp_path / "state.db"}"

[sink]
path = "{tmp_path / "events.jsonl"}"
"""
    )
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "streams__main__app_key").write_text(APP_KEY)
    (creds / "streams__main__auth__client_secret").write_text(CLIENT_SECRET)
    return config, creds


def test_the_state_store_commands_run_without_the_stream_secrets(tmp_path: Path) -> None:
    config, _ = installed(tmp_path)
    env = shell_env()
    made = cli("sink", "adopt", "--execute", "--config", str(config), env=env)
    assert made.returncode == 0, made.stderr
    for args in (
        ["status"],
        ["dlq", "list"],
        ["dlq", "purge", "--all"],
        ["dlq", "replay", "--all", "--dry-run"],
        ["offset", "show"],
        ["offset", "set", "main", "12"],
        ["offset", "reset", "main", "--highest"],
        ["status", "--json"],  # last: its output read below (one process less)
    ):
        done = cli(*args, "--config", str(config), env=env)
        assert done.returncode == 0, (args, done.stderr)
        assert "app_key" not in done.stderr and "client_secret" not in done.stderr, args
    status = json.loads(done.stdout)
    assert status  # the store's view, whatever its shape
    shown = cli("dlq", "show", "1", "--config", str(config), env=env)
    assert shown.returncode == ExitCode.RUNTIME and "no dead letter with id 1" in shown.stderr


def test_preflight_still_needs_them(tmp_path: Path) -> None:
    config, _ = installed(tmp_path)
    done = cli("preflight", "--config", str(config), env=shell_env())
    assert done.returncode == ExitCode.CONFIG
    assert "streams.main.app_key" in done.stderr
    assert "streams.main.auth.client_secret" in done.stderr
    assert "LoadCredential=streams__main__app_key:" in done.stderr


async def seeded(config: Path) -> None:
    """A dead letter of stream main in the store (made as the daemon makes it)."""
    event = {
        "metadata": {"offset": "101", "uniqueEventId": "uid-1"},
        "eventName": "CHECK IN",
        "primaryKey": "pk-1",
        "detail": [],
    }
    store = await open_store(StateSettings(path=config.parent / "state.db"))
    try:
        letter = DeadLetter(
            stream="main",
            reason="sink_rejected",
            error="x",
            payload=json.dumps(event),
            offset="101",
            unique_event_id="uid-1",
            event_name="CHECK IN",
            primary_key="pk-1",
        )
        await store.commit(CommitBatch(dead_letters=[letter]))
    finally:
        await store.close()


async def test_a_replay_without_orchestration_goes_without_them(tmp_path: Path) -> None:
    """The sink only writes (jsonl here): the streams' OAuth credentials are used by
    orchestration alone, and `dlq replay` exited 78 asking for them."""
    config, _ = installed(tmp_path)
    await seeded(config)
    done = await asyncio.to_thread(
        cli, "dlq", "replay", "--all", "--json", "--config", str(config), env=shell_env()
    )
    assert done.returncode == 0, done.stderr
    assert [o["result"] for o in json.loads(done.stdout)] == ["delivered"]
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(x)["metadata"]["uniqueEventId"] for x in lines] == ["uid-1"]


async def test_a_replay_with_orchestration_still_needs_them(tmp_path: Path) -> None:
    """Orchestration asks the REST API with each stream's token: 78 before anything is
    opened, naming the secrets; the letter stays."""
    config, _ = installed(tmp_path)
    with config.open("a") as f:
        f.write(
            "[orchestration]\nenabled = true\n[orchestration.resources]\n"
            '"CHECK IN" = "https://127.0.0.1:9/rsv/{primaryKey}"\n'
        )
    await seeded(config)
    done = await asyncio.to_thread(
        cli, "dlq", "replay", "--all", "--config", str(config), env=shell_env()
    )
    assert done.returncode == ExitCode.CONFIG, done.stderr
    assert "`dlq replay` with orchestration enabled" in done.stderr
    assert "streams.main.app_key: not given" in done.stderr
    assert "streams.main.auth.client_secret: not given" in done.stderr
    assert "LoadCredential=streams__main__app_key:" in done.stderr
    assert not (tmp_path / "events.jsonl").exists()
    listed = await asyncio.to_thread(
        cli, "dlq", "list", "--json", "--config", str(config), env=shell_env()
    )
    assert [row["unique_event_id"] for row in json.loads(listed.stdout)] == ["uid-1"]


def test_check_config_validates_the_rest_and_says_what_run_lacks(tmp_path: Path) -> None:
    """check-config predicts `run`: 78 without the secrets, after checking everything else and
    printing it; the secrets shown as not given. With the service's credentials: OK."""
    config, creds = installed(tmp_path)
    done = cli("check-config", "--config", str(config), env=shell_env())
    assert done.returncode == ExitCode.CONFIG
    shown = json.loads(done.stdout)["streams"]["main"]
    assert shown["app_key"] == "(not given)"
    assert shown["auth"]["client_secret"] == "(not given)"
    assert "invalid configuration for `run` (the rest is valid" in done.stderr
    assert "streams.main.app_key: not given" in done.stderr
    assert "streams.main.auth.client_secret: not given" in done.stderr
    assert "configuration OK" not in done.stderr

    with_creds = cli(
        "check-config", "--config", str(config), env=shell_env(CREDENTIALS_DIRECTORY=str(creds))
    )
    assert with_creds.returncode == 0, with_creds.stderr
    assert "configuration OK" in with_creds.stderr
    shown = json.loads(with_creds.stdout)["streams"]["main"]
    assert shown["app_key"] == "**********"
    assert APP_KEY not in with_creds.stdout + with_creds.stderr

    bad = config.read_text().replace('chain_code = "CHAIN1"', 'chain_code = "BAD!"')
    config.write_text(bad)
    invalid = cli("check-config", "--config", str(config), env=shell_env())
    assert invalid.returncode == ExitCode.CONFIG
    assert "chainCode 'BAD!' is invalid" in invalid.stderr  # the rest is still checked
    assert "app_key" not in invalid.stderr  # that one first: the secrets after it


@pytest.mark.usefixtures("hermetic_config")
def test_a_secret_asked_for_after_all_is_a_configuration_error(tmp_path: Path) -> None:
    config, _ = installed(
        tmp_path, auth='grant = "password"\nusername = "INTEGRATION"\nclient_secret = "given"'
    )
    settings = load_settings(config, stream_secrets=False)
    stream = settings.streams["main"]
    assert stream.auth.client_secret.get_secret_value() == "given"
    assert unset_secrets(settings) == ["streams.main.app_key", "streams.main.auth.password"]
    assert isinstance(stream.app_key, UnsetSecret)
    with pytest.raises(ConfigError) as info:
        stream.app_key.get_secret_value()
    assert "streams.main.app_key: not given to this command" in str(info.value)
    assert "OPERA_CONSUMER_STREAMS__MAIN__APP_KEY" in str(info.value)
    assert "given" in secret_values(settings)  # the one it has is still masked
    with pytest.raises(ConfigError) as info:
        load_settings(config)  # what `run` loads
    assert "streams.main.app_key" in str(info.value)
