"""Unit tests for consumer.config.load_settings with real TOML files in tmp_path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from config_files import config_error, write
from support import stream_config

from consumer.config import Settings, effective, load_settings
from consumer.config.settings import DOCUMENTED_STOP_S, STOP_SLACK_S, stop_budget

APP_KEY = "app-key-VERY-SECRET-0001"
CLIENT_SECRET = "client-secret-VERY-SECRET-0002"
PASSWORD = "password-VERY-SECRET-0003"
FILE_SECRET = "file-secret-VERY-SECRET-0004"

BASE = f"""
[streams.main]
gateway_url = "https://gw.example.com/"
chain_code = "CHAIN1"
app_key = "{APP_KEY}"

[streams.main.auth]
client_id = "cid"
client_secret = "{CLIENT_SECRET}"
"""


pytestmark = pytest.mark.usefixtures("hermetic_config")


def test_minimal_valid_config(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE))
    stream = settings.streams["main"]
    assert stream.gateway_url == "https://gw.example.com"  # trailing slash dropped
    assert stream.chain_code == "CHAIN1"
    assert stream.app_key.get_secret_value() == APP_KEY
    assert stream.auth.client_id == "cid"
    assert stream.auth.client_secret.get_secret_value() == CLIENT_SECRET
    assert stream.auth.grant == "client_credentials"
    assert stream.subscription.start == "persisted"
    assert stream.subscription.offset is None
    assert stream.token_url == "https://gw.example.com/oauth/v1/tokens"
    assert settings.pipeline.workers is None  # the sink's default: runtime.pipeline.default_workers


def test_config_toml_in_the_working_directory_is_found(tmp_path: Path) -> None:
    write(tmp_path, BASE)
    assert load_settings(None).streams["main"].chain_code == "CHAIN1"


def test_env_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPERA_CONSUMER_STREAMS__MAIN__CHAIN_CODE", "ENVCHAIN")
    stream = load_settings(write(tmp_path, BASE)).streams["main"]
    assert stream.chain_code == "ENVCHAIN"
    # the rest of the stream still comes from the file
    assert stream.gateway_url == "https://gw.example.com"
    assert stream.auth.client_secret.get_secret_value() == CLIENT_SECRET


def test_env_override_of_a_nested_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPERA_CONSUMER_STREAMS__MAIN__CONNECTION__PING_INTERVAL_S", "7.5")
    assert load_settings(write(tmp_path, BASE)).streams["main"].connection.ping_interval_s == 7.5


def test_env_value_is_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPERA_CONSUMER_STREAMS__MAIN__CHAIN_CODE", "BAD!CHAIN")
    text = config_error(write(tmp_path, BASE))
    assert "chainCode" in text
    assert "BAD!CHAIN" in text


def test_secret_from_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "streams__main__auth__client_secret").write_text(FILE_SECRET + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    without_secret = BASE.replace(f'client_secret = "{CLIENT_SECRET}"\n', "")
    assert "client_secret" not in without_secret
    stream = load_settings(write(tmp_path, without_secret)).streams["main"]
    assert stream.auth.client_secret.get_secret_value() == FILE_SECRET


def test_app_key_from_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "streams__main__app_key").write_text(FILE_SECRET)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    without_key = BASE.replace(f'app_key = "{APP_KEY}"\n', "")
    stream = load_settings(write(tmp_path, without_key)).streams["main"]
    assert stream.app_key.get_secret_value() == FILE_SECRET


def test_missing_credentials_directory_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "does-not-exist"))
    assert load_settings(write(tmp_path, BASE)).streams["main"].chain_code == "CHAIN1"


@pytest.mark.parametrize(
    ("table", "dotted"),
    [
        ("[streams.main.auth]\nclient_secrt = 'x'\n", "streams.main.auth.client_secrt"),
        (
            "[streams.main.connection]\nping_intervall_s = 3\n",
            "streams.main.connection.ping_intervall_s",
        ),
        ("[streams.main.subscription]\nhotels = []\n", "streams.main.subscription.hotels"),
        ("[pipeline]\nworkerz = 2\n", "pipeline.workerz"),
        ("[bogus]\nx = 1\n", "bogus"),
    ],
)
def test_unknown_key_is_an_error_naming_the_dotted_key(
    tmp_path: Path, table: str, dotted: str
) -> None:
    text = BASE
    if table.startswith("[streams.main.auth]"):
        text = BASE + table.split("\n", 1)[1]  # add to the existing auth table
    else:
        text = BASE + table
    message = config_error(write(tmp_path, text))
    assert dotted in message
    assert "unknown key" in message


@pytest.mark.parametrize(
    ("line", "dotted", "env"),
    [
        (
            f'client_secret = "{CLIENT_SECRET}"\n',
            "streams.main.auth.client_secret",
            "OPERA_CONSUMER_STREAMS__MAIN__AUTH__CLIENT_SECRET",
        ),
        (
            'chain_code = "CHAIN1"\n',
            "streams.main.chain_code",
            "OPERA_CONSUMER_STREAMS__MAIN__CHAIN_CODE",
        ),
        (
            'gateway_url = "https://gw.example.com/"\n',
            "streams.main.gateway_url",
            "OPERA_CONSUMER_STREAMS__MAIN__GATEWAY_URL",
        ),
    ],
)
def test_missing_required_key_names_key_and_env_var(
    tmp_path: Path, line: str, dotted: str, env: str
) -> None:
    assert line in BASE
    message = config_error(write(tmp_path, BASE.replace(line, "")))
    assert dotted in message
    assert env in message


def test_no_config_file_at_all_is_an_error_saying_where_it_looked(tmp_path: Path) -> None:
    """Issue #13: it suggested an environment variable; the fix is a config file."""
    message = config_error(None)
    assert "no config file: looked for config.toml" in message
    assert "Copy config.example.toml" in message and "--config" in message
    assert "OPERA_CONSUMER_" not in message


def test_no_config_file_with_environment_variables_explains_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPERA_CONSUMER_STREAMS__MAIN__CHAIN_CODE", "CHAIN1")
    message = config_error(None)
    assert "no config file" in message and "config.example.toml" in message
    assert "streams.main.gateway_url" in message


def test_config_path_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "config.toml"
    message = config_error(missing)
    assert str(missing) in message and "config.example.toml" in message


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    config_error(tmp_path)


def test_toml_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, BASE + "\nthis is = = not toml\n"))
    assert "config.toml" in message


@pytest.mark.parametrize("offset", ["12a", "", "-1", "1" * 21, "0x10"])
def test_bad_offset_is_rejected(tmp_path: Path, offset: str) -> None:
    text = BASE + f'\n[streams.main.subscription]\noffset = "{offset}"\n'
    message = config_error(write(tmp_path, text))
    assert "offset" in message


def test_leading_zero_offset_is_kept(tmp_path: Path) -> None:
    text = BASE + '\n[streams.main.subscription]\nstart = "offset"\noffset = "0007"\n'
    assert load_settings(write(tmp_path, text)).streams["main"].subscription.offset == "0007"


@pytest.mark.parametrize("chain", ["CH!", "", "A" * 21, "A,B", 'A\\"B'])
def test_bad_chain_code_is_rejected(tmp_path: Path, chain: str) -> None:
    message = config_error(write(tmp_path, BASE.replace('"CHAIN1"', f'"{chain}"')))
    assert "chainCode" in message


def test_bad_hotel_code_is_rejected(tmp_path: Path) -> None:
    text = BASE + '\n[streams.main.subscription]\nhotel_codes = ["H1", "H;2"]\n'
    assert "hotelCode" in config_error(write(tmp_path, text))


def test_gateway_url_must_be_http(tmp_path: Path) -> None:
    text = BASE.replace("https://gw.example.com/", "gw.example.com")
    message = config_error(write(tmp_path, text))
    assert "streams.main.gateway_url" in message


@pytest.mark.parametrize(
    ("given", "gateway"),
    [
        ("https://gw.example.com/subscriptions", "https://gw.example.com"),
        ("https://gw.example.com/subscriptions/", "https://gw.example.com"),
        ("https://gw.example.com/ohip/subscriptions", "https://gw.example.com/ohip"),
    ],
)
def test_a_gateway_url_ending_in_subscriptions_loses_it(
    tmp_path: Path, given: str, gateway: str
) -> None:
    """The WebSocket URL copied as the gateway URL (Oracle's GraphiQL tool takes it so): the
    token request went to .../subscriptions/oauth/v1/tokens, a 404 retried for ever."""
    path = write(tmp_path, BASE.replace("https://gw.example.com/", given))
    stream = load_settings(path).streams["main"]
    assert stream.gateway_url == gateway
    assert stream.token_url == f"{gateway}/oauth/v1/tokens"


@pytest.mark.parametrize(
    ("given", "gateway"),
    [
        ("wss://gw.example.com/subscriptions", "https://gw.example.com"),
        ("WSS://gw.example.com/ohip/subscriptions/", "https://gw.example.com/ohip"),
        ("ws://127.0.0.1:8765/subscriptions", "http://127.0.0.1:8765"),  # loopback: allowed
    ],
)
def test_the_websocket_url_is_taken_as_the_gateway_url(
    tmp_path: Path, given: str, gateway: str
) -> None:
    """config.example.toml says the WebSocket URL copied as gateway_url works: wss:// was
    refused ("must start with https://"). wss:// is the https:// gateway, ws:// the http://."""
    path = write(tmp_path, BASE.replace("https://gw.example.com/", given))
    stream = load_settings(path).streams["main"]
    assert stream.gateway_url == gateway
    assert stream.token_url == f"{gateway}/oauth/v1/tokens"


def test_a_ws_gateway_url_is_held_to_the_plain_http_rules(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("https://gw.example.com/", "ws://gw.example.com"))
    message = config_error(path)
    assert "streams.main.gateway_url" in message and "allow_insecure_http" in message
    insecure = write(tmp_path, "allow_insecure_http = true\n" + path.read_text())
    assert load_settings(insecure).streams["main"].gateway_url == "http://gw.example.com"


def test_client_credentials_without_enterprise_id_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OCIM environments require enterpriseId with client_credentials: check-config said OK,
    and the token endpoint refused the credentials at the first start. Valid (an environment
    that does without it is not excluded), so a warning naming the key and the fix."""
    from consumer.cli import main

    cases = {
        "": True,  # client_credentials, the default grant, without enterprise_id
        'enterprise_id = "ENT1"\n': False,
        f'grant = "password"\nusername = "u"\npassword = "{PASSWORD}"\n': False,
    }
    for auth, warned in cases.items():
        assert main(["check-config", "--config", str(write(tmp_path, BASE + auth))]) == 0
        err = capsys.readouterr().err
        key = "warning: streams.main.auth.enterprise_id: not set with grant"
        assert (key in err and "set enterprise_id to the Enterprise ID" in err) is warned, err
        assert "configuration OK" in err


def test_the_enterprise_id_in_connection_init_needs_one(tmp_path: Path) -> None:
    text = BASE + "[streams.main.connection]\ninit_enterprise_id = true\n"
    message = config_error(write(tmp_path, text))
    assert "streams.main.connection.init_enterprise_id: true sends auth.enterprise_id" in message
    assert "set auth.enterprise_id" in message
    fixed = text.replace(
        "[streams.main.connection]", 'enterprise_id = "ENT1"\n[streams.main.connection]'
    )
    assert load_settings(write(tmp_path, fixed)).streams["main"].connection.init_enterprise_id


def test_close_actions_take_only_the_unconfirmed_codes(tmp_path: Path) -> None:
    table = '[streams.main.connection]\nclose_actions = { 4403 = "reconnect", 4504 = "stop" }\n'
    policy = load_settings(write(tmp_path, BASE + table)).streams["main"].connection.policy()
    assert policy.close_actions == {4403: "reconnect", 4504: "stop"}
    message = config_error(write(tmp_path, BASE + table.replace("4504", "4409")))
    assert "streams.main.connection.close_actions.4409: is not a close code" in message
    assert "use one of 4403, 4406, 4408, 4429, 4500, 4504" in message
    message = config_error(write(tmp_path, BASE + table.replace("stop", "wait")))
    assert "close_actions.4504: Input should be 'stop' or 'reconnect'" in message
    # One spelling of a code: "04403" beside "4403" was the same code twice, the last winning.
    twice = table.replace('4504 = "stop"', '"04403" = "stop"')
    message = config_error(write(tmp_path, BASE + twice))
    assert "close_actions.04403: is not a close code" in message
    huge = table.replace("4504", '"' + "4" * 5000 + '"')
    assert "use one of 4403" in config_error(write(tmp_path, BASE + huge))


def test_a_stream_named_with_capitals_and_set_from_the_environment_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pydantic-settings names streams from the environment (and secret files) in lowercase:
    OPERA_CONSUMER_STREAMS__PROD__APP_KEY made a second stream "prod", whose missing keys
    were reported, asking for the variable that was set. One line now, with the fix."""
    text = BASE.replace("streams.main", "streams.PROD").replace(f'app_key = "{APP_KEY}"\n', "")
    monkeypatch.setenv("OPERA_CONSUMER_STREAMS__PROD__APP_KEY", APP_KEY)
    message = config_error(write(tmp_path, text))
    assert "PROD and prod are one stream spelt twice" in message
    assert "name it prod in the config file" in message
    assert "Field required" not in message
    fixed = text.replace("streams.PROD", "streams.prod")
    assert (
        load_settings(write(tmp_path, fixed)).streams["prod"].app_key.get_secret_value() == APP_KEY
    )


def test_bad_stream_name_is_rejected(tmp_path: Path) -> None:
    text = BASE.replace("streams.main", 'streams."bad name"')
    assert "bad name" in config_error(write(tmp_path, text))


def test_password_grant_without_username_is_an_error(tmp_path: Path) -> None:
    text = BASE + f'grant = "password"\npassword = "{PASSWORD}"\n'
    message = config_error(write(tmp_path, text))
    assert "username" in message
    assert PASSWORD not in message


@pytest.mark.parametrize("given", ['username = "INTEG"\n', 'password = "{PASSWORD}"\n'])
def test_a_user_beside_the_client_credentials_grant_is_an_error(tmp_path: Path, given: str) -> None:
    """A username or password with grant = "client_credentials" (the default) was loaded and
    sent by no request: the operator meant the password grant (the token endpoint's refusal
    then said only that the client's credentials were wrong), or left it over."""
    message = config_error(write(tmp_path, BASE + given.format(PASSWORD=PASSWORD)))
    assert "no effect with grant = 'client_credentials'" in message and "grant" in message
    assert PASSWORD not in message


def test_password_grant_without_password_is_an_error(tmp_path: Path) -> None:
    text = BASE + 'grant = "password"\nusername = "INTEG"\n'
    assert "password" in config_error(write(tmp_path, text))


def test_password_grant_with_both(tmp_path: Path) -> None:
    text = BASE + f'grant = "password"\nusername = "INTEG"\npassword = "{PASSWORD}"\n'
    auth = load_settings(write(tmp_path, text)).streams["main"].auth
    assert auth.username == "INTEG"
    assert auth.password is not None
    assert auth.password.get_secret_value() == PASSWORD


def test_unknown_grant_is_an_error(tmp_path: Path) -> None:
    assert "grant" in config_error(write(tmp_path, BASE + 'grant = "implicit"\n'))


def test_start_offset_without_offset_is_an_error(tmp_path: Path) -> None:
    text = BASE + '\n[streams.main.subscription]\nstart = "offset"\n'
    message = config_error(write(tmp_path, text))
    assert "offset" in message


def test_start_highest_needs_no_offset(tmp_path: Path) -> None:
    text = BASE + '\n[streams.main.subscription]\nstart = "highest"\n'
    assert load_settings(write(tmp_path, text)).streams["main"].subscription.start == "highest"


def test_out_of_range_number_is_an_error(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, BASE + "\n[pipeline]\nworkers = 0\n"))
    assert "pipeline.workers" in message


def test_a_ping_interval_over_oracles_15_seconds_is_refused(tmp_path: Path) -> None:
    text = BASE + "\n[streams.main.connection]\nping_interval_s = 20\n"
    message = config_error(write(tmp_path, text))
    assert "streams.main.connection.ping_interval_s" in message
    assert "15" in message
    assert load_settings(write(tmp_path, BASE)).streams["main"].connection.ping_interval_s == 10


@pytest.mark.parametrize(
    ("line", "fix"),
    [
        ("paused_read_ahead_after_s = -0.5", "use 0 to read ahead as soon as the reader waits"),
        ("paused_read_ahead_bytes = -1", "use 0 to turn the read-ahead off"),
    ],
)
def test_a_negative_read_ahead_setting_is_refused_with_its_fix(
    tmp_path: Path, line: str, fix: str
) -> None:
    message = config_error(write(tmp_path, BASE + f"\n[streams.main.connection]\n{line}\n"))
    key = line.partition(" = ")[0]
    assert f"streams.main.connection.{key}: is negative -> {fix}" in message


def test_the_read_ahead_is_on_by_default_and_zero_is_accepted(tmp_path: Path) -> None:
    c = load_settings(write(tmp_path, BASE)).streams["main"].connection
    assert (c.paused_read_ahead_after_s, c.paused_read_ahead_bytes) == (5.0, 4 * 1024 * 1024)
    text = BASE + (
        "\n[streams.main.connection]\npaused_read_ahead_after_s = 0\npaused_read_ahead_bytes = 0\n"
    )
    c = load_settings(write(tmp_path, text)).streams["main"].connection
    assert (c.paused_read_ahead_after_s, c.paused_read_ahead_bytes) == (0.0, 0)


SECRETS = (APP_KEY, CLIENT_SECRET, PASSWORD)


def secret_config() -> str:
    return BASE + f'grant = "password"\nusername = "INTEG"\npassword = "{PASSWORD}"\n'


def test_secrets_are_masked_in_effective(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, secret_config()))
    data = effective(settings)
    stream = data["streams"]["main"]
    assert stream["app_key"] != APP_KEY
    assert stream["auth"]["client_secret"] != CLIENT_SECRET
    assert stream["auth"]["password"] != PASSWORD
    assert set(stream["app_key"]) == {"*"}
    dumped = json.dumps(data)  # plain data, printable as JSON
    for secret in SECRETS:
        assert secret not in dumped
    assert stream["chain_code"] == "CHAIN1"  # non-secrets are shown


def test_secrets_are_masked_in_repr_and_str(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, secret_config()))
    for text in (repr(settings), str(settings), repr(settings.streams), str(settings.streams)):
        for secret in SECRETS:
            assert secret not in text
    assert "CHAIN1" in repr(settings)


def test_secret_file_value_is_masked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "streams__main__auth__client_secret").write_text(FILE_SECRET)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = load_settings(
        write(tmp_path, BASE.replace(f'client_secret = "{CLIENT_SECRET}"\n', ""))
    )
    assert FILE_SECRET not in repr(settings)
    assert FILE_SECRET not in json.dumps(effective(settings))


@pytest.mark.parametrize(
    "extra",
    [
        f'clientsecret = "{CLIENT_SECRET}"\n',  # a typo'd key carrying the secret
        'grant = "password"\n',  # password grant without user: model-level error
        "timeout_s = -1\n",  # out of range
    ],
)
def test_secrets_never_appear_in_config_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: str
) -> None:
    monkeypatch.setenv("OPERA_CONSUMER_STREAMS__MAIN__AUTH__PASSWORD", PASSWORD)
    message = config_error(write(tmp_path, BASE + extra))
    for secret in SECRETS:
        assert secret not in message


def test_secret_with_wrong_type_is_not_echoed(tmp_path: Path) -> None:
    text = BASE.replace(f'app_key = "{APP_KEY}"', "app_key = 918273645546372819")
    message = config_error(write(tmp_path, text))
    assert "streams.main.app_key" in message
    assert "918273645546372819" not in message


def test_the_example_config_is_valid() -> None:
    settings = load_settings(Path(__file__).parents[2] / "config.example.toml")
    assert list(settings.streams) == ["main"]


def test_the_fleet_compose_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = "postgresql://opera:fleet-demo-password@postgres:5432/opera"
    monkeypatch.setenv("OPERA_CONSUMER_STATE__DSN", dsn)
    monkeypatch.setenv("OPERA_CONSUMER_SINK__DSN", dsn)
    root = Path(__file__).parents[2]
    settings = load_settings(root / "deploy" / "docker" / "config.fleet.toml")
    assert settings.fleet.enabled and len(settings.streams) == 4
    assert settings.sink.type == "postgres" and settings.state.backend == "postgres"
    assert settings.warnings() == []  # the sandbox's: an enterprise_id, no OCIM warning
    # The compose file's grace covers the longest stop these settings allow (no systemd there
    # to extend it): killed past it, the stop is reported failed and the leases wait out.
    compose = (root / "deploy" / "docker" / "compose.fleet.yaml").read_text()
    grace = re.search(r"stop_grace_period: (\d+)s", compose)
    assert grace is not None
    assert int(grace[1]) >= stop_budget(settings).total_s + STOP_SLACK_S


def test_the_compose_and_unit_graces_cover_a_default_stop() -> None:
    """A single daemon's stop with the defaults and the slack the daemon asks systemd for:
    compose.yaml's grace was 45 s against 49 (killed past it, the stop is reported failed;
    found by a review)."""
    root = Path(__file__).parents[2]
    default = {"complete_timeout_s": 10.0}  # support's is scaled down
    streams = {"main": stream_config("https://x.example", connection=default)}
    most = stop_budget(Settings(streams=streams)).total_s  # type: ignore[arg-type]
    compose = (root / "deploy" / "docker" / "compose.yaml").read_text()
    unit = (root / "deploy" / "systemd" / "opera-consumer.service").read_text()
    for grace in (
        re.search(r"stop_grace_period: (\d+)s", compose),
        re.search(r"TimeoutStopSec=(\d+)s", unit),
    ):
        assert grace is not None
        assert int(grace[1]) == DOCUMENTED_STOP_S >= most + STOP_SLACK_S


def test_the_sandbox_compose_config_is_valid_and_draws_no_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first thing a newcomer runs: no enterprise_id warning from the bundled sandbox."""
    monkeypatch.setenv("OPERA_CONSUMER_STREAMS__MAIN__APP_KEY", "sandbox-app-key")
    monkeypatch.setenv("OPERA_CONSUMER_STREAMS__MAIN__AUTH__CLIENT_SECRET", "sandbox-secret")
    root = Path(__file__).parents[2]
    settings = load_settings(root / "deploy" / "docker" / "config.sandbox.toml")
    assert settings.warnings() == []


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ('[state]\nbackend = "sqlite"\n', "state.backend"),
        ('[sink]\ntype = "jsonl"\npath = "e.jsonl"\n', "sink.type"),
    ],
)
def test_fleet_mode_refuses_what_one_host_owns(tmp_path: Path, change: str, key: str) -> None:
    base = BASE + "[fleet]\nenabled = true\n"
    if "[state]" not in change:
        base += '[state]\nbackend = "postgres"\ndsn = "postgresql://u:pass@h/d"\n'
    message = config_error(write(tmp_path, base + change))
    assert key in message


def test_fleet_timers_leave_room_to_renew(tmp_path: Path) -> None:
    text = BASE + (
        '[state]\nbackend = "postgres"\ndsn = "postgresql://u:pass@h/d"\n'
        '[sink]\ntype = "webhook"\nurl = "https://example.com/x"\n'
        "[fleet]\nenabled = true\nlease_ttl_s = 10\nrenew_interval_s = 5\n"
    )
    message = config_error(write(tmp_path, text))
    assert "fleet.renew_interval_s" in message and "quarter" in message


# --- sinks, orchestration ------------------------------------------------------------------


def test_a_sink_table_without_type_is_jsonl(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, BASE + '[sink]\npath = "out.jsonl"\n'))
    assert settings.sink.type == "jsonl"


@pytest.mark.parametrize(
    ("sink", "key", "says"),
    [
        ('type = "kafka"', "sink", "jsonl, webhook, sqlite, postgres, python"),
        ('type = "webhook"\nurl = "ftp://x"', "sink.url", "http"),
        ('type = "webhook"\nurl = "https://x"\nauth = "bearer"', "sink", "token"),
        ('type = "webhook"\nurl = "https://x"\nauth = "basic"\nusername = "u"', "sink", "password"),
        ('type = "sqlite"\ntable = "bad name; drop"', "sink.table", "identifier"),
        ('type = "postgres"', "sink.dsn", "OPERA_CONSUMER_SINK__DSN, or put it in a file"),
        ('type = "python"\ntarget = "no_such_module_xyz:handle"', "sink.target", "cannot import"),
        ('type = "python"\ntarget = "json:no_such_function"', "sink.target", "no attribute"),
        ('type = "python"\ntarget = "json.dumps"', "sink.target", "package.module:function"),
        ('type = "python"\ntarget = "json:dumps"\ntransient_exceptions = ["json.dumps"]',
         "sink.transient_exceptions", "not an exception class"),
    ],
)  # fmt: skip
def test_bad_sink_settings_name_the_key_and_the_fix(
    tmp_path: Path, sink: str, key: str, says: str
) -> None:
    message = config_error(write(tmp_path, BASE + f"[sink]\n{sink}\n"))
    assert key in message
    assert says in message


def test_sink_secrets_are_masked(tmp_path: Path) -> None:
    text = (
        BASE
        + '[sink]\ntype = "webhook"\nurl = "https://x"\nauth = "bearer"\ntoken = "TOK-SECRET"\n'
    )
    settings = load_settings(write(tmp_path, text))
    assert "TOK-SECRET" not in repr(settings)
    assert "TOK-SECRET" not in json.dumps(effective(settings))


def test_a_nats_server_password_is_masked(tmp_path: Path) -> None:
    text = BASE + '[sink]\ntype = "nats"\nservers = ["nats://user:NATS-SECRET@h:4222"]\n'
    settings = load_settings(write(tmp_path, text))
    assert "NATS-SECRET" not in repr(settings)
    assert "NATS-SECRET" not in json.dumps(effective(settings))
    assert str(settings.sink.servers[0]) == "nats://user:NATS-SECRET@h:4222"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("orchestration", "says"),
    [
        ("enabled = true", "[orchestration.resources]"),
        ('enabled = true\nresources = { "R" = "/r/{reservationId}" }', "unknown token"),
        ('base_url = "gw.example.com"', "http"),
        ("rate_per_s = 0", "greater than 0"),
    ],
)  # fmt: skip
def test_bad_orchestration_settings(tmp_path: Path, orchestration: str, says: str) -> None:
    message = config_error(write(tmp_path, BASE + f"[orchestration]\n{orchestration}\n"))
    assert "orchestration" in message
    assert says in message


@pytest.mark.parametrize(
    ("template", "says"),
    [
        ("/rsv/{primaryKey!r}", "unknown token {primaryKey!r}"),
        ("/rsv/{primaryKey:.2}", "unknown token {primaryKey:.2}"),
        ("/rsv/{ primaryKey}", "unknown token { primaryKey}"),
        ("/rsv/{primaryKey[0]}", "unknown token {primaryKey[0]}"),
        ("/rsv/{primaryKey.upper}", "unknown token {primaryKey.upper}"),
        ("/rsv/{0}", "unknown token {0}"),
        ("/rsv/{}", "unknown token {}"),
        ("/rsv/{primaryKey}?q={", "Single '{'"),
        ("/rsv/{primaryKey}}", "Single '}'"),
        ("https://api.example/rsv/{primaryKey!s}", "unknown token {primaryKey!s}"),
    ],
)
def test_an_orchestration_template_is_parsed_as_it_is_rendered(
    tmp_path: Path, template: str, says: str
) -> None:
    """A conversion, a format spec, an index, an attribute or a lone brace passed a regex of
    ``{name}`` fields: at run time the template raised for every event (each dead-lettered for
    a configuration error) or rendered another URL. Refused at load, naming the key and fix."""
    text = BASE + f'[orchestration]\nenabled = true\nresources = {{ "R" = "{template}" }}\n'
    message = config_error(write(tmp_path, text))
    assert "resources['R']" in message, message
    assert says in message, message
    assert "{primaryKey}, {hotelId}" in message, message  # the fix: the placeholders there are


def test_an_orchestration_template_with_a_literal_brace_is_accepted(tmp_path: Path) -> None:
    text = BASE + '[orchestration]\nenabled = true\nresources = { "R" = "/r/{{x}}/{primaryKey}" }\n'
    settings = load_settings(write(tmp_path, text))
    assert settings.orchestration.resources["R"] == "/r/{{x}}/{primaryKey}"


def test_on_permanent_failure_is_checked(tmp_path: Path) -> None:
    text = BASE.replace(
        'chain_code = "CHAIN1"', 'chain_code = "CHAIN1"\non_permanent_failure = "skip"'
    )
    message = config_error(write(tmp_path, text))
    assert "streams.main.on_permanent_failure" in message


@pytest.mark.parametrize(
    ("sink", "key", "says"),
    [
        ('type = "nats"\nsubject = "opera.{hotel}"', "sink.subject", "unknown token {hotel}"),
        ('type = "nats"\nsubject = "opera..{hotelId}"', "sink.subject", "empty subject token"),
        ('type = "nats"\nsubject = "opera.*.{hotelId}"', "sink.subject", "'*', '>'"),
        ('type = "nats"\nstream = "A.B"', "sink.stream", "not a JetStream stream name"),
        ('type = "redis"\nstream_key = "opera:{"', "sink.stream_key", "{{ or }}"),
        ('type = "redis"\nstream_key = "opera:{hotelId!r}"', "sink.stream_key", "unknown token"),
        ('type = "redis"\nstream_key = "opera:}}{chainCode}"', "sink.stream_key", "hash tag"),
        ('type = "redis"\nstream_key = ""', "sink.stream_key", "empty"),
    ],
)  # fmt: skip
def test_bad_sink_destinations_are_refused_at_load(
    tmp_path: Path, sink: str, key: str, says: str
) -> None:
    """check-config refuses a template the sink could not use, before anything connects,
    naming the key and the fix."""
    message = config_error(write(tmp_path, BASE + f"[sink]\n{sink}\n"))
    assert message.startswith(f"{key} ")
    assert says in message
    assert " -> " in message  # the fix


@pytest.mark.parametrize(
    ("sink", "says"),
    [
        ('type = "nats"\nservers = ["http://127.0.0.1:4222"]', "sink.servers[0]"),
        ('type = "nats"\nservers = []', "sink.servers is empty"),
        ('type = "redis"\nurl = "redis://127.0.0.1/0"\ntls_ca_file = "ca.pem"', "not rediss://"),
        ('type = "redis"\nurl = "redis://127.0.0.1/0?socket_keepalive=1"', "socket_keepalive"),
    ],
)
def test_what_the_sinks_client_refuses_is_refused_before_anything_connects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sink: str, says: str
) -> None:
    """check-config said OK to settings only the sink's constructor refused, and `run` found
    out after it had opened the state store (here a PostgreSQL nobody listens for)."""
    from consumer.cli import main
    from consumer.errors import ExitCode

    (tmp_path / "ca.pem").write_text("not read before the sink connects\n")
    store = '[state]\nbackend = "postgres"\ndsn = "postgresql://u:pass@127.0.0.1:9/x"\n'
    path = write(tmp_path, BASE + store + f"[sink]\n{sink}\n")
    for command in ("check-config", "run"):
        assert main([command, "--config", str(path)]) == ExitCode.CONFIG, command
        err = capsys.readouterr().err
        assert says in err, (command, err)
        assert "127.0.0.1:9" not in err  # the store was not tried


def test_a_postgres_pool_smaller_than_its_minimum_is_refused_at_load(tmp_path: Path) -> None:
    sink = '[sink]\ntype = "postgres"\ndsn = "postgresql://u:pass@127.0.0.1/x"\n'
    message = config_error(write(tmp_path, BASE + sink + "pool_min = 5\npool_max = 2\n"))
    assert "pool_min (5) is above pool_max (2)" in message and "raise pool_max" in message


def test_good_sink_destinations_load(tmp_path: Path) -> None:
    nats = 'type = "nats"\nsubject = "opera.{chainCode}.{{x}}.{hotelId}"\nstream = "OPERA"'
    assert load_settings(write(tmp_path, BASE + f"[sink]\n{nats}\n")).sink.type == "nats"
    redis = 'type = "redis"\nstream_key = "opera:{{{chainCode}}}:{hotelId}"'
    assert load_settings(write(tmp_path, BASE + f"[sink]\n{redis}\n")).sink.type == "redis"


# chain_code "rd", stream "main": "gua" + "rd" completes ":guard:" for this stream alone.
_GUARD_BASE = BASE.replace('chain_code = "CHAIN1"', 'chain_code = "rd"')


@pytest.mark.parametrize(
    "key",
    [
        "opera:{{{stream}}}:gua{chainCode}:x",  # opera:{main}:guard:x
        "opera:{{t}}:{hotelId}:gua{chainCode}:x",  # ...:<hotel>:guard:x, whatever the hotel
        "{{t}}:{eventName}:gu{chainCode}:{hotelId}:x:gua{chainCode}:{stream}",
    ],
)
def test_a_stream_key_whose_every_key_ends_as_a_guard_for_a_stream_is_refused(
    tmp_path: Path, key: str
) -> None:
    """The template's own text ends otherwise; with the stream's chain code (a constant),
    every key ends as a guard key does: every event would be dead-lettered."""
    sink = f'[sink]\ntype = "redis"\nstream_key = "{key}"\n'
    message = config_error(write(tmp_path, _GUARD_BASE + sink))
    assert "sink.stream_key" in message and "stream main" in message, message
    assert "every event" in message and "guard" in message, message


@pytest.mark.parametrize(
    "key",
    [
        "opera:{{t}}:gua{chainCode}:{hotelId}",  # the hotel decides, per event
        "opera:{{t}}:{hotelId}:gua{chainCode}",  # ...:guard, no id after it
        "opera:gua{chainCode}:x",  # no hash tag: guards end otherwise
        "opera:{{t}}:{hotelId}:gua{chainCode}:x:y",
    ],
)
def test_a_stream_key_ending_otherwise_for_the_stream_loads(tmp_path: Path, key: str) -> None:
    sink = f'[sink]\ntype = "redis"\nstream_key = "{key}"\n'
    assert load_settings(write(tmp_path, _GUARD_BASE + sink)).sink.type == "redis"


def test_a_redis_guard_lifetime_redis_cannot_express_is_refused(tmp_path: Path) -> None:
    """PX 1e20 is past Redis's 64-bit integers: the SET after the XADD would fail in the
    script, and each retry add the event once more."""
    sink = '[sink]\ntype = "redis"\nguard_ttl_s = 1e17\n'
    message = config_error(write(tmp_path, BASE + sink))
    assert "sink.guard_ttl_s" in message and "315360000" in message


def test_an_unknown_event_loop_is_refused_naming_the_key_and_the_choices(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, 'event_loop = "libuv"\n' + BASE))
    assert "event_loop" in message
    assert "'auto', 'asyncio' or 'uvloop'" in message


def test_the_event_loop_is_auto_unless_set(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, BASE)).event_loop == "auto"
    chosen = load_settings(write(tmp_path, 'event_loop = "asyncio"\n' + BASE))
    assert chosen.event_loop == "asyncio"
