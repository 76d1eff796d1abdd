"""Hostile configuration (issue #9 "Poison-proof", items 5, 8 and 11): every value from outside
is checked at load time, a bad one names its key and its fix (ConfigError, exit 78 from the
CLI) without ever echoing a secret, and no secret shows in ``repr``, ``check-config`` or the
error texts, in any encoding (raw, percent-encoded or decoded, base64)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from config_files import config_error, write
from support import spawn_daemon, tail, toml_config, wait_until

from consumer.cli import main
from consumer.config import (
    Settings,
    effective,
    load_settings,
    secret_values,
    url_secret_values,
)
from consumer.core.protocol import key_hash
from consumer.errors import ConfigError, ExitCode

APP_KEY = "app-key-H0stile-0001"
CLIENT_SECRET = "client-secret-H0stile-0002"
GW_PASSWORD = "gw-pw-H0stile-0003"
PROXY_PASSWORD = "proxy-pw-H0stile-0004"
TOKEN_QUERY = "tokq-H0stile-0005"
REST_QUERY = "restq-H0stile-0006"
# Characters that percent-encoding changes: the URL holds the encoded form.
HOOK_PASSWORD = "p@ss/w0rd+H0stile-0007"
HOOK_QUERY = "tok/Q+H0stile-0008"
HEADER_VALUE = "hdr-H0stile-0009"
BEARER = "bearer-H0stile-0010"
BASIC_PASSWORD = "basic-pw-H0stile-0011"
DSN_PASSWORD = "dsn:pw@H0stile-0012"
GRANT_PASSWORD = "grant pw&H0stile-0013"

BASE = f"""
[streams.main]
gateway_url = "https://gw.example.com/"
chain_code = "CHAIN1"
app_key = "{APP_KEY}"

[streams.main.auth]
client_id = "cid"
client_secret = "{CLIENT_SECRET}"
"""


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def enc(text: str) -> str:
    return quote(text, safe="")


def forms(secret: str) -> set[str]:
    """A secret as it may show: raw, percent-encoded (both ways), base64."""
    return {secret, enc(secret), quote_plus(secret), b64(secret)}


HOOK_URL = f"https://user:{enc(HOOK_PASSWORD)}@hook.example.com/in?token={enc(HOOK_QUERY)}&x=1"


pytestmark = pytest.mark.usefixtures("hermetic_config")


def toml(
    *,
    top: str = "",
    gateway: str = "https://gw.example.com/",
    auth: str = "",
    connection: str = "",
    sink: str = "",
    orchestration: str = "",
) -> str:
    """The base config with lines added to its tables (``top``: before any table)."""
    text = top + "\n" + BASE.replace("https://gw.example.com/", gateway) + auth + "\n"
    if connection:
        text += f"[streams.main.connection]\n{connection}\n"
    if sink:
        text += f"[sink]\n{sink}\n"
    if orchestration:
        text += f"[orchestration]\n{orchestration}\n"
    return text


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets:
        for form in forms(secret):
            assert form not in text, (form, text)


# --- item 5: the webhook's URL credentials --------------------------------------------------------


BEARER_AUTH = f'auth = "bearer"\ntoken = "{BEARER}"'
BASIC_AUTH = f'auth = "basic"\nusername = "u"\npassword = "{BASIC_PASSWORD}"'


def webhook(extra: str, url: str = "https://h.example.com/") -> str:
    """A config whose sink is a webhook at ``url`` with ``extra`` lines."""
    return toml(sink=f'type = "webhook"\nurl = "{url}"\n{extra}')


@pytest.mark.parametrize("auth", [BEARER_AUTH, BASIC_AUTH])
def test_url_credentials_with_bearer_or_basic_auth_are_refused(tmp_path: Path, auth: str) -> None:
    """Issue #9 item 5: URL credentials would silently replace auth = bearer (httpx sends them
    as Basic auth): such a config is refused, naming sink.url and the fix."""
    text = webhook(auth, HOOK_URL)
    message = config_error(write(tmp_path, text))
    assert "sink.url" in message
    assert "remove user:password@ from sink.url" in message
    assert_no_secret(message, HOOK_PASSWORD, HOOK_QUERY, BEARER, BASIC_PASSWORD)


def full_config() -> str:
    """Every URL field that may hold one holding a password and a query value (the gateway
    takes neither: the app key and OAuth client authenticate), and a secret header."""
    return toml(
        auth=f'token_url = "https://tok.example.com/t?signature={TOKEN_QUERY}"\n',
        connection=f'proxy = "http://pu:{PROXY_PASSWORD}@proxy.example.com:3128"',
        sink=(
            f'type = "webhook"\nurl = "{HOOK_URL}"\n'
            f'headers = {{ "X-Api-Key" = "{HEADER_VALUE}", "X-Source" = "opera" }}'
        ),
        orchestration=f'base_url = "https://rest.example.com/api?key={REST_QUERY}"',
    )


ALL_URL_SECRETS = (PROXY_PASSWORD, TOKEN_QUERY, REST_QUERY, HEADER_VALUE)


def test_effective_and_repr_mask_url_passwords_query_values_and_secret_headers(
    tmp_path: Path,
) -> None:
    """Issue #9 item 5: check-config (effective) and repr show URL passwords, query values and
    secret-looking header values as ***, in no encoding at all; the code still gets the URL."""
    settings = load_settings(write(tmp_path, full_config()))
    data = effective(settings)
    dumped = json.dumps(data)
    texts = [dumped, repr(settings), str(settings), repr(settings.sink), repr(settings.streams)]
    basics = [
        b64(f"user:{HOOK_PASSWORD}"),
        b64(f"pu:{PROXY_PASSWORD}"),
    ]
    for text in texts:
        assert_no_secret(text, HOOK_PASSWORD, HOOK_QUERY, *ALL_URL_SECRETS, APP_KEY, CLIENT_SECRET)
        for basic in basics:
            assert basic not in text
    sink = data["sink"]
    assert sink["url"] == "https://user:***@hook.example.com/***?token=***&x=***"
    assert sink["headers"] == {"X-Api-Key": "***", "X-Source": "opera"}  # others are shown
    stream = data["streams"]["main"]
    assert stream["gateway_url"] == "https://gw.example.com"
    assert stream["auth"]["token_url"] == "https://tok.example.com/t?signature=***"
    assert stream["connection"]["proxy"] == "http://pu:***@proxy.example.com:3128"
    assert data["orchestration"]["base_url"] == "https://rest.example.com/api?key=***"
    assert data["allow_insecure_http"] is False
    assert "'X-Source': 'opera'" in repr(settings)
    # The code that uses them gets the real values.
    assert str(settings.sink.url) == HOOK_URL  # type: ignore[union-attr]
    assert settings.sink.headers["X-Api-Key"] == HEADER_VALUE  # type: ignore[union-attr]
    assert str(settings.streams["main"].auth.token_url).endswith(f"?signature={TOKEN_QUERY}")


def test_check_config_prints_no_secret(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue #9 item 5: the CLI's check-config output holds no secret in any encoding."""
    path = write(tmp_path, full_config())
    assert main(["check-config", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["sink"]["headers"]["X-Api-Key"] == "***"
    assert_no_secret(out + err, HOOK_PASSWORD, HOOK_QUERY, *ALL_URL_SECRETS)
    assert b64(f"user:{HOOK_PASSWORD}") not in out


def test_secret_values_covers_every_form(tmp_path: Path) -> None:
    """Issue #9 item 5: secret_values lists every secret in every form it travels in."""
    grant = f'grant = "password"\nusername = "INTEG"\npassword = "{GRANT_PASSWORD}"\n'
    text = full_config().replace("[streams.main.connection]", grant + "[streams.main.connection]")
    values = set(secret_values(load_settings(write(tmp_path, text))))
    expected = {
        APP_KEY,
        key_hash(APP_KEY),  # the key= parameter of the subscription URL
        CLIENT_SECRET,
        b64(f"cid:{CLIENT_SECRET}"),  # Basic auth to the token endpoint
        GRANT_PASSWORD,
        quote_plus(GRANT_PASSWORD),  # form-encoded in the token request
        PROXY_PASSWORD,
        b64(f"pu:{PROXY_PASSWORD}"),  # Proxy-Authorization
        TOKEN_QUERY,
        REST_QUERY,
        HOOK_PASSWORD,  # decoded...
        enc(HOOK_PASSWORD),  # ...and as written in the URL
        b64(f"user:{HOOK_PASSWORD}"),  # what httpx sends for URL credentials
        HOOK_QUERY,
        enc(HOOK_QUERY),
        HEADER_VALUE,
    }
    assert expected <= values, expected - values
    assert "opera" not in values  # not a secret: the X-Source header
    assert "cid" not in values


def test_signature_and_scheme_headers_are_secrets_and_so_are_their_credentials(
    tmp_path: Path,
) -> None:
    """A webhook's HMAC, signature or JWT header is masked by check-config and registered
    with the redactor, as an Authorization header is; and the credentials of a
    "<scheme> <credentials>" value alone too (a receiver may echo just them)."""
    headers = {
        "X-Hub-Hmac-Sha256": "hmac-H0stile-value",
        "X-Sig": "sig-H0stile-value",
        "X-Jwt": "jwt-H0stile-value",
        "Authorization": "Token scheme-H0stile-value",
        "X-Source": "opera",
    }
    table = ", ".join(f'"{k}" = "{v}"' for k, v in headers.items())
    text = toml(sink=f'type = "webhook"\nurl = "https://h.example.com/"\nheaders = {{ {table} }}')
    settings = load_settings(write(tmp_path, text))
    values = set(secret_values(settings))
    assert {v for k, v in headers.items() if k != "X-Source"} <= values
    assert "scheme-H0stile-value" in values and "opera" not in values
    shown = effective(settings)["sink"]["headers"]
    assert shown == {k: "***" if k != "X-Source" else "opera" for k in headers}


def test_secret_values_of_the_bearer_basic_and_postgres_sinks(tmp_path: Path) -> None:
    """Issue #9 item 5: token and "Bearer <token>", basic password and its base64 forms, the
    DSN and its password part are listed."""
    values = secret_values(load_settings(write(tmp_path, webhook(BEARER_AUTH))))
    assert {BEARER, f"Bearer {BEARER}"} <= set(values)
    basic = toml(
        sink=f'type = "webhook"\nurl = "https://h.example.com/"\nauth = "basic"\n'
        f'username = "opera"\npassword = "{BASIC_PASSWORD}"'
    )
    values = secret_values(load_settings(write(tmp_path, basic)))
    assert {
        BASIC_PASSWORD,
        b64(f"opera:{BASIC_PASSWORD}"),
        f"Basic {b64(f'opera:{BASIC_PASSWORD}')}",
    } <= set(values)
    dsn = (
        f"postgresql://app:{enc(DSN_PASSWORD)}@db.example.com:5432/hotel?sslpassword=sslpw-H0stile"
    )
    pg = toml(sink=f'type = "postgres"\ndsn = "{dsn}"')
    values = secret_values(load_settings(write(tmp_path, pg)))
    assert {dsn, DSN_PASSWORD, enc(DSN_PASSWORD), "sslpw-H0stile"} <= set(values)
    # A key=value DSN: asyncpg takes URLs only, so the settings refuse it, never quoting it.
    kv = "host=db user=app password='kv pw H0stile'"
    with pytest.raises(ConfigError) as refused:
        load_settings(write(tmp_path, toml(sink=f'type = "postgres"\ndsn = "{kv}"')))
    assert "sink.dsn" in str(refused.value) and "H0stile" not in str(refused.value)


def test_url_secret_values_of_a_lone_user_name() -> None:
    """Issue #9 item 5: https://TOKEN@host carries the token as the user name: a secret."""
    values = url_secret_values("https://ghp-H0stile-0014@git.example.com/")
    assert "ghp-H0stile-0014" in values
    assert b64("ghp-H0stile-0014:") in values


# --- item 8: control characters, header injection, plain text -----------------------------------

# As TOML escapes: CR LF, LF, CR, NUL, TAB, DEL, a non-ASCII line separator.
CONTROLS = ["\\r\\n", "\\n", "\\r", "\\u0000", "\\t", "\\u007f", "\\u2028"]


@pytest.mark.parametrize("bad", CONTROLS)
def test_a_control_character_in_a_header_value_is_refused(tmp_path: Path, bad: str) -> None:
    """Issue #9 item 8: CR/LF (and NUL, TAB, DEL...) in a header value validated and was then
    retried forever; now the load fails naming sink.headers and the header, not its value."""
    value = f"{HEADER_VALUE}{bad}X-Injected: 1"
    text = webhook(f'headers = {{ "X-Api-Key" = "{value}" }}')
    message = config_error(write(tmp_path, text))
    assert "sink.headers" in message
    assert "'X-Api-Key'" in message
    assert "control characters" in message  # the fix
    assert HEADER_VALUE not in message
    assert "X-Injected" not in message


@pytest.mark.parametrize("name", ["X Api", "X-Api:", "X\\r\\nEvil", "", "Ünïcode"])
def test_a_header_name_must_be_a_token(tmp_path: Path, name: str) -> None:
    """Issue #9 item 8: a header name is an RFC 9110 token."""
    text = toml(
        sink=f'type = "webhook"\nurl = "https://h.example.com/"\nheaders = {{ "{name}" = "v" }}'
    )
    message = config_error(write(tmp_path, text))
    assert "sink.headers" in message
    assert "RFC 9110" in message


@pytest.mark.parametrize("name", ["Content-Length", "transfer-encoding", "Host", "Connection"])
def test_a_header_that_frames_the_request_is_refused(tmp_path: Path, name: str) -> None:
    """aiohttp keeps a configured Content-Length and cuts every body to it (a receiver that
    answers 200 to the cut body: every event lost); a Transfer-Encoding beside its own length
    makes every POST a 400 (every event dead-lettered). Refused at load, naming the key."""
    text = toml(
        sink=f'type = "webhook"\nurl = "https://h.example.com/"\nheaders = {{ "{name}" = "2" }}'
    )
    message = config_error(write(tmp_path, text))
    assert "sink.headers" in message
    assert name in message and "the HTTP client sets it" in message and "remove it" in message


@pytest.mark.parametrize("name", ["Content-Type", "idempotency-key", "X-Opera-Stream"])
def test_a_header_the_webhook_sets_itself_is_refused(tmp_path: Path, name: str) -> None:
    """Given, it was silently replaced by the sink's own on every request (a receiver keyed
    on a configured Idempotency-Key never saw it): refused at load, naming the key."""
    text = toml(
        sink=f'type = "webhook"\nurl = "https://h.example.com/"\nheaders = {{ "{name}" = "x" }}'
    )
    message = config_error(write(tmp_path, text))
    assert "sink.headers" in message
    assert name in message and "the sink's own" in message and "remove it" in message


@pytest.mark.parametrize(
    ("auth", "url"),
    [
        ('auth = "bearer"\ntoken = "t0ken-value-1234"', "https://h.example.com/"),
        ('auth = "basic"\nusername = "u"\npassword = "pw-value-1234"', "https://h.example.com/"),
        ("", "https://u:pw-value-1234@h.example.com/"),
    ],
    ids=["bearer", "basic", "url-userinfo"],
)
def test_an_authorization_header_beside_other_credentials_is_refused(
    tmp_path: Path, auth: str, url: str
) -> None:
    """One request carries one Authorization: the configured auth (or the URL's user
    information) replaced the header without a word."""
    text = toml(
        sink=f'type = "webhook"\nurl = "{url}"\n{auth}\n'
        'headers = { "Authorization" = "Custom abc-H0stile-5678" }'
    )
    message = config_error(write(tmp_path, text))
    assert "sink.headers" in message and "'Authorization'" in message
    assert "one request carries one" in message
    assert "pw-value-1234" not in message and "t0ken-value-1234" not in message


def test_an_authorization_header_alone_is_sent_as_given(tmp_path: Path) -> None:
    text = toml(
        sink='type = "webhook"\nurl = "https://h.example.com/"\n'
        'headers = { "Authorization" = "Custom abc-H0stile-5678" }'
    )
    settings = load_settings(write(tmp_path, text))
    assert settings.sink.headers == {"Authorization": "Custom abc-H0stile-5678"}  # type: ignore[union-attr]


def url_config(key: str, url: str, top: str = "") -> str:
    """A config with ``url`` at ``key`` (a dotted key of one of the URL fields)."""
    if key == "streams.main.gateway_url":
        return toml(top=top, gateway=url)
    if key == "streams.main.auth.token_url":
        return toml(top=top, auth=f'token_url = "{url}"\n')
    if key == "streams.main.connection.proxy":
        return toml(top=top, connection=f'proxy = "{url}"')
    if key == "sink.url":
        return toml(top=top, sink=f'type = "webhook"\nurl = "{url}"')
    assert key == "orchestration.base_url"
    return toml(top=top, orchestration=f'base_url = "{url}"')


URL_KEYS = [
    "streams.main.gateway_url",
    "streams.main.auth.token_url",
    "streams.main.connection.proxy",
    "sink.url",
    "orchestration.base_url",
]


@pytest.mark.parametrize("key", URL_KEYS)
@pytest.mark.parametrize("bad", [*CONTROLS, " "])
def test_a_control_character_in_any_url_is_refused_even_when_insecure_http_is_allowed(
    tmp_path: Path, key: str, bad: str
) -> None:
    """Issue #9 item 8: CR/LF in a URL was a traceback with exit 1; now every URL field refuses
    whitespace and control characters, naming the key, and allow_insecure_http does not lift
    this rule."""
    url = f"https://u:{GW_PASSWORD}@h.example.com:8443/{bad}X-Injected: 1"
    for top in ("", "allow_insecure_http = true"):
        message = config_error(write(tmp_path, url_config(key, url, top)))
        assert key in message
        assert "control characters" in message
        assert GW_PASSWORD not in message


@pytest.mark.parametrize("key", URL_KEYS)
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("https:///no-host", "has no host"),
        ("https://h.example.com:99999/", "not a valid URL"),
        ("https://[::1/", "not a valid URL"),
    ],
)
def test_every_url_must_parse_with_a_scheme_and_a_host(
    tmp_path: Path, key: str, url: str, says: str
) -> None:
    """Issue #9 item 8: each URL field must parse, be http(s) and name a host."""
    message = config_error(write(tmp_path, url_config(key, url)))
    assert key in message
    assert says in message


def test_the_token_url_must_be_http_too(tmp_path: Path) -> None:
    """Issue #9 item 8: token_url was not checked at all (the other URL fields were)."""
    message = config_error(write(tmp_path, url_config("streams.main.auth.token_url", "ftp://h/t")))
    assert "streams.main.auth.token_url: Value error, must be an http:// or https:// URL" in message


def test_a_proxy_is_http_without_a_path_or_half_credentials(tmp_path: Path) -> None:
    """Issue #9 item 8: the WebSocket and HTTP clients (aiohttp) take an HTTP CONNECT proxy
    only, without path or query; a bad one used to fail at connect time with the URL (and its
    password) in the error. A SOCKS one is refused at load, naming the fix."""
    ok = load_settings(
        write(tmp_path, url_config("streams.main.connection.proxy", "http://p:3128"))
    )
    assert ok.streams["main"].connection.proxy == "http://p:3128"
    socks = config_error(
        write(tmp_path, url_config("streams.main.connection.proxy", "socks5://p:1080"))
    )
    assert "streams.main.connection.proxy" in socks and "SOCKS proxy is not supported" in socks
    for bad in ("gopher://p:1080", "http://p:3128/path", "http://p:3128?q=1", "http://user@p:3128"):
        message = config_error(write(tmp_path, url_config("streams.main.connection.proxy", bad)))
        assert "streams.main.connection.proxy" in message


@pytest.mark.parametrize("userinfo", ["T0KENUSER@", f"opera:{GW_PASSWORD}@", "@"])
def test_user_information_in_the_gateway_url_is_refused(tmp_path: Path, userinfo: str) -> None:
    """The gateway takes no URL credentials; with a user name only, websockets raised an
    InvalidURI quoting the subscription URL and its key= (into /readyz). Refused at load,
    naming the key and the fix, without the value."""
    text = url_config("streams.main.gateway_url", f"https://{userinfo}gw.example.com/")
    message = config_error(write(tmp_path, text))
    assert "streams.main.gateway_url: holds user information" in message
    assert "remove the user@ part from gateway_url" in message
    assert "T0KENUSER" not in message
    assert_no_secret(message, GW_PASSWORD)


async def test_run_with_user_information_in_the_gateway_url_exits_78_before_connecting(
    tmp_path: Path,
) -> None:
    """``opera-consumer run`` stops at the config (EX_CONFIG, naming gateway_url) and never
    reaches the gateway: a listener there sees no connection."""
    connections: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(b"")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        config = toml_config(tmp_path, f"http://T0KENUSER@127.0.0.1:{port}")
        log = tmp_path / "daemon.log"
        proc = spawn_daemon(config, log)
        try:
            await wait_until(lambda: proc.poll() is not None or bool(connections), timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert connections == []
    assert proc.returncode == ExitCode.CONFIG, tail(log)
    assert "streams.main.gateway_url: holds user information" in log.read_text()


PLAIN_HTTP = [
    ("streams.main.gateway_url", ""),
    ("streams.main.auth.token_url", ""),
    ("orchestration.base_url", ""),
    ("sink.url", BEARER_AUTH),
    ("sink.url", BASIC_AUTH),
    ("sink.url", f'headers = {{ "Authorization" = "{HEADER_VALUE}" }}'),
    ("sink.url", "USERINFO"),
    ("sink.url", "QUERY"),
]


def http_config(key: str, extra: str, host: str, top: str = "") -> str:
    if key != "sink.url":
        return url_config(key, f"http://{host}:8080/x", top)
    url = f"http://{host}:8080/in"
    if extra == "USERINFO":
        url, extra = f"http://user:{GW_PASSWORD}@{host}:8080/in", ""
    elif extra == "QUERY":
        url, extra = f"http://{host}:8080/in?api_key={TOKEN_QUERY}", ""
    return toml(top=top, sink=f'type = "webhook"\nurl = "{url}"\n{extra}')


@pytest.mark.parametrize(("key", "extra"), PLAIN_HTTP)
def test_plain_http_with_credentials_is_refused_unless_loopback_or_allowed(
    tmp_path: Path, key: str, extra: str
) -> None:
    """Issue #9 item 8: plain http:// to a host other than loopback, where credentials travel,
    is refused naming the key and the fix; loopback is fine, and allow_insecure_http = true
    lifts the rule."""
    message = config_error(write(tmp_path, http_config(key, extra, "gw.example.com")))
    assert f"{key}: plain http:// to gw.example.com" in message
    assert "use https://" in message
    assert "allow_insecure_http = true" in message
    assert_no_secret(message, BEARER, BASIC_PASSWORD, HEADER_VALUE, GW_PASSWORD, TOKEN_QUERY)
    for host in ("127.0.0.1", "127.3.2.1", "localhost", "[::1]"):
        load_settings(write(tmp_path, http_config(key, extra, host)))
    allowed = load_settings(
        write(tmp_path, http_config(key, extra, "gw.example.com", "allow_insecure_http = true"))
    )
    assert allowed.allow_insecure_http is True


def test_allow_insecure_http_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #9 item 8: the flag is an ordinary top-level setting (env override included)."""
    path = write(tmp_path, url_config("streams.main.gateway_url", "http://sandbox:8765"))
    assert "streams.main.gateway_url" in config_error(path)
    monkeypatch.setenv("OPERA_CONSUMER_ALLOW_INSECURE_HTTP", "true")
    assert load_settings(path).streams["main"].gateway_url == "http://sandbox:8765"


def test_a_webhook_without_credentials_may_use_plain_http(tmp_path: Path) -> None:
    """Issue #9 item 8: nothing secret travels, so plain http to any host is accepted; with a
    secret-looking header added it is refused."""
    plain = 'type = "webhook"\nurl = "http://crm.example.com/in?format=json"\n'
    settings = load_settings(write(tmp_path, toml(sink=plain + 'headers = { "X-Source" = "o" }')))
    assert settings.sink.url == "http://crm.example.com/in?format=json"  # type: ignore[union-attr]
    message = config_error(
        write(tmp_path, toml(sink=plain + 'headers = { "X-Token" = "t-H0stile" }'))
    )
    assert "sink.url: plain http://" in message
    assert "t-H0stile" not in message


def test_orchestration_templates_follow_the_url_rules(tmp_path: Path) -> None:
    """Issue #9 item 8: an absolute resource template is a URL the access token is sent to
    (plain http refused unless loopback or allowed); no template may hold CR/LF."""

    def orchestration(template: str, top: str = "") -> Path:
        return write(tmp_path, toml(top=top, orchestration=f'resources = {{ "R" = "{template}" }}'))

    ok = "https://rest.example.com/r/{primaryKey}"
    assert load_settings(orchestration(ok)).orchestration.resources["R"] == ok
    load_settings(orchestration("http://127.0.0.1:9/r/{primaryKey}"))
    plain = "http://rest.example.com/r/{primaryKey}"
    message = config_error(orchestration(plain))
    assert "orchestration.resources['R']: plain http:// to rest.example.com" in message
    load_settings(orchestration(plain, "allow_insecure_http = true"))
    for bad in ("https://rest.example.com/r/{primaryKey}\\r\\nX: 1", "/r/{primaryKey}\\n"):
        message = config_error(orchestration(bad, "allow_insecure_http = true"))
        assert "orchestration.resources['R']: contains" in message


@pytest.mark.parametrize("field", ["app_key", "auth.enterprise_id", "sink.token"])
def test_control_characters_in_values_sent_as_headers_are_refused(
    tmp_path: Path, field: str
) -> None:
    """Issue #9 item 8: the app key (x-app-key), enterpriseId and the bearer token travel in
    headers: CR/LF there is refused like in a configured header, the value not echoed."""
    bad = "v-H0stile-0015\\r\\nX-Injected: 1"
    if field == "app_key":
        text = BASE.replace(APP_KEY, bad)
        key = "streams.main.app_key"
    elif field == "auth.enterprise_id":
        text = BASE + f'enterprise_id = "{bad}"\n'
        key = "streams.main.auth.enterprise_id"
    else:
        text = webhook(f'auth = "bearer"\ntoken = "{bad}"')
        key = "sink.token"
    message = config_error(write(tmp_path, text))
    assert key in message
    assert "v-H0stile-0015" not in message


def test_cli_check_config_exits_78_on_a_crlf_header_and_prints_no_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue #9 item 8: check-config refuses a CRLF header with exit status 78, naming the key,
    and neither stdout nor stderr holds the secret."""
    value = f"{HEADER_VALUE}\\r\\nX-Injected: 1"
    text = webhook(f'headers = {{ "X-Api-Key" = "{value}" }}')
    path = write(tmp_path, text)
    assert main(["check-config", "--config", str(path)]) == 78
    out, err = capsys.readouterr()
    assert out == ""
    assert "sink.headers" in err
    assert_no_secret(out + err, HEADER_VALUE, APP_KEY, CLIENT_SECRET)


# --- item 11: identifiers and python targets --------------------------------------------------


@pytest.mark.parametrize("sink", ["sqlite", "postgres"])
def test_a_table_name_with_a_trailing_newline_is_refused(tmp_path: Path, sink: str) -> None:
    """Issue #9 item 11: re.match with $ accepted "opera_events\\n" as an SQL identifier."""
    dsn = '\ndsn = "postgresql://db/x"' if sink == "postgres" else ""
    text = toml(sink=f'type = "{sink}"\ntable = "opera_events\\n"{dsn}')
    message = config_error(write(tmp_path, text))
    assert "sink.table" in message


class AsyncCallable:
    async def __call__(self, stream: str, events: list[Any]) -> None:
        return None


class SyncCallable:
    def __call__(self, stream: str, events: list[Any]) -> None:
        return None


ASYNC_OBJECT = AsyncCallable()
SYNC_OBJECT = SyncCallable()


@pytest.mark.parametrize(
    "target",
    [
        "json:dumps",
        f"{__name__}:SYNC_OBJECT",
        f"{__name__}:SyncCallable",
        f"{__name__}:AsyncCallable",
    ],
)
def test_a_python_target_that_is_not_async_is_refused(tmp_path: Path, target: str) -> None:
    """Issue #9 item 11: a plain function passed check-config and failed only at start."""
    message = config_error(write(tmp_path, toml(sink=f'type = "python"\ntarget = "{target}"')))
    assert "sink.target" in message
    assert "not an async function" in message
    assert "async def handle(stream, events)" in message


@pytest.mark.parametrize("target", ["asyncio:sleep", f"{__name__}:ASYNC_OBJECT"])
def test_an_async_python_target_is_accepted(tmp_path: Path, target: str) -> None:
    """Issue #9 item 11: an async def, or an object whose __call__ is async, is accepted (and
    json:dumps, the sync counterpart, is refused)."""
    settings = load_settings(write(tmp_path, toml(sink=f'type = "python"\ntarget = "{target}"')))
    assert settings.sink.target == target  # type: ignore[union-attr]
    with pytest.raises(ConfigError):
        load_settings(write(tmp_path, toml(sink='type = "python"\ntarget = "json:dumps"')))


def test_settings_built_in_code_are_checked_too() -> None:
    """Issue #9 item 8: the same rules hold for Settings(...) (tests, embedding)."""
    with pytest.raises(ValueError, match="plain http://"):
        Settings(
            streams={  # type: ignore[arg-type]
                "main": {
                    "gateway_url": "http://gw.example.com",
                    "chain_code": "C",
                    "app_key": APP_KEY,
                    "auth": {"client_id": "c", "client_secret": CLIENT_SECRET},
                }
            }
        )
