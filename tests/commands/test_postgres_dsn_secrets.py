"""A PostgreSQL password with a raw ``#``, ``/``, ``?`` or ``@`` in its DSN: asyncpg split the URL
otherwise than we do and raised ``invalid literal for int() with base 10: '<piece of the
password>'``, which ``run``, ``status``, ``preflight`` and ``dlq list`` printed; the log
redactor missed it too (urlsplit leaves the '@' outside the netloc). Now such a DSN never reaches
the driver, a driver's parse error is never shown, the message names the key and the fix, and
the redactor knows the password by the last '@'.

The commands run as a new user runs them: ``run`` as a process (``python -m consumer``), the
others in-process (tests/operator_support.py ``cli``), against the sandbox gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from operator_support import cli
from support import cli as process
from support import serving

from consumer.config import load_settings, secret_values
from consumer.errors import ConfigError
from consumer.pg_target import UNKNOWN_SERVER, Target, UnparsableDsn
from consumer.sandbox import launcher

pytestmark = pytest.mark.usefixtures("contained_logging")

SERVER = "127.0.0.1:5432/events"
# Each password holds what the driver splits at; every piece between them is long enough to
# be recognised (>= 4 characters) if any part of the output quoted it.
DSNS = {
    "hash": ("Kx7Qsecret#9zWq", f"postgresql://app:Kx7Qsecret#9zWq@{SERVER}"),
    "slash": ("Lm3pWord/Rt8vQ", f"postgresql://app:Lm3pWord/Rt8vQ@{SERVER}"),
    "question": ("Yh2sPass?Pq5wZ", f"postgresql://app:Yh2sPass?Pq5wZ@{SERVER}"),
    "at": ("Gh4kPass@Jn6tQ", f"postgresql://app:Gh4kPass@Jn6tQ@{SERVER}"),
    "all": (
        "Zq9wRest:Tr4eX#Mn7bY/Uo2iV?Ep8rW@Fs1dQ",
        f"postgresql://app:Zq9wRest:Tr4eX#Mn7bY/Uo2iV?Ep8rW@Fs1dQ@{SERVER}",
    ),
    # The password in the query: what follows the last '@' may be its tail, so no server.
    "query": ("Wd3rPass@Cx5vQ", f"postgresql://app@{SERVER}?password=Wd3rPass@Cx5vQ"),
}


def pieces(password: str) -> list[str]:
    """The password and every piece of it between the characters a URL splits at."""
    return [password, *(p for p in re.split(r"[#/?@:]", password) if len(p) >= 4)]


def assert_kept(text: str, password: str) -> None:
    for piece in pieces(password):
        assert piece not in text, f"{piece!r} (of the password) in: {text}"
        assert quote(piece, safe="") not in text


@pytest.mark.parametrize("case", list(DSNS))
def test_the_driver_never_gets_a_dsn_it_would_misread(case: str) -> None:
    password, dsn = DSNS[case]
    target = Target(dsn)
    assert not target.parsable
    with pytest.raises(UnparsableDsn) as refused:
        target.dsn()
    assert_kept(str(refused.value), password)
    assert target.where == (UNKNOWN_SERVER if case == "query" else SERVER)
    assert_kept(target.where, password)
    assert password in target.secrets
    message = Target.unparsable("[state] dsn")
    assert "[state] dsn" in message and "percent-encode" in message


def test_a_dsn_the_driver_reads_as_we_do_is_passed_on() -> None:
    for dsn in (
        f"postgresql://app:{quote('Kx7Q#9z/?@:', safe='')}@{SERVER}?sslmode=disable",
        "postgres://app:pw:with:colons@db:6432/hotel",
        "postgresql:///ev?host=/run/pg&password=qwerty123",
        "postgresql://[::1]/x",
    ):
        assert Target(dsn).dsn() == dsn
    assert not Target("host=db password=x").parsable  # asyncpg takes URLs only


@pytest.mark.parametrize("case", ["hash", "all"])
def test_the_settings_refuse_it_and_the_redactor_knows_the_password(
    tmp_path: Path, case: str
) -> None:
    """Refused by the settings now (their message never quotes it); the redactor still knows
    a password by the last '@' (Target.secrets), for a DSN that parses."""
    password, dsn = DSNS[case]
    for table in (
        f'[state]\nbackend = "postgres"\ndsn = "{dsn}"\n',
        f'[state]\npath = "{tmp_path / "s.db"}"\n[sink]\ntype = "postgres"\ndsn = "{dsn}"\n',
    ):
        config = tmp_path / "config.toml"
        config.write_text(launcher.stream_config("http://127.0.0.1:9") + table)
        with pytest.raises(ConfigError) as refused:
            load_settings(config)
        assert "percent-encode" in str(refused.value)
        assert_kept(str(refused.value), password)
    encoded = f"postgresql://app:{quote(password, safe='')}@{SERVER}"
    config = tmp_path / "config.toml"
    config.write_text(
        launcher.stream_config("http://127.0.0.1:9")
        + f'[state]\nbackend = "postgres"\ndsn = "{encoded}"\n'
    )
    assert {encoded, password, quote(password, safe="")} <= set(
        secret_values(load_settings(config))
    )


def config(tmp_path: Path, url: str, dsn: str, where: str) -> Path:
    """``where``: "state" (the PostgreSQL state store) or "sink" (the PostgreSQL sink)."""
    if where == "state":
        tables = f'[state]\nbackend = "postgres"\ndsn = "{dsn}"\n'
    else:
        tables = f'[state]\npath = "{tmp_path / "state.db"}"\n[sink]\ntype = "postgres"\n'
        tables += f'dsn = "{dsn}"\n'
    path = tmp_path / f"{where}.toml"
    path.write_text(
        launcher.stream_config(url)
        + tables
        + '[metrics]\nenabled = false\n[log]\nlevel = "debug"\n'
    )
    return path


@pytest.mark.parametrize(
    "scenario", [(c, w) for c in DSNS for w in ("state", "sink")], ids="-".join
)
async def test_the_commands_name_the_key_and_never_a_piece_of_the_password(
    sandbox_factory: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    scenario: tuple[str, str],
) -> None:
    """``where``: the DSN is the state store's ("state") or the PostgreSQL sink's ("sink")."""
    case, where = scenario
    password, dsn = DSNS[case]
    key = "state.dsn" if where == "state" else "sink.dsn"  # the settings refuse it
    gw = await sandbox_factory(backlog=3)
    path = config(tmp_path, gw.url, dsn, where)
    ran = await asyncio.to_thread(process, "run", "--config", str(path))
    assert ran.returncode == 78, ran.stderr
    assert key in ran.stderr and "percent-encode" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert_kept(ran.stdout + ran.stderr, password)
    assert gw.stats.connections == 0  # refused before it subscribed
    commands = [["status"], ["preflight"], ["dlq", "list"]]
    for command in commands:
        code, out, err = await cli(capsys, *command, "--config", str(path))
        assert_kept(out + err + caplog.text, password)
        if where == "state" or command == ["preflight"]:  # status and dlq never open the sink
            assert code != 0, (command, out, err)
            assert key in out + err, (command, out, err)


@pytest.mark.parametrize(
    "scenario", [(c, w) for c in DSNS for w in ("state", "sink")], ids="-".join
)
def test_check_config_refuses_a_dsn_the_driver_would_misread(
    tmp_path: Path, scenario: tuple[str, str]
) -> None:
    """check-config said "configuration OK" (exit 0) for what ``run`` refuses with 78: the
    settings check the DSN as the state store and the sink do, from the file or the
    environment, naming the key and never a piece of the password."""
    case, where = scenario
    password, dsn = DSNS[case]
    from_file = config(tmp_path, "http://127.0.0.1:9", dsn, where)
    variable = "OPERA_CONSUMER_STATE__DSN" if where == "state" else "OPERA_CONSUMER_SINK__DSN"
    good = f"postgresql://app:{quote(password, safe='')}@{SERVER}"
    (tmp_path / "env").mkdir()
    from_env = config(tmp_path / "env", "http://127.0.0.1:9", good, where)
    for path, env in ((from_file, None), (from_env, {**os.environ, variable: dsn})):
        result = process("check-config", "--config", str(path), env=env)
        assert result.returncode == 78, result.stderr
        assert f"{where}.dsn" in result.stderr and "percent-encode" in result.stderr
        assert "Traceback" not in result.stderr
        assert_kept(result.stdout + result.stderr, password)
    accepted = process("check-config", "--config", str(from_env))  # percent-encoded: fine
    assert accepted.returncode == 0, accepted.stderr


def test_a_password_across_the_cut_of_a_server_message_is_masked_whole() -> None:
    """The server's text is masked before it is cut: cut first, a password straddling the cut
    left its first half to read."""
    password = "Kx7Q-straddles-the-cut-9z"
    target = Target(f"postgresql://app:{quote(password, safe='')}@{SERVER}")
    at = 300 - len(password) // 2  # across the 300 characters kept of a server's message
    text = target.describe(RuntimeError("x" * at + password + " and more"))
    assert password[:6] not in text and "***" in text


REPEATED = (
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # openssl rand -hex 32
)


def eights(password: str) -> list[str]:
    """Every 8-character piece of ``password``: none may show, not even cut short."""
    return [password[i : i + 8] for i in range(len(password) - 7)]


def test_a_server_message_repeating_the_password_leaves_no_piece_of_it() -> None:
    """A message that repeats the password: cut at 2,400 characters, masked, then cut at 300,
    the whole copies shrank to "***" and the copy cut at 2,400 was left as its prefix."""
    target = Target(f"postgresql://app:{REPEATED}@{SERVER}")
    text = target.describe(RuntimeError("refused: " + (REPEATED + " ") * 80))
    assert text.startswith("refused: *** *** ") and text.endswith("… (RuntimeError)"), text
    leaked = [p for p in eights(REPEATED) if p in text]
    assert not leaked, text


def _pg_message(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


async def test_status_shows_no_piece_of_a_password_the_server_quotes_again_and_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``status`` with the state store on a PostgreSQL server that asks for the password in
    clear (as a hostile or misconfigured one may) and quotes it back, many times, in its
    refusal: the copy at the 2,400th character of its text was left as a prefix on stderr
    (and in the daemon's log: the same StoreError)."""
    said: list[bytes] = []

    async def hostile(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            for _ in range(3):  # SSLRequest (answered 'N'), then the startup message
                n = int.from_bytes(await r.readexactly(4), "big")
                body = await r.readexactly(n - 4)
                if body[:4] != (80877103).to_bytes(4, "big"):
                    break
                w.write(b"N")
            w.write(_pg_message(b"R", (3).to_bytes(4, "big")))  # the password in clear, please
            await w.drain()
            kind = await r.readexactly(1)
            n = int.from_bytes(await r.readexactly(4), "big")
            said.append(kind + (await r.readexactly(n - 4)).rstrip(b"\0"))
            text = ("password authentication failed: " + (REPEATED + " ") * 80).encode()
            w.write(_pg_message(b"E", b"SFATAL\0VFATAL\0C28P01\0M" + text + b"\0\0"))
            await w.drain()
        w.close()

    async with serving(hostile) as port:
        dsn = f"postgresql://opera:{REPEATED}@127.0.0.1:{port}/opera?sslmode=disable"
        path = config(tmp_path, "http://127.0.0.1:9", dsn, "state")
        code, out, err = await cli(capsys, "status", "--config", str(path))
    assert said == [b"p" + REPEATED.encode()]  # it was sent, and quoted back
    assert code != 0 and "***" in out + err, (out, err)
    leaked = [p for p in eights(REPEATED) if p in out + err]
    assert not leaked, f"a piece of the state DSN's password is shown: {out + err!r}"


@pytest.mark.parametrize("name", ["sslpassword", "oauth_client_secret", "SSLPassword"])
def test_every_secret_parameter_of_the_query_is_masked_as_written_and_decoded(name: str) -> None:
    """Not only ``password=``: a DSN may carry libpq's other secrets in its query (the client
    key's pass phrase, an OAuth client secret), and an error may quote one percent-encoded or
    decoded. Before, only ``password`` was known to :class:`Target`."""
    secret = "Hq8v Key@Pw9z/Tx"
    dsn = f"postgresql://app@{SERVER}?sslmode=require&{name}={quote(secret, safe='')}"
    target = Target(dsn)
    for quoted_as in (secret, quote(secret, safe="")):
        said = target.describe(RuntimeError(f"could not use {quoted_as!s} for the key"))
        assert quoted_as not in said and "***" in said, said
    assert target.where == SERVER
