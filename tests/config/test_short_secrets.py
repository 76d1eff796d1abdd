"""A secret of 1-3 characters is refused at load, naming its key and never its value: the log
redactor masks secrets of 4 characters or more only (a shorter one would mask half the log), so
a short client secret, app key, password, token, DSN or URL password, or secret-looking header
or query value would have appeared in log lines as it is. Every secret-bearing key, as given in
the file, the environment or a secret file; at 4 characters each is masked in every log line,
in each form the redactor knows (raw and percent-decoded)."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
from config_files import config_error, run_refused, write
from log_capture import captured_logs

from consumer.config import load_settings, secret_values
from consumer.config import settings as config_settings
from consumer.config.fields import is_secret_name
from consumer.logs import MIN_SECRET_CHARS
from consumer.runtime.daemon import register_secrets

pytestmark = pytest.mark.usefixtures("hermetic_config")

WORKTREE = Path(__file__).resolve().parents[2]
APP_KEY = "app-key-Sh0rt-0001"
CLIENT_SECRET = "client-secret-Sh0rt-0002"
SHORT = "Q7z"  # 3 characters: refused
BOUNDARY = "Q7zW"  # 4 characters: accepted, and masked


def stream(
    *,
    app_key: str = APP_KEY,
    client_secret: str = CLIENT_SECRET,
    gateway: str = "https://gw.example.com",
    auth: str = "",
    connection: str = "",
) -> str:
    return f"""
[streams.main]
gateway_url = "{gateway}"
chain_code = "CHAIN1"
app_key = "{app_key}"
[streams.main.auth]
client_id = "cid"
client_secret = "{client_secret}"
enterprise_id = "ENT1"
{auth}
[streams.main.connection]
{connection}
"""


def webhook(extra: str, url: str = "https://hook.example.com/in") -> str:
    return f'[sink]\ntype = "webhook"\nurl = "{url}"\n{extra}\n'


def basic(password: str) -> str:
    """The base64 of Basic credentials (user ``hook``) with ``password``."""
    return base64.b64encode(f"hook:{password}".encode()).decode()


PG_STATE = '[state]\nbackend = "postgres"\ndsn = "{dsn}"\n'
NATS = '[sink]\ntype = "nats"\n'
REDIS = '[sink]\ntype = "redis"\n'
ORCHESTRATION = "[orchestration]\nenabled = true\n"

# (key named in the error, what of it is said, the config with the secret ``s``)
CASES: list[tuple[str, str, Callable[[str], str]]] = [
    ("streams.main.app_key", "is shorter", lambda s: stream(app_key=s)),
    ("streams.main.auth.client_secret", "is shorter", lambda s: stream(client_secret=s)),
    (
        "streams.main.auth.password",
        "is shorter",
        lambda s: stream(auth=f'grant = "password"\nusername = "INTEGRATION"\npassword = "{s}"'),
    ),
    (
        "streams.main.auth.token_url",
        "the password of its user information is shorter",
        lambda s: stream(auth=f'token_url = "https://cid:{s}@tok.example.com/t"'),
    ),
    (
        "streams.main.auth.token_url",
        "its user name is shorter",  # a lone user name may be a token
        lambda s: stream(auth=f'token_url = "https://{s}@tok.example.com/t"'),
    ),
    (
        "streams.main.gateway_url",
        "the value of its parameter apikey is shorter",
        lambda s: stream(gateway=f"https://gw.example.com/?apikey={s}"),
    ),
    (
        "streams.main.connection.proxy",
        "the password of its user information is shorter",
        lambda s: stream(connection=f'proxy = "http://pu:{s}@proxy.example.com:3128"'),
    ),
    (
        "state.dsn",
        "the password of its user information is shorter",
        lambda s: stream() + PG_STATE.format(dsn=f"postgresql://opera:{s}@db.example.com/opera"),
    ),
    (
        "state.dsn",
        "the value of its parameter password is shorter",
        lambda s: stream() + PG_STATE.format(dsn=f"postgresql://db.example.com/o?password={s}"),
    ),
    (
        "sink.dsn",
        "the password of its user information is shorter",
        lambda s: (
            stream()
            + f'[sink]\ntype = "postgres"\ndsn = "postgresql://opera:{s}@db.example.com/opera"\n'
        ),
    ),
    ("sink.token", "is shorter", lambda s: stream() + webhook(f'auth = "bearer"\ntoken = "{s}"')),
    (
        "sink.password",
        "is shorter",
        lambda s: stream() + webhook(f'auth = "basic"\nusername = "u"\npassword = "{s}"'),
    ),
    (
        "sink.url",
        "the password of its user information is shorter",
        lambda s: stream() + webhook("", url=f"https://u:{s}@hook.example.com/in"),
    ),
    (
        "sink.url",
        "its user name is shorter",
        lambda s: stream() + webhook("", url=f"https://{s}@hook.example.com/in"),
    ),
    (
        "sink.url",
        "the value of its parameter token is shorter",
        lambda s: stream() + webhook("", url=f"https://hook.example.com/in?token={s}"),
    ),
    (
        "sink.headers",
        "header 'X-Api-Key': its value is shorter",
        lambda s: stream() + webhook(f'headers = {{ "X-Api-Key" = "{s}" }}'),
    ),
    (
        "sink.headers",
        "header 'Authorization': its value is shorter",  # the credentials after the scheme
        lambda s: stream() + webhook(f'headers = {{ "Authorization" = "Bearer {s}" }}'),
    ),
    (
        "sink.headers",
        # Basic credentials set as a header: the password they encode, as auth = "basic"
        "header 'Authorization': the password its Basic credentials encode is shorter",
        lambda s: stream() + webhook(f'headers = {{ "Authorization" = "Basic {basic(s)}" }}'),
    ),
    ("sink.password", "is shorter", lambda s: stream() + NATS + f'user = "u"\npassword = "{s}"\n'),
    ("sink.token", "is shorter", lambda s: stream() + NATS + f'token = "{s}"\n'),
    ("sink.nkey_seed", "is shorter", lambda s: stream() + NATS + f'nkey_seed = "{s}"\n'),
    (
        "sink.servers",
        "its user name is shorter",  # nats://TOKEN@host
        lambda s: stream() + NATS + f'servers = ["nats://{s}@127.0.0.1:4222"]\n',
    ),
    (
        "sink.servers",
        "the password of its user information is shorter",
        lambda s: stream() + NATS + f'servers = ["nats://u:{s}@127.0.0.1:4222"]\n',
    ),
    (
        "sink.url",
        "the password of its user information is shorter",
        lambda s: stream() + REDIS + f'url = "redis://:{s}@127.0.0.1:6379/0"\n',
    ),
    ("sink.password", "is shorter", lambda s: stream() + REDIS + f'password = "{s}"\n'),
    (
        "orchestration.base_url",
        "the value of its parameter key is shorter",
        lambda s: (
            stream()
            + ORCHESTRATION
            + f'base_url = "https://rest.example.com/api?key={s}"\n'
            + '[orchestration.resources]\n"R" = "/x/{primaryKey}"\n'
        ),
    ),
    (
        "orchestration.resources['R']",
        "the value of its parameter apikey is shorter",
        lambda s: (
            stream()
            + ORCHESTRATION
            + f'[orchestration.resources]\n"R" = "/x/{{primaryKey}}?apikey={s}"\n'
        ),
    ),
]
# A secret parameter's name as a word of a longer name, or one of a DSN's libpq secrets.
WORD_CASES: list[tuple[str, str, Callable[[str], str]]] = [
    (
        "state.dsn",
        "the value of its parameter sslpassword is shorter",  # the client key's passphrase
        lambda s: stream() + PG_STATE.format(dsn=f"postgresql://db.example.com/o?sslpassword={s}"),
    ),
    (
        "sink.dsn",
        "the value of its parameter oauth_client_secret is shorter",  # libpq 18
        lambda s: (
            stream()
            + '[sink]\ntype = "postgres"\n'
            + f'dsn = "postgresql://db.example.com/o?target_session_attrs=any&oauth_client_secret={s}"\n'
        ),
    ),
    (
        "sink.url",
        "the value of its parameter accessToken is shorter",
        lambda s: stream() + webhook("", url=f"https://hook.example.com/in?accessToken={s}"),
    ),
    (
        "sink.headers",
        "header 'X-Hub-Signature-256': its value is shorter",
        lambda s: stream() + webhook(f'headers = {{ "X-Hub-Signature-256" = "{s}" }}'),
    ),
    (
        "orchestration.resources['R']",
        "the value of its parameter api_key is shorter",
        lambda s: (
            stream()
            + ORCHESTRATION
            + '[orchestration.resources]\n"R" = "/x/{primaryKey}?roomAssignedOnly=N'
            + f'&api_key={s}"\n'
        ),
    ),
    (
        "orchestration.base_url",
        "the value of its parameter sig is shorter",  # Azure's SAS signature
        lambda s: (
            stream()
            + ORCHESTRATION
            + f'base_url = "https://rest.example.com/api?sv=2024&sig={s}"\n'
            + '[orchestration.resources]\n"R" = "/x/{primaryKey}"\n'
        ),
    ),
]
ALL_CASES = CASES + WORD_CASES
IDS = [f"{key}-{what.split(' is ')[0]}" for key, what, _ in ALL_CASES]


@pytest.mark.parametrize(("key", "what", "config"), ALL_CASES, ids=IDS)
def test_a_secret_too_short_to_mask_is_refused_naming_the_key(
    tmp_path: Path, key: str, what: str, config: Callable[[str], str]
) -> None:
    message = config_error(write(tmp_path, config(SHORT)))
    assert f"{key}: {what} than {MIN_SECRET_CHARS} characters" in message, message
    assert "could appear in log lines" in message
    assert SHORT not in message  # its value is never shown


@pytest.mark.parametrize(("key", "what", "config"), ALL_CASES, ids=IDS)
def test_a_secret_of_four_characters_never_reaches_a_log_line(
    tmp_path: Path, key: str, what: str, config: Callable[[str], str]
) -> None:
    """The shortest secret allowed is masked wherever a line holds it (the redactor is the
    daemon's, registered as run registers it)."""
    settings = load_settings(write(tmp_path, config(BOUNDARY)))
    register_secrets(settings)
    with captured_logs() as logs:
        structlog.get_logger("consumer.test").warning(
            f"request failed: {BOUNDARY}", error=f"refused {BOUNDARY}!", secret=BOUNDARY
        )
    text = logs.getvalue()
    assert "***" in text and BOUNDARY not in text, text


def test_a_percent_encoded_password_counts_decoded(tmp_path: Path) -> None:
    """%51%37%7A is 9 characters as written and 3 as sent: the 3 would show."""
    dsn = "postgresql://opera:%51%37%7A@db.example.com/opera"
    message = config_error(write(tmp_path, stream() + PG_STATE.format(dsn=dsn)))
    assert "state.dsn: the password of its user information is shorter" in message
    assert "%51%37%7A" not in message


def test_a_user_name_alone_is_no_secret_in_a_dsn_or_a_redis_url(tmp_path: Path) -> None:
    """Peer or .pgpass authentication, a Redis ACL user: a user name, not a credential."""
    dsn = "postgresql://pg@db.example.com/opera"
    load_settings(write(tmp_path, stream() + PG_STATE.format(dsn=dsn)))
    load_settings(write(tmp_path, stream() + REDIS + 'url = "redis://u@127.0.0.1:6379/0"\n'))


def test_a_short_query_value_that_is_no_secret_is_kept(tmp_path: Path) -> None:
    """Only secret-looking parameters (key, token, sig...) hold credentials: ?v=1 is none."""
    url = "https://hook.example.com/in?v=1&fetch=all"
    assert load_settings(write(tmp_path, stream() + webhook("", url=url))).sink.url == url  # type: ignore[union-attr]


def test_a_short_secret_from_the_environment_or_a_secret_file_is_named_by_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path, stream())
    monkeypatch.setenv("OPERA_CONSUMER_STREAMS__MAIN__AUTH__CLIENT_SECRET", SHORT)
    message = config_error(config)
    assert (
        "streams.main.auth.client_secret (from the environment variable "
        "OPERA_CONSUMER_STREAMS__MAIN__AUTH__CLIENT_SECRET): is shorter than 4" in message
    ), message
    assert SHORT not in message
    monkeypatch.delenv("OPERA_CONSUMER_STREAMS__MAIN__AUTH__CLIENT_SECRET")
    secrets = tmp_path / "credentials"
    secrets.mkdir()
    (secrets / "streams__main__app_key").write_text(SHORT)
    monkeypatch.setattr(config_settings, "SECRET_DIRS", (str(secrets),))
    message = config_error(config)
    assert "streams.main.app_key (from the secret file" in message, message
    assert "is shorter than 4 characters" in message and SHORT not in message


async def test_run_refuses_a_short_secret_before_connecting(tmp_path: Path) -> None:
    def config(url: str) -> Path:
        return write(tmp_path, stream(client_secret=SHORT, gateway=url))

    env = {k: v for k, v in os.environ.items() if not k.startswith("OPERA_CONSUMER_")}
    out = await run_refused(config, {**env, "PYTHONPATH": str(WORKTREE)})
    assert "streams.main.auth.client_secret: is shorter than 4 characters" in out, out
    assert SHORT not in out


# Parameters that merely look secret: a name is read as words, a DSN's parameters as libpq's.
PLAIN_DSN = "postgresql://opera:s3cret-pw@db.example.com:5432/opera"
NOT_SECRETS: dict[str, str] = {
    # target_session_attrs: libpq's and asyncpg's ("session" in its name), any its default.
    "state.dsn": stream() + PG_STATE.format(dsn=f"{PLAIN_DSN}?target_session_attrs=any"),
    "sink.dsn": (
        stream()
        + '[sink]\ntype = "postgres"\n'
        + f'dsn = "{PLAIN_DSN}?target_session_attrs=rw&application_name=op&passfile=pf"\n'
    ),
    # An API flag of OHIP's: "assigned" holds "sig".
    "orchestration template": (
        stream()
        + ORCHESTRATION
        + '[orchestration.resources]\n"Reservation" = '
        + '"/rsv/v1/hotels/{hotelId}/reservations/{primaryKey}'
        + '?fetchInstructions=Reservation&roomAssignedOnly=N"\n'
    ),
    "webhook url": stream()
    + webhook("", url="https://hook.example.com/in?keyword=ab&author=me&bypassCache=1"),
    "webhook header": stream() + webhook('headers = { "X-Author" = "me", "X-Keyword" = "ab" }'),
}


@pytest.mark.parametrize("where", list(NOT_SECRETS))
def test_parameters_that_merely_look_secret_are_not_refused(tmp_path: Path, where: str) -> None:
    """A value of 1-3 characters under a name that holds a secret word only as a substring
    (target_session_attrs, roomAssignedOnly, keyword, author, bypassCache) loads: it was refused
    (exit 78) when names were matched by substring, and configs that loaded before stopped."""
    load_settings(write(tmp_path, NOT_SECRETS[where]))


@pytest.mark.parametrize(
    "name",
    [
        "sig",
        "signature",
        "X-Hub-Signature-256",
        "sha256sig",
        "key",
        "api_key",
        "apiKey",
        "apikey",
        "APIKEY",
        "X-Api-Key",
        "XApiKey",
        "Ocp-Apim-Subscription-Key",
        "AWSAccessKeyId",
        "access_token",
        "accessToken",
        "accesstoken",
        "X-Amz-Security-Token",
        "client_secret",
        "Authorization",
        "Proxy-Authorization",
        "auth",
        "oauth",
        "Cookie",
        "Set-Cookie",
        "password",
        "passwd",
        "pwd",
        "pass",
        "db_pass",
        "dbpass",
        "sessionid",
        "session",
        "credentials",
        "X-Amz-Credential",
        "jwt",
        "hmac",
        "bearer",
        "keys",
    ],
)
def test_a_name_with_a_credential_word_is_secret(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "roomAssignedOnly",
        "assigned",
        "design",
        "signal",
        "keyword",
        "keyboard",
        "author",
        "X-Author",
        "authority",
        "passenger",
        "passport",
        "bypass",
        "bypassCache",
        "compass",
        "monkey",
        "hotkeys",
        "fetchInstructions",
        "hotelId",
        "sslmode",
        "code",
    ],
)
def test_a_name_holding_a_credential_word_only_inside_a_word_is_not_secret(name: str) -> None:
    assert not is_secret_name(name)


def test_a_dsn_registers_only_its_secret_parameters_with_the_redactor(tmp_path: Path) -> None:
    """A DSN's parameters are libpq's: sslmode=require, target_session_attrs=read-write,
    application_name are no secrets, and registered with the redactor they masked ``require``
    (and the rest) in every log line. Its password and sslpassword are; another URL's query
    values all stay registered (an API's credential may have any name: Azure's ``code``)."""
    dsn = (
        "postgresql://opera:s3cret-pw@db.example.com/opera?sslmode=require"
        "&target_session_attrs=read-write&application_name=consumer-east"
        "&sslpassword=key-pass-0001"
    )
    hook = "https://hook.example.com/in?code=azure-fn-key-0001"
    config = stream() + PG_STATE.format(dsn=dsn) + webhook("", url=hook)
    values = secret_values(load_settings(write(tmp_path, config)))
    assert {"s3cret-pw", "key-pass-0001", "azure-fn-key-0001"} <= set(values)
    assert not {"require", "read-write", "consumer-east"} & set(values), values
    register_secrets(load_settings(write(tmp_path, config)))
    with captured_logs() as logs:
        structlog.get_logger("consumer.test").warning(
            "state store", sslmode="require", attrs="read-write", key="key-pass-0001"
        )
    text = logs.getvalue()
    assert '"require"' in text and '"read-write"' in text and "key-pass-0001" not in text, text


def test_a_lone_user_name_is_a_secret_in_an_http_url_only(tmp_path: Path) -> None:
    """A DSN's or a Redis URL's user name alone is no secret (peer or .pgpass authentication,
    an ACL user): registered, the redactor masked "opera" in every log line. An http(s) URL's
    lone user name may be a token: registered."""
    dsn = "postgresql://opera@db.example.com/opera"
    hook = "https://tok-0001-abcd@hook.example.com/in"
    values = secret_values(load_settings(write(tmp_path, stream() + PG_STATE.format(dsn=dsn))))
    assert "opera" not in values, values
    values = secret_values(load_settings(write(tmp_path, stream() + webhook("", url=hook))))
    assert "tok-0001-abcd" in values, values
