"""Secrets in URLs that the masking used to miss: an orchestration template's credentials
(user information is refused; a secret-looking query value is masked in check-config and repr
and registered with the log redactor, the API's other parameters are not), and user information
with a raw ``/``, ``?`` or ``#`` in its password, which urlsplit ends early: such a URL is
refused at load, and :func:`mask_url` / :func:`url_secret_values` read it whole anyway."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support import cli

from consumer.config import load_settings, mask_url, secret_values, url_secret_values
from consumer.errors import ConfigError, ExitCode
from consumer.logs import Redactor

BASE = """
[streams.main]
gateway_url = "https://gw.example.com"
chain_code = "CHAIN1"
app_key = "app-key-U4lsec-0001"

[streams.main.auth]
client_id = "cid"
client_secret = "client-secret-U4lsec-0002"
"""
QUERY_SECRET = "apikey-U4lsec-0003"
USER_PASSWORD = "pw-U4lsec-0004"

pytestmark = pytest.mark.usefixtures("hermetic_config")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(BASE + text)
    return path


def check_config(path: Path) -> tuple[int, str, str]:
    result = cli("check-config", "--config", str(path), env=dict(os.environ))
    return result.returncode, result.stdout, result.stderr


def resources(template: str) -> str:
    return f'[orchestration]\nenabled = true\n[orchestration.resources]\n"R" = "{template}"\n'


# --- orchestration URL templates --------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        f"https://u:{USER_PASSWORD}@rest.example.com/x/{{primaryKey}}",
        f"https://{USER_PASSWORD}@rest.example.com/x/{{primaryKey}}",
        # '/' in the password: urlsplit sees no user information at all
        f"https://u:{USER_PASSWORD}/x@rest.example.com/x/{{primaryKey}}",
    ],
)
def test_user_information_in_a_template_is_refused(tmp_path: Path, template: str) -> None:
    """check-config printed it verbatim (and repr): the template is no secret to them."""
    code, out, err = check_config(write(tmp_path, resources(template)))
    assert code == ExitCode.CONFIG, err
    assert "orchestration.resources['R']: holds user information" in err
    assert "remove the user@ part" in err
    assert USER_PASSWORD not in out + err


def test_a_secret_looking_query_value_of_a_template_is_masked_and_registered(
    tmp_path: Path,
) -> None:
    """?apikey= is masked in check-config and repr and its every form is masked in log lines;
    the API's own parameters stay as they are (they are no secret, and the redactor would
    mask them in every line)."""
    absolute = f"https://rest.example.com/x/{{primaryKey}}?apikey={QUERY_SECRET}&fetch=all"
    relative = f"/crm/v1/profiles/{{primaryKey}}?view=full#access_token={QUERY_SECRET}2"
    path = write(tmp_path, resources(absolute) + f'"P" = "{relative}"\n')
    code, out, err = check_config(path)
    assert code == 0, err
    shown = json.loads(out)["orchestration"]["resources"]
    assert shown == {
        "R": "https://rest.example.com/x/{primaryKey}?apikey=***&fetch=all",
        "P": "/crm/v1/profiles/{primaryKey}?view=full#access_token=***",
    }
    assert QUERY_SECRET not in out + err

    settings = load_settings(path)
    assert QUERY_SECRET not in repr(settings)
    assert settings.orchestration.resources["R"] == absolute  # the code gets the template
    values = secret_values(settings)
    assert QUERY_SECRET in values and f"{QUERY_SECRET}2" in values
    assert "all" not in values and "full" not in values
    redactor = Redactor()
    redactor.add(*values)
    line = f"GET https://rest.example.com/x/1?apikey={QUERY_SECRET}&fetch=all failed"
    assert redactor.scrub(line) == "GET https://rest.example.com/x/1?apikey=***&fetch=all failed"


def test_a_placeholder_in_a_secret_looking_parameter_is_not_registered(tmp_path: Path) -> None:
    path = write(tmp_path, resources("/x/{primaryKey}?key={hotelId}"))
    assert not any("{" in v for v in secret_values(load_settings(path)))


# --- a raw '/', '?' or '#' in a URL's password ------------------------------------------------


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ('[sink]\ntype = "webhook"\nurl = "{url}"\n', "sink.url"),
        ('[streams.main.connection]\nproxy = "{url}"\n', "streams.main.connection.proxy"),
        ('[orchestration]\nbase_url = "{url}"\n', "orchestration.base_url"),
        ('[streams.main.auth]\ntoken_url = "{url}"\n', "streams.main.auth.token_url"),
    ],
)
@pytest.mark.parametrize("cut", ["/", "?", "#"])
def test_an_http_url_whose_password_urlsplit_cuts_is_refused(
    tmp_path: Path, table: str, key: str, cut: str
) -> None:
    """``https://user:1234/W0RD@host`` parsed as host "user", port 1234: accepted, and shown
    whole by check-config."""
    url = f"https://user:1234{cut}{USER_PASSWORD}@host.example.com:8443/in"
    text = table.format(url=url)
    if key.startswith("streams.main.auth"):
        text = text.replace("[streams.main.auth]\n", "")
        path = tmp_path / "config.toml"
        path.write_text(BASE.replace("[streams.main.auth]\n", "[streams.main.auth]\n" + text))
    else:
        path = write(tmp_path, text)
    code, out, err = check_config(path)
    assert code == ExitCode.CONFIG, (out, err)
    assert f"{key}: has an '@' after a '/', '?' or '#'" in err
    assert "percent-encode" in err and "%2F %3F %23 %40" in err
    assert USER_PASSWORD not in out + err


def test_nats_servers_with_a_raw_slash_or_hash_in_the_password_are_refused(
    tmp_path: Path,
) -> None:
    """The reviewer's nats.toml: check-config showed the first server whole."""
    servers = (
        f'["nats://user:Pa55/{USER_PASSWORD}@nats.example.com:4222", '
        f'"nats://u:P#{USER_PASSWORD}2@n2:4222"]'
    )
    code, out, err = check_config(write(tmp_path, f'[sink]\ntype = "nats"\nservers = {servers}\n'))
    assert code == ExitCode.CONFIG, err
    assert "sink.servers.0: has an '@'" in err and "sink.servers.1: has an '@'" in err
    assert "into the sink's user and password settings" in err  # nats-py does not decode
    assert USER_PASSWORD not in out + err and "Pa55" not in out + err


def test_a_redis_url_with_a_raw_slash_in_the_password_is_refused(tmp_path: Path) -> None:
    text = f'[sink]\ntype = "redis"\nurl = "redis://u:12/{USER_PASSWORD}@redis.example.com/0"\n'
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    assert "sink.url: has an '@' after a '/'" in str(info.value)
    assert USER_PASSWORD not in str(info.value)


def test_a_percent_encoded_password_loads_and_is_masked(tmp_path: Path) -> None:
    url = f"https://user:Pa55%2F{USER_PASSWORD}@hook.example.com/in"
    code, out, err = check_config(write(tmp_path, f'[sink]\ntype = "webhook"\nurl = "{url}"\n'))
    assert code == 0, err
    assert json.loads(out)["sink"]["url"] == "https://user:***@hook.example.com/***"
    assert USER_PASSWORD not in out + err


@pytest.mark.parametrize(
    "url",
    [
        f"nats://user:Pa55/{USER_PASSWORD}@nats.example.com:4222",
        f"nats://user:Pa55?{USER_PASSWORD}@nats.example.com:4222",
        f"nats://user:Pa55#{USER_PASSWORD}@nats.example.com:4222",
        f"https://Pa55/{USER_PASSWORD}@host.example.com/x?token=q",
    ],
)
def test_mask_url_and_url_secret_values_read_such_user_information_whole(url: str) -> None:
    """For any URL that reaches them all the same: the user information ends at the last
    '@', as the PostgreSQL DSN rule reads it."""
    masked = mask_url(url)
    assert USER_PASSWORD not in masked and "Pa55" not in masked
    assert "***@" in masked
    whole = url.partition("//")[2].rpartition("@")[0]
    secret = whole.partition(":")[2] or whole
    assert secret in url_secret_values(url)
