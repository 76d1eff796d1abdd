"""Configuration: TOML + environment + secret files, strict keys, errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.config import effective, load_settings
from consumer.errors import ConfigError

MINIMAL = """
[streams.main]
gateway_url = "https://gw.example.com/"
chain_code = "CHAIN1"
app_key = "app-key-123"
[streams.main.auth]
client_id = "cid"
client_secret = "s3cret-value"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_minimal_config_and_defaults(tmp_path: Path):
    s = load_settings(write(tmp_path, MINIMAL))
    main = s.streams["main"]
    assert main.gateway_url == "https://gw.example.com"
    assert main.token_url == "https://gw.example.com/oauth/v1/tokens"
    assert main.connection.ping_interval_s == 15.0
    assert main.connection.liveness_floor_s == 180.0
    assert main.connection.lockout_s == 120.0
    assert s.pipeline.workers == 4 and s.state.synchronous == "full"


def test_the_example_config_is_valid():
    s = load_settings(Path(__file__).parents[2] / "config.example.toml")
    assert list(s.streams) == ["main"]


def test_default_path_is_config_toml_in_the_working_directory(tmp_path, monkeypatch):
    write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    assert load_settings(None).streams["main"].chain_code == "CHAIN1"


def test_environment_overrides_nested_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("OPERA_CONSUMER_STREAMS__MAIN__CHAIN_CODE", "OTHER")
    monkeypatch.setenv("OPERA_CONSUMER_PIPELINE__WORKERS", "9")
    s = load_settings(write(tmp_path, MINIMAL))
    assert s.streams["main"].chain_code == "OTHER"
    assert s.streams["main"].auth.client_id == "cid"  # the rest still comes from the file
    assert s.pipeline.workers == 9


def test_secrets_from_the_credentials_directory(tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "streams__main__auth__client_secret").write_text("from-a-file\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    text = MINIMAL.replace('client_secret = "s3cret-value"\n', "")
    s = load_settings(write(tmp_path, text))
    assert s.streams["main"].auth.client_secret.get_secret_value() == "from-a-file"


def test_several_streams(tmp_path):
    text = MINIMAL + MINIMAL.replace("streams.main", "streams.second").replace("CHAIN1", "CHAIN2")
    s = load_settings(write(tmp_path, text))
    assert {n: st.chain_code for n, st in s.streams.items()} == {
        "main": "CHAIN1",
        "second": "CHAIN2",
    }


@pytest.mark.parametrize(
    ("text", "key", "fix"),
    [
        (
            MINIMAL + "[streams.main.subscription]\nofset = '1'\n",
            "streams.main.subscription.ofset",
            "unknown key",
        ),
        (MINIMAL + "[pipline]\nworkers = 2\n", "pipline", "unknown key"),
        (
            MINIMAL.replace('chain_code = "CHAIN1"\n', ""),
            "streams.main.chain_code",
            "OPERA_CONSUMER_STREAMS__MAIN__CHAIN_CODE",
        ),
        (MINIMAL + "[streams.main.subscription]\noffset = 'abc'\n", "streams.main", "offset"),
        (MINIMAL.replace("CHAIN1", "CH{AIN"), "streams.main", "chainCode"),
        (
            MINIMAL + "[streams.main.subscription]\nstart = 'offset'\n",
            "streams.main.subscription",
            "offset",
        ),
        (
            MINIMAL.replace('client_id = "cid"', 'client_id = "cid"\ngrant = "password"'),
            "streams.main.auth",
            "username",
        ),
        (MINIMAL.replace("https://gw", "wss://gw"), "streams.main.gateway_url", "https://"),
        (MINIMAL + "[pipeline]\nworkers = 0\n", "pipeline.workers", "greater than"),
    ],
)
def test_bad_configuration_names_the_key_and_the_fix(tmp_path, text: str, key: str, fix: str):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    message = str(info.value)
    assert key in message and fix in message
    assert "s3cret-value" not in message and "app-key-123" not in message


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def test_toml_syntax_error_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path, "[streams.main\n"))


def test_secrets_never_show(tmp_path):
    s = load_settings(write(tmp_path, MINIMAL))
    shown = f"{s!r} {s!s} {effective(s)}"
    assert "s3cret-value" not in shown and "app-key-123" not in shown
    assert effective(s)["streams"]["main"]["auth"]["client_secret"] == "**********"
