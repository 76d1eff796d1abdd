"""A secret of 1-3 characters is refused at load, naming its key and never its value: the log
redactor masks secrets of 4 characters or more only (a shorter one would mask half the log), so
a short client secret, app key, password, token, DSN or URL password, or secret-looking header
or query value would have appeared in log lines as it is. Every secret-bearing key, as given in
the file, the environment or a secret file; at 4 characters each is masked in every log line,
in each form the redactor knows (raw and percent-decoded)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
from config_files import config_error, run_refused, write
from log_capture import captured_logs

from consumer.config import load_settings
from consumer.config import settings as config_settings
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
IDS = [f"{key}-{what.split(' is ')[0]}" for key, what, _ in CASES]


@pytest.mark.parametrize(("key", "what", "config"), CASES, ids=IDS)
def test_a_secret_too_short_to_mask_is_refused_naming_the_key(
    tmp_path: Path, key: str, what: str, config: Callable[[str], str]
) -> None:
    message = config_error(write(tmp_path, config(SHORT)))
    assert f"{key}: {what} than {MIN_SECRET_CHARS} characters" in message, message
    assert "could appear in log lines" in message
    assert SHORT not in message  # its value is never shown


@pytest.mark.parametrize(("key", "what", "config"), CASES, ids=IDS)
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
