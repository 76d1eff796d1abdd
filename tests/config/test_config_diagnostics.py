"""Issue #13: relative paths resolve against the config file's directory (and check-config
shows them resolved), an environment variable is named as what set a bad key, an empty
app_key is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from config_files import config_error

from consumer.config import load_settings

STREAM = """
[streams.main]
gateway_url = "https://gw.example.com"
chain_code = "CHAIN1"
app_key = "app-key-0001"

[streams.main.auth]
client_id = "cid"
client_secret = "secret-0002"
"""

pytestmark = pytest.mark.usefixtures("hermetic_config")


def config_in(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(STREAM + text)
    return path


def test_relative_paths_resolve_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    config = config_in(
        etc, '[state]\npath = "var/state.db"\n[sink]\npath = "../out/events.jsonl"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(Path("../etc/config.toml"))
    assert settings.state.path == etc / "var" / "state.db"
    # ".." is kept (lexically dropping it would be wrong where etc is a symlink).
    assert settings.sink.path == etc / ".." / "out" / "events.jsonl"  # type: ignore[union-attr]
    # Absolute paths are kept as written; so is a config without relative paths.
    config.write_text(STREAM + f'[state]\npath = "{tmp_path / "abs.db"}"\n')
    assert load_settings(config).state.path == tmp_path / "abs.db"


def test_defaults_and_sink_files_resolve_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    etc = tmp_path / "etc"
    config = config_in(
        etc,
        '[sink]\ntype = "nats"\ncreds_file = "nats.creds"\ntls_ca_file = "tls/ca.pem"\n',
    )
    monkeypatch.chdir(tmp_path)
    settings = load_settings(config)
    assert settings.state.path == etc / "opera-consumer.db"  # the default, beside the config
    sink = settings.sink
    assert sink.creds_file == etc / "nats.creds"  # type: ignore[union-attr]
    assert sink.tls_ca_file == etc / "tls" / "ca.pem"  # type: ignore[union-attr]
    sqlite = load_settings(config_in(etc, '[sink]\ntype = "sqlite"\npath = "rows.db"\n'))
    assert sqlite.sink.path == etc / "rows.db"  # type: ignore[union-attr]


def test_check_config_prints_the_resolved_paths(tmp_path: Path) -> None:
    """Run from another directory, as `status` was when it read another store."""
    config = config_in(tmp_path / "etc", '[state]\npath = "state.db"\n')
    (tmp_path / "elsewhere").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "check-config", "--config", "../etc/config.toml"],
        cwd=tmp_path / "elsewhere",
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["state"]["path"] == str(tmp_path / "etc" / "state.db")
    assert shown["sink"]["path"] == str(tmp_path / "etc" / "events.jsonl")
    assert str(config) in done.stderr and "resolved against its directory" in done.stderr


def test_a_python_sink_module_beside_the_config_file_is_found(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "beside_config_sink.py").write_text(
        "async def handle(stream, events):\n    return None\n"
    )
    config_in(etc, '[sink]\ntype = "python"\ntarget = "beside_config_sink:handle"\n')
    (tmp_path / "elsewhere").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "consumer", "check-config", "--config", "../etc/config.toml"],
        cwd=tmp_path / "elsewhere",
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sink"]["target"] == "beside_config_sink:handle"


def test_an_unknown_key_set_by_the_environment_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPERA_CONSUMER_STREAMS__MAIN__CONNECTION__PING_INTERVALL_S", "5")
    message = config_error(config_in(tmp_path, ""))
    assert (
        "streams.main.connection.ping_intervall_s (from the environment variable "
        "OPERA_CONSUMER_STREAMS__MAIN__CONNECTION__PING_INTERVALL_S)" in message
    )
    assert "unset or rename it" in message


def test_a_bad_value_set_by_the_environment_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPERA_CONSUMER_PIPELINE__WORKERS", "many")
    message = config_error(config_in(tmp_path, ""))
    assert "pipeline.workers (from the environment variable OPERA_CONSUMER_PIPELINE__WORKERS)" in (
        message
    )
    assert "many" not in message  # never the value: it may be a secret


def test_a_key_of_the_file_is_not_said_to_come_from_the_environment(tmp_path: Path) -> None:
    message = config_error(config_in(tmp_path, "[pipeline]\nworkerz = 3\n"))
    assert "pipeline.workerz: Extra inputs are not permitted" in message
    assert "environment" not in message and "remove or rename it" in message


def test_a_variable_that_names_no_key_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydantic-settings would ignore it without a word: one '_' short sets nothing."""
    monkeypatch.setenv("OPERA_CONSUMER_STATE_PATH", "/tmp/x.db")
    message = config_error(config_in(tmp_path, ""))
    assert "OPERA_CONSUMER_STATE_PATH: names no key" in message
    assert "OPERA_CONSUMER_STATE__PATH" in message  # the spelling that works


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('app_key = "app-key-0001"', 'app_key = ""', "streams.main.app_key: is empty"),
        ('app_key = "app-key-0001"', 'app_key = "   "', "streams.main.app_key: is empty"),
        (
            'client_secret = "secret-0002"',
            'client_secret = ""',
            "streams.main.auth.client_secret: is empty",
        ),
    ],
)
def test_an_empty_secret_is_refused(tmp_path: Path, old: str, new: str, key: str) -> None:
    """Issue #13: `app_key = ""` passed check-config, to be refused by the gateway later."""
    path = config_in(tmp_path, "")
    path.write_text(path.read_text().replace(old, new))
    assert key in config_error(path)
