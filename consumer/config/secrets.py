"""Every secret the settings hold, in every form it may travel in (raw, hashed, base64 of
Basic credentials, percent-encoded): what the log redactor and the webhook sink mask."""

from __future__ import annotations

import base64
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit

from pydantic import SecretStr

from ..core.protocol import key_hash
from ..errors import ConfigError
from .fields import (
    basic_credentials,
    is_dsn,
    is_secret_name,
    is_secret_parameter,
    user_information,
)
from .loading import UnsetSecret
from .settings import (
    NatsSinkSettings,
    PostgresSinkSettings,
    RedisSinkSettings,
    Settings,
    WebhookSinkSettings,
)


def _given(secret: SecretStr | None) -> str | None:
    """The secret's value; None for none, or one a command was loaded without (an
    :class:`UnsetSecret`: not there to mask)."""
    if secret is None or isinstance(secret, UnsetSecret):
        return None
    return secret.get_secret_value()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _forms(raw: str) -> list[str]:
    """``raw`` (as written in a URL) and its percent-decoded and percent-encoded forms."""
    decoded, plus_decoded = unquote(raw), unquote_plus(raw)
    return [
        raw,
        decoded,
        plus_decoded,
        quote(decoded, safe=""),
        quote_plus(plus_decoded, safe=""),
        quote(decoded, safe="!$&'()*+,;=:@/?~"),  # as a URL keeps it
    ]


def _params(part: str) -> list[str]:
    """The values of ``a=1&b=2`` (and a bare ``token``), as written."""
    values = []
    for piece in part.split("&"):
        name, eq, value = piece.partition("=")
        values.append(value if eq else name)
    return [v for v in values if v]


def query_secret_values(*parts: str) -> list[str]:
    """Every value of query strings (or fragments) like ``a=1&b=2``, in every form."""
    return [form for part in parts for raw in _params(part) for form in _forms(raw)]


def url_secret_values(url: str) -> list[str]:
    """The secrets a URL may hold, in every form they may travel in: the password of its user
    information (or a lone user name, but in a DSN or a Redis URL) raw, percent-decoded and
    re-encoded, the base64 of ``user:password`` (Basic auth, as our HTTP client and websockets
    send URL credentials), and every query and fragment value: an API's parameter may be its
    credential whatever its name (Azure Functions' ``code``). A PostgreSQL DSN's parameters
    are libpq's: only its secret ones (:func:`~consumer.config.fields.is_secret_parameter`), or
    the redactor would mask ``require`` (``sslmode=require``) in every log line."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return [str(url)]
    values: list[str] = []
    infos = {parts.netloc.rpartition("@")[0]} if "@" in parts.netloc else set()
    if (wide := user_information(url)) is not None:
        # A raw '/', '?' or '#' in a password ends urlsplit's netloc early: its whole
        # user information too (the settings refuse such a URL; this is for any other).
        infos.add(wide)
    # A user name alone is a credential in an http(s) or NATS URL (a token), not in a DSN or a
    # Redis URL (peer or .pgpass authentication, an ACL user): masked, "opera" would be
    # "***" in every log line.
    named = not is_dsn(url) and parts.scheme.lower() not in ("redis", "rediss")
    for userinfo in sorted(infos):
        raw_user, colon, raw_password = userinfo.partition(":")
        if colon or named:
            values += _forms(raw_password if colon else raw_user)
        values.append(_b64(f"{unquote(raw_user)}:{unquote(raw_password)}"))
    if is_dsn(url):
        for part in (parts.query, parts.fragment):
            for piece in part.split("&"):
                name, eq, value = piece.partition("=")
                if eq and value and is_secret_parameter(unquote_plus(name), dsn=True):
                    values += _forms(value)
        return values
    return values + query_secret_values(parts.query, parts.fragment)


def template_secret_values(template: str) -> list[str]:
    """The values of an orchestration URL template's secret-looking query (and fragment)
    parameters (:func:`~consumer.config.fields.is_secret_name`), in every form; not the
    others: they are API parameters, which the redactor would mask in every log line. A
    value with a placeholder is filled per event: not a secret of the settings."""
    rest, _, fragment = template.partition("#")
    values = []
    for part in (rest.partition("?")[2], fragment):
        for piece in part.split("&"):
            name, eq, value = piece.partition("=")
            if eq and value and "{" not in value and is_secret_name(unquote_plus(name)):
                values += _forms(value)
    return values


def webhook_secret_values(sink: WebhookSinkSettings) -> list[str]:
    """Every secret a webhook sink sends: the bearer token (and ``Bearer <token>``), the basic
    password and its base64 form, secret-looking header values (and the credentials a Basic one
    encodes), and the URL's secrets."""
    values: list[str] = []
    if (token := _given(sink.token)) is not None:
        values += [token, f"Bearer {token}"]
    if (password := _given(sink.password)) is not None:
        values += _basic_values(sink.username or "", password)
    for k, v in sink.headers.items():
        if is_secret_name(k):
            # "<scheme> <credentials>" (Bearer, Basic, a custom scheme): a receiver may echo
            # the credentials alone; Basic ones also decoded, as for auth = "basic".
            values += [str(v), str(v).partition(" ")[2].strip()]
            if (credentials := basic_credentials(str(v))) is not None:
                values += _basic_values(*credentials)
    values += url_secret_values(sink.url)
    # The path may be the credential (Slack, Discord, Teams): its long segments, which a
    # receiver's error page may echo.
    values += [seg for seg in urlsplit(str(sink.url)).path.split("/") if len(seg) >= 16]
    return _unique(values)


_DSN_PASSWORD = re.compile(r"""password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)""", re.IGNORECASE)


def _dsn_secret_values(dsn: str) -> list[str]:
    values = [dsn, *url_secret_values(dsn)] if "://" in dsn else [dsn]
    # A password holding a raw '#', '/', '?' or '@' ends urlsplit's netloc early (no '@' left
    # in it): it is the text between "//user:" and the last '@' of the whole DSN.
    userinfo, at, _ = dsn.partition("://")[2].rpartition("@")
    password = userinfo.partition(":")[2]
    if at and password:
        values += _forms(password)
    for match in _DSN_PASSWORD.finditer(dsn):  # key=value form, or ?password= in a URL
        raw = match.group(1)
        values += [raw, raw.strip("'").replace("\\'", "'")]
    return values


CREDS_MAX_BYTES: Final = 64 * 1024  # a NATS credentials file is a few KB
_CREDS_FIX: Final = (
    "point sink.creds_file at the NATS user's credentials file, readable by the daemon's user, "
    "as `nsc generate creds` writes it: the user JWT between -----BEGIN NATS USER JWT----- and "
    "its END line, then the nkey seed between -----BEGIN USER NKEY SEED----- and its END line"
)


@dataclass(frozen=True, slots=True)
class NatsCredentials:
    """A NATS credentials file as read once: its ``text`` (what nats-py is given, so that it
    never reads the file again itself) and the user JWT and nkey seed in it (to mask)."""

    jwt: str = field(repr=False)
    seed: str = field(repr=False)
    text: str = field(repr=False)


def nats_credentials(path: Path) -> NatsCredentials:
    """A NATS credentials file read once: its text, and the user JWT and nkey seed in it as
    nats-py's own reader finds them (what it sends and signs with is what we mask).
    :class:`ConfigError` naming sink.creds_file and the fix when the file cannot be read, or
    nats-py could not use it; never quoting the file."""
    from nats.aio.client import Client, RawCredentials  # noqa: PLC0415  # the nats sink's

    where = f"sink.creds_file {path}"
    try:
        import nkeys  # noqa: PLC0415
    except ImportError:
        raise ConfigError(
            f"{where} needs the nkeys package, which is not installed -> pip install "
            "'nats-py[nkeys]' (or use sink.user and sink.password, or sink.token)"
        ) from None
    try:
        # Looked at before it is opened: opening a device node can act (a tape rewinds, a
        # terminal becomes ours). Then opened non-blocking (a named pipe swapped in meanwhile
        # would wait for a writer, the daemon stuck at load) and looked at again, through the
        # descriptor read.
        regular = stat.S_ISREG(os.stat(path).st_mode)
        if regular:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                regular = stat.S_ISREG(os.fstat(fd).st_mode)
                data = f.read(CREDS_MAX_BYTES + 1) if regular else b""
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot read it ({exc.strerror or type(exc).__name__}) -> {_CREDS_FIX}"
        ) from None
    if not regular:
        raise ConfigError(f"{where}: not a regular file -> {_CREDS_FIX}")

    def refused(what: str) -> ConfigError:
        return ConfigError(f"{where}: {what}: not a NATS credentials file -> {_CREDS_FIX}")

    if len(data) > CREDS_MAX_BYTES:
        raise refused(f"larger than {CREDS_MAX_BYTES} bytes")
    try:
        text: str | None = data.decode("utf-8")
    except UnicodeDecodeError:  # holds the bytes: not the context of our error
        text = None
    if text is None:
        raise refused("not UTF-8 text")
    # nats-py's reader of the JWT reads on till its armour line: without one, for ever.
    if "BEGIN NATS USER JWT" not in text:
        raise refused("no user JWT")
    if "BEGIN USER NKEY SEED" not in text:
        raise refused("no nkey seed")
    credentials, reader = RawCredentials(text), Client()
    try:
        jwt = bytes(reader._read_creds_user_jwt(credentials)).decode().strip()
        seed = bytes(reader._read_creds_user_nkey(credentials) or b"").decode()
    except Exception:  # what it raises says nothing more than "unreadable"
        raise refused("nats-py cannot read it") from None
    if not jwt:
        raise refused("an empty user JWT")
    try:
        nkeys.from_seed(bytearray(seed.encode())).wipe()
    except Exception:  # nkeys' or PyNaCl's: either way not a seed
        raise refused("its nkey seed is not one nats-py can sign with") from None
    return NatsCredentials(jwt, seed, text)


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def _password_forms(password: str) -> list[str]:
    """A password as given, and form- and percent-encoded."""
    return [password, quote_plus(password, safe=""), quote(password, safe="")]


def _basic_values(user: str, password: str) -> list[str]:
    """HTTP Basic credentials in every form a receiver may echo them: the password as given
    and form- and percent-encoded (which masks it in a decoded ``user:password`` too, the user
    name left readable), their base64 and the header's value. (A password under
    MIN_SECRET_CHARS is refused at load: none is left unmasked.)"""
    basic = _b64(f"{user}:{password}")
    return [*_password_forms(password), basic, f"Basic {basic}"]


def secret_values(settings: Settings) -> list[str]:
    """Every secret string the settings hold, in every form we know it may appear in (for the
    log redactor): app keys and their SHA-256 hex, client secrets and the base64 of
    ``client_id:client_secret`` (Basic auth to the token endpoint), passwords (also
    form-encoded), the secrets of every URL (:func:`url_secret_values`), the webhook's token,
    password and secret headers, the secret-looking query values of the orchestration URL
    templates, the PostgreSQL DSNs (the sink's, the state store's) and their
    passwords, the user JWT and nkey seed of a NATS credentials file (:class:`ConfigError`
    when it cannot be read or parsed)."""
    values: list[str] = []
    for s in settings.streams.values():
        if (key := _given(s.app_key)) is not None:
            values += [key, key_hash(key)]
        auth = s.auth
        if (secret := _given(auth.client_secret)) is not None:
            values += [secret, _b64(f"{auth.client_id}:{secret}")]
        if (password := _given(auth.password)) is not None:
            values += _password_forms(password)
        for url in (s.gateway_url, s.auth.token_url, s.connection.proxy):
            if url is not None:
                values += url_secret_values(url)
    for template in settings.orchestration.resources.values():
        values += template_secret_values(template)
    if settings.orchestration.base_url is not None:
        values += url_secret_values(settings.orchestration.base_url)
    sink = settings.sink
    if isinstance(sink, WebhookSinkSettings):
        values += webhook_secret_values(sink)
    elif isinstance(sink, PostgresSinkSettings) and (dsn := _given(sink.dsn)) is not None:
        values += _dsn_secret_values(dsn)
    elif isinstance(sink, NatsSinkSettings):
        for given in (sink.password, sink.token, sink.nkey_seed):
            if given is not None:
                values += _password_forms(given.get_secret_value())
        if sink.creds_file is not None:  # its user JWT and nkey seed
            creds = nats_credentials(sink.creds_file)
            values += _password_forms(creds.jwt) + _password_forms(creds.seed)
        for server in sink.servers:
            values += url_secret_values(server)
    elif isinstance(sink, RedisSinkSettings):
        values += url_secret_values(sink.url.get_secret_value())  # its password, not its host
        if sink.password is not None:
            values += _password_forms(sink.password.get_secret_value())
    if settings.state.dsn is not None:  # the PostgreSQL state store's
        values += _dsn_secret_values(settings.state.dsn.get_secret_value())
    return _unique(values)
