"""sink.creds_file: the user JWT and the nkey seed it holds are secrets, masked as the other
secrets are (found by a review: the daemon never registered them with the log redactor, so a
server or a library quoting one showed it in a log line, an exception's text, the DLQ). A file
that cannot be read or parsed is a configuration error naming the key and the fix, at
check-config and before ``run`` connects, that quotes nothing of the file. (nats-py's own reader,
which the daemon left it to, spins for ever on a file without the JWT's armour line.)"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nkeys
import pytest
import structlog
from log_capture import captured_logs
from nats_server import NatsServer, interposed, pipe
from operator_support import cli
from server_process import free_port
from support import cli as process

from consumer.config import NatsSinkSettings, load_settings
from consumer.config.secrets import nats_credentials
from consumer.core.evidence import describe
from consumer.errors import ConfigError, SinkUnusable
from consumer.logs import MASK, REDACTOR
from consumer.runtime.assembly import register_secrets
from consumer.sandbox import launcher
from consumer.sinks.nats import NatsSink

PASSWORD = "nats-Creds-Pw-5c1e-secret"  # the server's only user: a JWT login is refused


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def new_credentials() -> tuple[str, str]:
    """A fresh (user JWT, nkey seed): a real user seed, and a JWT of the usual shape."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    header = _b64url(b'{"typ":"JWT","alg":"ed25519-nkey"}')
    claims = _b64url(json.dumps({"jti": os.urandom(16).hex(), "nats": {"type": "user"}}).encode())
    return f"{header}.{claims}.{_b64url(os.urandom(64))}", seed


def creds_text(jwt: str, seed: str) -> str:
    """A credentials file as `nsc generate creds` writes it."""
    return (
        f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def config(tmp_path: Path, creds: Path, server: str = "") -> Path:
    server = server or f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    path = tmp_path / "config.toml"
    path.write_text(
        launcher.stream_config("http://127.0.0.1:9")
        + f'[state]\npath = "{tmp_path / "state.db"}"\n'
        + f'[sink]\ntype = "nats"\nservers = ["{server}"]\ncreds_file = "{creds}"\n'
        + "timeout_s = 5.0\n[metrics]\nenabled = false\n"
    )
    return path


def pieces(secret: str, text: str) -> list[str]:
    """The 12-character pieces of ``secret`` that ``text`` holds."""
    return [secret[i : i + 12] for i in range(len(secret) - 11) if secret[i : i + 12] in text]


def test_the_jwt_and_the_seed_are_masked_in_log_lines_and_errors(tmp_path: Path) -> None:
    """The daemon's registration of the settings' secrets (run, preflight, dlq replay)."""
    jwt, seed = new_credentials()
    creds = tmp_path / "user.creds"
    creds.write_text(creds_text(jwt, seed))
    register_secrets(load_settings(config(tmp_path, creds)))
    error = RuntimeError(f"signing with {seed} for {jwt} failed")
    with captured_logs("json") as out:
        structlog.get_logger("consumer.test").warning(
            "quoted", jwt=jwt, seed=seed, both=[f"jwt={jwt}", {"seed": seed}], error=str(error)
        )
    for text in (out.getvalue(), describe(error), REDACTOR.scrub(repr(error))):
        assert MASK in text, text
        assert not pieces(jwt, text) and not pieces(seed, text), text


@contextlib.asynccontextmanager
async def recording_jwts(
    server: NatsServer, *, on_info: Callable[[], None] = lambda: None, quote: bool = False
) -> AsyncIterator[tuple[str, list[str]]]:
    """A proxy in front of ``server`` (its URL) recording the JWT of each CONNECT (the list).
    Its INFO gets a nonce, as a server taking nkeys or JWTs sends, after ``on_info`` is
    called; with ``quote`` its refusal quotes the JWT sent."""
    sent: list[str] = []

    async def from_client(
        cr: asyncio.StreamReader, sw: asyncio.StreamWriter, _: asyncio.StreamWriter
    ) -> None:
        line = await cr.readline()
        if line.startswith(b"CONNECT "):
            sent.append(json.loads(line[len(b"CONNECT ") :]).get("jwt", ""))
        sw.write(line)
        await pipe(cr, sw)

    async def from_server(
        sr: asyncio.StreamReader, cw: asyncio.StreamWriter, _: asyncio.StreamWriter
    ) -> None:
        while line := await sr.readline():
            if line.startswith(b"INFO "):
                on_info()
                info = json.loads(line[len(b"INFO ") :]) | {"nonce": "bm9uY2U"}
                line = b"INFO " + json.dumps(info).encode() + b"\r\n"
            if quote and line.startswith(b"-ERR") and sent:
                line = f"-ERR 'Authorization Violation: refused jwt {sent[-1]}'\r\n".encode()
            cw.write(line)
            await cw.drain()
        cw.close()

    async with interposed(server, from_client=from_client, from_server=from_server) as url:
        yield url, sent


async def test_a_server_quoting_the_jwt_it_refuses_is_masked(
    nats_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    """A server (here: a real one, its INFO and its refusal rewritten on the way) that quotes
    the JWT the client sent: the sink's error and its log lines show none of it."""
    server = nats_factory(users={"opera": PASSWORD})
    jwt, seed = new_credentials()
    creds = tmp_path / "user.creds"
    creds.write_text(creds_text(jwt, seed))
    async with recording_jwts(server, quote=True) as (url, sent):
        settings = load_settings(config(tmp_path, creds, url)).sink
        assert isinstance(settings, NatsSinkSettings)
        sink = NatsSink(settings, {"main": "DEMO"})
        with captured_logs("json") as out, pytest.raises(SinkUnusable) as caught:
            await sink.open(None)
    assert set(sent) == {jwt}  # what nats-py sent: the file's JWT
    text = str(caught.value)
    assert "refused the credentials" in text and MASK in text, text
    for shown in (text, REDACTOR.scrub(text), out.getvalue(), repr(sink)):
        assert not pieces(jwt, shown) and not pieces(seed, shown), shown


BAD_FILES: dict[str, bytes | None] = {
    "missing": None,
    "a-directory": b"",
    "no-jwt": b"-----BEGIN USER NKEY SEED-----\nSEED\n------END USER NKEY SEED------\n",
    "no-seed": b"-----BEGIN NATS USER JWT-----\nJWT\n------END NATS USER JWT------\n",
    "not-a-seed": b"-----BEGIN NATS USER JWT-----\nJWT\n------END NATS USER JWT------\n"
    b"-----BEGIN USER NKEY SEED-----\nSUnot-a-seed-at-all\n------END USER NKEY SEED------\n",
    "empty-jwt": b"-----BEGIN NATS USER JWT-----\n\n------END NATS USER JWT------\n"
    b"-----BEGIN USER NKEY SEED-----\nSEED\n------END USER NKEY SEED------\n",
    "not-utf8": b"-----BEGIN NATS USER JWT-----\n\xff\xfeJWT\n",
    "huge": b"-----BEGIN NATS USER JWT-----\nJWT\n" + b"#" * 100_000 + b"\n"
    b"-----BEGIN USER NKEY SEED-----\nSEED\n------END USER NKEY SEED------\n",
}


def bad_file(tmp_path: Path, case: str) -> tuple[Path, list[str]]:
    """The file of ``case`` and the texts of it that no output may show."""
    path = tmp_path / f"{case}.creds"
    content = BAD_FILES[case]
    jwt, seed = new_credentials()
    if case == "a-directory":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content.replace(b"JWT", jwt.encode()).replace(b"SEED", seed.encode()))
    return path, [jwt, seed]


@pytest.mark.usefixtures("contained_logging")
@pytest.mark.parametrize("case", list(BAD_FILES))
async def test_check_config_refuses_a_creds_file_it_cannot_read_or_parse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    path, secrets = bad_file(tmp_path, case)
    code, out, err = await cli(capsys, "check-config", "--config", str(config(tmp_path, path)))
    assert code == 78, (out, err)
    assert "sink.creds_file" in err and str(path) in err and "nsc generate creds" in err, err
    for secret in secrets:
        assert not pieces(secret, out + err), err


@pytest.mark.usefixtures("contained_logging")
async def test_run_refuses_it_before_connecting(tmp_path: Path) -> None:
    """Before: nats-py read the file at each connect, the daemon retrying for ever (a file
    without the JWT's armour line: spinning, the event loop stuck)."""
    path, secrets = bad_file(tmp_path, "no-seed")
    ran = await asyncio.to_thread(process, "run", "--config", str(config(tmp_path, path)))
    assert ran.returncode == 78, ran.stderr
    assert "sink.creds_file" in ran.stderr and "Traceback" not in ran.stderr
    assert not (tmp_path / "state.db").exists()  # refused before it opened anything
    for secret in secrets:
        assert not pieces(secret, ran.stdout + ran.stderr), ran.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this platform")
async def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """Before: opening a FIFO waited for a writer, and check-config (or run) hung at load."""
    path = tmp_path / "pipe.creds"
    os.mkfifo(path)
    ran = await asyncio.to_thread(process, "check-config", "--config", str(config(tmp_path, path)))
    assert ran.returncode == 78, ran.stderr
    assert "sink.creds_file" in ran.stderr and "not a regular file" in ran.stderr, ran.stderr


def test_a_file_that_is_not_regular_is_never_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused on what the path is, before any open: opening a device node can act (a tape
    rewinds, a terminal is taken). Before, the path was opened first, then refused."""
    path = tmp_path / "pipe.creds"
    os.mkfifo(path)
    opened: list[str] = []
    real_open = os.open

    def recording_open(name: str | os.PathLike[str], *args: int, **kwargs: int) -> int:
        opened.append(os.fspath(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    with pytest.raises(ConfigError, match="not a regular file"):
        nats_credentials(path)
    assert str(path) not in opened


async def test_the_credentials_sent_are_those_read_and_masked(
    nats_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    """The file is replaced between the sink's read (whose JWT and seed it masks) and the
    CONNECT: nats-py sends what the sink read. Before, nats-py opened the path again itself
    (at each connection, its own reconnects too): unmasked secrets, and a named pipe swapped
    in would have blocked the event loop."""
    server = nats_factory(users={"opera": PASSWORD})
    jwt, seed = new_credentials()
    later, _ = new_credentials()
    creds = tmp_path / "user.creds"
    creds.write_text(creds_text(jwt, seed))

    def replace() -> None:  # the sink has read the file: replaced before nats-py answers INFO
        creds.write_text(creds_text(later, seed))

    async with recording_jwts(server, on_info=replace) as (url, sent):
        settings = load_settings(config(tmp_path, creds, url)).sink
        assert isinstance(settings, NatsSinkSettings)
        sink = NatsSink(settings, {"main": "DEMO"})
        with pytest.raises(SinkUnusable):  # the server takes no JWT
            await sink.open(None)
    assert sent == [jwt]
