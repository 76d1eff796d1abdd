"""NATS JetStream sink: each event published to a subject and acknowledged by the stream.

Not transactional: exactly-once in effect through JetStream's message deduplication. Every
message carries ``Nats-Msg-Id`` = the event's ``uniqueEventId``; the stream drops a message
whose id it has stored within its duplicate window (``duplicate_window_s``) and acknowledges
it as a duplicate. A crash between a publish and the checkpoint replays those events after
the restart: the stream keeps the first copy only. The window must therefore exceed the
longest time a replay can come after its publish (a crash, then a restart; the default is a
day). Ids not made of visible ASCII (never OHIP's) are sent as ``sha256:<hex>`` of the id.

The message: the subject rendered from ``subject`` with the tokens ``{chainCode}`` (the
configured stream's chain), ``{hotelId}``, ``{eventName}``, ``{moduleName}`` and ``{stream}``,
each value made a valid subject token (``.``, ``*``, ``>``, whitespace and control characters
become ``_``, an empty or missing value is ``_``, a value over 128 characters is cut and ends
with a hash of the whole); the body is the event's document as JSON (as the jsonl and webhook
sinks write it: the ``newEvent`` as received, plus ``resource`` when orchestration fetched
one); headers ``Nats-Msg-Id``, ``Nats-Expected-Stream`` (the stream refuses a subject that
another stream captures) and ``Opera-Stream`` (the configured stream's name). ``write``
returns once the stream has acknowledged every event of the batch.

Order: the events of one ``primaryKey`` are published in the order they were written, one
at a time (the next only once the stream has acknowledged the previous one), so a reader of
the stream sees each resource's events in sequence order. Different keys of a batch are in
flight concurrently. A failed batch is retried whole: what was already stored comes back as a
duplicate, and a key's later events were never sent ahead of the one that failed.

Errors:

* :class:`~consumer.errors.TransientSinkError` (retried with backoff; intake pauses): the
  connection lost or reconnecting, no acknowledgement within ``timeout_s``, JetStream
  answering 5xx, the stream full (discard-new limits), "no responders" while the stream exists
  and captures the subject (JetStream momentarily without a leader); creating the stream when
  its ``replicas`` copies cannot be placed while a server of the cluster is offline, or on a
  server before 2.9 (which does not say why): a warning naming ``sink.replicas``, once.
* :class:`~consumer.errors.PermanentSinkError` (that event is dead-lettered): a message larger
  than the server's ``max_payload`` or the stream's ``max_msg_size``, a document that cannot
  be written as JSON.
* :class:`~consumer.errors.SinkUnusable` (the daemon stops, exit 78): what an operator must
  fix, where dead-lettering would only fill the DLQ with every event that follows: credentials
  refused (at open or when reconnecting), no permission to publish to a subject or to use the
  JetStream API, a subject that the stream does not capture ("no responders": no stream
  listens there) or that another stream captures, the stream deleted while running, JetStream
  not enabled for the account, ``must-exist`` without the stream, a stream with interest
  retention and no consumer (it drops every event it acknowledges), an answer to a publish
  that is no acknowledgement by the configured stream (not JSON, another stream's, without a
  sequence number: something else answers on the subject), what no NATS server sends a client
  (:class:`_BoundedParser`: a message over 8 MiB, refused at its announced length, a protocol
  line over 64 KiB, one nats-py cannot read), ``replicas`` more than the cluster has servers
  (:func:`placement`) or on a server outside a cluster. Nothing is lost: the events are not
  checkpointed and are published after the fix and a restart.

A stream whose limits remove events read or not (``max_msgs_per_subject``, ``max_msgs`` or
``max_bytes`` with discard old, ``max_age``, interest retention), or that a restart of its
server empties (memory storage), is warned about at open and in preflight, as is a stream of 1
replica while several servers are configured (the daemon creates it with ``replicas`` copies).
Those checks, and the refusal of interest retention without a consumer, run at open and in
preflight only: a consumer deleted while the daemon runs is not seen (no extra round trip per
event).

Credentials in a server URL (``nats://user:password@host``, ``nats://token@host``) are taken
out of the URLs and sent to every server (nats-py would send them to that URL only, and log in
to another without them after a failover); URLs with different ones, or other ones than
``user``/``password``/``token``, are a ConfigError. Secrets (password, token, nkey seed, a
URL's password, the user JWT and nkey seed of ``creds_file``) never appear in a message or a
log line: servers are named ``scheme://host:port``; the log redactor masks them besides. The
credentials file is read (nats-py's reader) at check-config, at start and at each connection
of ours, its JWT and seed registered with the redactor; one that cannot be read or parsed is a
ConfigError (SinkUnusable once running), quoting nothing of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.client import Client, RawCredentials
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    Header,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

from ..config import NatsCredentials, NatsSinkSettings, nats_credentials, url_secret_values
from ..core.events import Event, header_id
from ..core.evidence import describe, prefix, shown
from ..core.printable import printable
from ..core.templates import (
    SUBJECT_UNSAFE,
    TOKEN_MAX_CHARS,  # noqa: F401  # re-exported: the sink's token limit
    TOKENS,
    Template,
    TemplateError,
    check_stream_name,
    check_subject,
    sanitise,
)
from ..errors import ConfigError, PermanentSinkError, SinkUnusable, TransientSinkError
from ..logs import REDACTOR, RateLimitedLogger
from .base import PlainSink, serialized

log = structlog.get_logger(__name__)

MSG_ID_HEADER: Final = "Nats-Msg-Id"
STREAM_HEADER: Final = "Opera-Stream"
# What a header adds to a message besides the body: the server's max_payload counts both.
_HEADER_OVERHEAD: Final = 128
RECONNECT_WAIT_S: Final = 1.0
PING_INTERVAL_S: Final = 20
MAX_OUTSTANDING_PINGS: Final = 3
# JetStream API error codes (nats-server's errors.json).
_ERR_STREAM_NOT_FOUND: Final = 10059
_ERR_MESSAGE_TOO_LARGE: Final = 10054
_ERR_STREAM_MISMATCH: Final = 10060  # Nats-Expected-Stream names another stream
_ERR_STREAM_NAME_IN_USE: Final = 10058
_ERR_JETSTREAM_OFF: Final = (10039, 10076)  # not enabled for the account; not enabled
_ERR_REPLICAS_UNCLUSTERED: Final = 10074  # replicas > 1 not supported in non-clustered mode
# Creating a stream whose copies cannot be placed: 10005 "no suitable peers for placement"
# (400, nats-server >= 2.9, with the reasons it found, e.g. ", peer offline"), 10023
# "insufficient resources" (503, before 2.9, without a reason).
_ERR_NO_PEERS: Final = 10005
_ERR_INSUFFICIENT_RESOURCES: Final = 10023
_NO_PEERS: Final = "no suitable peers for placement"
# Reasons that a server down (or not heard from yet, after a restart) gives: it may come back.
_PEER_MAY_RETURN: Final = ("peer offline", "miscellaneous issue")
_MAX_ANNOUNCED: Final = 1000  # connect_urls counted (the server's list: bounded)
_PERMISSION = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"', re.I)
_AUTH_MARKERS: Final = (
    "authorization violation",
    "authorization failed",
    "authentication expired",
    "authentication revoked",
)
_MAX_VIOLATIONS: Final = 100
# The most the server may send the sink's connection at once: a message (an acknowledgement, a
# JetStream API answer: a few KB; nats-server's own limit on what a client may publish,
# max_payload, is 1 MB by default, 64 MB at most) and a protocol line (an INFO listing the
# cluster's URLs: a few KB). nats-py buffers either whole, however long the server says it is.
MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024
MAX_LINE_BYTES: Final = 64 * 1024

_T = TypeVar("_T")


# --- subjects -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # few distinct values (hotels, event names), many events
def subject_token(value: str | None) -> str:
    """``value`` as one subject token: ``.``, ``*``, ``>``, whitespace, control characters
    and lone surrogates become ``_``; empty (or None) is ``_``; over ``TOKEN_MAX_CHARS``
    characters it is cut and ends with ``~`` and a hash of the whole (distinct values stay
    distinct, and no subject outgrows the server's control line)."""
    return sanitise(value, SUBJECT_UNSAFE, hash_raw=True)


msg_id = header_id  # the Nats-Msg-Id of an event


class SubjectTemplate(Template):
    """A subject with ``{token}`` fields (:data:`TOKENS`); the literal parts must make a
    valid subject (no empty token, no wildcard, no whitespace): a :class:`TemplateError`."""

    __slots__ = ()

    def __init__(self, template: str) -> None:
        super().__init__(template)
        check_subject(self)

    def pattern(self, known: Mapping[str, str]) -> str:
        """The subjects this template can produce, given only the ``known`` tokens: every
        subject token holding an unknown field becomes ``*``."""
        marker = "\x00"
        values = {t: known.get(t, marker) for t in TOKENS}
        return ".".join("*" if marker in t else t for t in self.render(values).split("."))


def covers(filter_: str, pattern: str) -> bool:
    """Whether the subject filter (wildcards ``*`` and ``>``) matches every subject that
    ``pattern`` (literal tokens and ``*``) can stand for."""
    return _matches(filter_, pattern, some=False)


def overlaps(filter_: str, pattern: str) -> bool:
    """Whether some subject matches both the filter and ``pattern``."""
    return _matches(filter_, pattern, some=True)


def _matches(filter_: str, pattern: str, *, some: bool) -> bool:
    """``some``: a ``*`` of the pattern matches any token of the filter (some subject of
    the pattern matches), else only the filter's wildcards match (every subject does)."""
    f, p = filter_.split("."), pattern.split(".")
    for i, ft in enumerate(f):
        if ft == ">":
            return len(p) > i
        if i >= len(p):
            return False
        if ft != "*" and ft != p[i] and not (some and p[i] == "*"):
            return False
    return len(f) == len(p)


def where(servers: Sequence[str]) -> str:
    """The servers as ``scheme://host:port``, without user information or anything after."""
    shown_servers = []
    for server in servers:
        url = server if "://" in server else f"nats://{server}"
        try:
            parts = urlsplit(url)
            host = parts.hostname or "?"
            port = f":{parts.port}" if parts.port is not None else ""
        except ValueError:
            shown_servers.append("<an invalid server URL>")
            continue
        if ":" in host:
            host = f"[{host}]"
        shown_servers.append(f"{parts.scheme}://{host}{port}")
    return ", ".join(shown_servers)


def check_settings(settings: NatsSinkSettings) -> SubjectTemplate:
    """ConfigError for settings the sink cannot use (without connecting); the subject's
    template otherwise."""
    try:
        template = SubjectTemplate(settings.subject)
    except TemplateError as exc:
        raise ConfigError(exc.at("sink.subject", settings.subject)) from None
    try:
        check_stream_name(settings.stream)
    except TemplateError as exc:
        raise ConfigError(exc.at("sink.stream", settings.stream)) from None
    if not settings.servers:
        raise ConfigError("sink.servers is empty: give at least one nats:// or tls:// URL")
    for i, server in enumerate(settings.servers):
        problem = _server_problem(server)
        if problem is not None:
            raise ConfigError(f"sink.servers[{i}] ({where([server])}): {problem}")
    url_credentials(settings)
    if settings.creds_file is not None:  # read and parsed as at each connection
        nats_credentials(settings.creds_file)
    return template


def _userinfo(server: str) -> tuple[str, str | None] | None:
    """A server URL's user information, percent-decoded: (user, password), (token, None) for
    a lone name (as nats-py reads ``nats://token@host``), or None."""
    url = server if "://" in server else f"nats://{server}"
    netloc = urlsplit(url).netloc
    if "@" not in netloc:
        return None
    user, colon, password = netloc.rpartition("@")[0].partition(":")
    if not user and not colon:
        return None
    return unquote(user), unquote(password) if colon else None


def _without_userinfo(server: str) -> str:
    """The URL as given, its user information (if any) taken out."""
    scheme, sep, rest = server.partition("://") if "://" in server else ("", "", server)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    host = rest[:end].rpartition("@")[2]
    return f"{scheme}{sep}{host}{rest[end:]}"


def url_credentials(settings: NatsSinkSettings) -> tuple[str, str | None] | None:
    """The credentials the server URLs carry ((user, password) or (token, None)), which the
    sink sends to every server; ConfigError when they differ from one URL to another or from
    sink.user / sink.password / sink.token.

    nats-py sends a URL's credentials to that URL only: after a failover to another server
    (one the cluster announced, or another of the list) it logs in without them and is
    refused. So they are taken out of the URLs and given as the connection's own."""
    found: dict[tuple[str, str | None], int] = {}
    for i, server in enumerate(settings.servers):
        info = _userinfo(server)
        if info is not None:
            found.setdefault(info, i)
    if not found:
        return None
    fix = (
        "put the credentials once in sink.user and sink.password (or sink.token) and take "
        "them out of the URLs: the client logs in to every server of the cluster with the same"
    )
    if len(found) > 1:
        first, second = sorted(found.values())[:2]
        raise ConfigError(
            f"sink.servers[{first}] and sink.servers[{second}] carry different credentials -> {fix}"
        )
    info, i = next(iter(found.items()))
    s = settings
    if s.user is not None or s.password is not None or s.token is not None:
        name, password = info
        wanted = (name, password, None) if password is not None else (None, None, name)
        given = (
            s.user,
            s.password.get_secret_value() if s.password is not None else None,
            s.token.get_secret_value() if s.token is not None else None,
        )
        if given != wanted:
            raise ConfigError(
                f"sink.servers[{i}] ({where([s.servers[i]])}) carries other credentials than "
                f"sink.user / sink.password / sink.token -> {fix}"
            )
    return info


def _server_problem(server: str) -> str | None:
    """What is wrong with a server URL, or None (``host:port`` alone means ``nats://``)."""
    url = server if "://" in server else f"nats://{server}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError for a port that is not a number
    except ValueError:
        return "not a URL (nats://host:port or tls://host:port)"
    if parts.scheme not in ("nats", "tls"):
        return f"scheme {parts.scheme!r} (nats:// or tls://)"
    if not parts.hostname:
        return "no host (nats://host:port)"
    return None


def _duration(seconds: float) -> str:
    if seconds >= 86400 and seconds % 3600 == 0:
        return f"{seconds / 86400:g} d"
    if seconds >= 3600 and seconds % 60 == 0:
        return f"{seconds / 3600:g} h"
    return f"{seconds:g} s"


class _BoundedParser(Parser):
    """nats-py's protocol parser, refusing what no NATS server sends a client: a message over
    :data:`MAX_MESSAGE_BYTES` (at its announced length, before it is read), a protocol line
    over :data:`MAX_LINE_BYTES` without its end, or one nats-py cannot read (an INFO that is
    no JSON, an -ERR that is no UTF-8: nats-py's read loop only logged those and ended, the
    connection left up and deaf until its stale-ping check, a minute or more). Each raises
    nats-py's ProtocolError, on which it drops the connection (its buffer with it) and
    reconnects; ``refused`` hears what it was first."""

    def __init__(self, nc: Client, refused: Callable[[str], None]) -> None:
        super().__init__(nc)
        self._refused = refused

    async def parse(self, data: bytes = b"") -> None:
        try:
            await super().parse(data)
        except nats.errors.ProtocolError:
            self._refuse("what nats-py cannot parse")
        except Exception as exc:  # raised where nats-py reads a line: the server's bytes
            self._refuse(f"a protocol line nats-py cannot read ({type(exc).__name__})")
        if self.state == AWAITING_MSG_PAYLOAD and self.needed > MAX_MESSAGE_BYTES:
            self._refuse(f"a message of more than {MAX_MESSAGE_BYTES} bytes")
        if self.state == AWAITING_CONTROL_LINE and len(self.buf) > MAX_LINE_BYTES:
            self._refuse(f"a protocol line of more than {MAX_LINE_BYTES} bytes")

    def _refuse(self, what: str) -> None:
        self.reset()
        self._refused(what)
        raise nats.errors.ProtocolError


@dataclass(slots=True)
class _Message:
    event: Event
    subject: str
    body: bytes
    msg_id: str


# --- the sink -----------------------------------------------------------------------------


class NatsSink(PlainSink):
    """``chains``: configured stream name -> its chain code (``{chainCode}``)."""

    name = "nats"

    def __init__(self, settings: NatsSinkSettings, chains: Mapping[str, str]) -> None:
        self.settings = settings
        self._chains = dict(chains)
        self.where = where(settings.servers)
        self.template = check_settings(settings)
        self._url_credentials = url_credentials(settings)  # (the same as the fields, if any)
        self._timeout = settings.timeout_s
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._connecting: asyncio.Lock | None = None
        self._auth_failed: asyncio.Future[str] | None = None  # set while connecting
        self._auth_error: str | None = None  # the last reconnect refused our credentials
        self._violations: dict[tuple[str, str], str] = {}  # (publish|subscription, subject)
        self._last_connect_error: list[str] = []  # while connecting: the latest error
        self._garbled: str | None = None  # what the server sent that no NATS server sends
        self._log = RateLimitedLogger(log, per_s=1.0, burst=5)
        self._placement_warned = False  # the warning naming sink.replicas: once
        self.published = 0
        self.duplicates = 0
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"NatsSink(servers={self.where!r}, stream={self.settings.stream!r})"

    # --- connecting -----------------------------------------------------------------------

    def _credentials(self) -> NatsCredentials | None:
        """The credentials file, read at each connection of ours (a file replaced since the
        daemon started is masked too); None without one."""
        s = self.settings
        if s.creds_file is None:
            return None
        try:
            return nats_credentials(s.creds_file)
        except ConfigError as exc:
            raise SinkUnusable(str(exc)) from None

    def _secrets(self, creds: NatsCredentials | None = None) -> list[str]:
        s = self.settings
        found = [v.get_secret_value() for v in (s.password, s.token, s.nkey_seed) if v is not None]
        for server in s.servers:
            found += url_secret_values(server)
        if self._url_credentials is not None:  # decoded, as they are sent
            name, password = self._url_credentials
            found.append(password if password is not None else name)
        if creds is not None:
            found += [creds.jwt, creds.seed]
        return found

    def _options(self, creds: NatsCredentials | None = None) -> dict[str, Any]:
        """nats-py's connect options (auth, TLS, timers), checking the files they name;
        ``creds``: the credentials file as :meth:`_credentials` read it for this connection."""
        s = self.settings
        options: dict[str, Any] = {
            # Without user information: nats-py would send it to that URL only (see
            # url_credentials); the credentials go to every server as the options below.
            "servers": [_without_userinfo(server) for server in s.servers],
            "name": "opera-consumer",
            "connect_timeout": s.timeout_s,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,  # never give up: a write waits for the server
            "reconnect_time_wait": RECONNECT_WAIT_S,
            "ping_interval": PING_INTERVAL_S,
            "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
            "drain_timeout": max(1, round(s.timeout_s)),
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if s.user is not None:
            options["user"] = s.user
        if s.password is not None:
            options["password"] = s.password.get_secret_value()
        if s.token is not None:
            options["token"] = s.token.get_secret_value()
        if self._url_credentials is not None:
            name, password = self._url_credentials
            if password is None:
                options["token"] = name
            else:
                options |= {"user": name, "password": password}
        if s.nkey_seed is not None or s.creds_file is not None:
            if importlib.util.find_spec("nkeys") is None:
                field = "nkey_seed" if s.nkey_seed is not None else "creds_file"
                raise SinkUnusable(
                    f"sink.{field} needs the nkeys package, which is not installed: "
                    "pip install 'nats-py[nkeys]' (or use user/password or a token)"
                )
            if s.nkey_seed is not None:
                options["nkeys_seed_str"] = s.nkey_seed.get_secret_value()
            if creds is not None:
                # Its text, not its path: nats-py would read the file again at each of its own
                # reconnects (in the event loop: a named pipe swapped in would block it), and
                # send secrets that are not masked.
                options["user_credentials"] = RawCredentials(creds.text)
        tls = self._tls_context()
        if tls is not None:
            options["tls"] = tls
        return options

    def _tls_context(self) -> ssl.SSLContext | None:
        s = self.settings
        wanted = any(server.startswith("tls://") for server in s.servers)
        if not (wanted or s.tls_ca_file or s.tls_cert_file or s.tls_key_file):
            return None
        if s.tls_key_file is not None and s.tls_cert_file is None:
            raise SinkUnusable("sink.tls_key_file is set without sink.tls_cert_file")
        try:
            context = ssl.create_default_context(
                cafile=str(s.tls_ca_file) if s.tls_ca_file is not None else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise SinkUnusable(
                f"sink.tls_ca_file {s.tls_ca_file}: cannot load it: {describe(exc)}"
            ) from None
        if s.tls_cert_file is not None:
            try:
                context.load_cert_chain(
                    str(s.tls_cert_file),
                    str(s.tls_key_file) if s.tls_key_file is not None else None,
                )
            except (OSError, ssl.SSLError) as exc:
                raise SinkUnusable(
                    f"sink.tls_cert_file {s.tls_cert_file} / sink.tls_key_file "
                    f"{s.tls_key_file}: cannot load the client certificate: {describe(exc)}"
                ) from None
        return context

    async def _connect(self) -> Client:
        """A new connection, or: :class:`SinkUnusable` when the server refuses our
        credentials, :class:`TransientSinkError` when none answers within ``timeout_s``."""
        creds = self._credentials()  # once: what is masked is what nats-py is given
        REDACTOR.add(*self._secrets(creds))
        options = self._options(creds)
        nc = Client()
        nc._ps = _BoundedParser(nc, self._on_garbled)  # nats-py's, no public way
        self._garbled = None
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[str] = loop.create_future()
        self._auth_failed = failed
        self._auth_error = None
        last = self._last_connect_error = []
        connecting = asyncio.ensure_future(nc.connect(**options))
        try:
            waiting: set[asyncio.Future[Any]] = {connecting, failed}
            done, _ = await asyncio.wait(
                waiting,
                timeout=self._timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if connecting in done:
                try:
                    connecting.result()
                except (nats.errors.Error, OSError, TimeoutError) as exc:
                    raise self._connect_failed(describe(exc)) from None
                self._max_payload(nc)
                return nc
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            await _shut(nc, self._timeout)
            if failed.done():
                raise self._refused(failed.result())
            detail = last[-1] if last else "no answer"
            raise TransientSinkError(
                f"nats sink: cannot connect to {self.where} within {self._timeout:g} s: {detail}"
            )
        except BaseException:
            if not connecting.done():
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
            if not nc.is_closed:
                await _shut(nc, self._timeout)
            raise
        finally:
            self._auth_failed = None

    def _max_payload(self, nc: Client) -> int:
        """The server's max_payload (from its INFO), or :class:`SinkUnusable`: one no message
        can meet (0, below the headers' size) dead-lettered every event for the server's
        fault; null or a string raised a TypeError at the first request; -1 failed each."""
        limit: object = nc.max_payload
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > _HEADER_OVERHEAD:
            return limit
        raise SinkUnusable(
            f"nats sink: the server at {self.where} announces max_payload {shown(limit, 40)}: "
            f"no event fits (a message with its headers needs more than {_HEADER_OVERHEAD} "
            "bytes); is it a NATS server, with nothing between rewriting its INFO? Set its "
            "max_payload (nats-server's default: 1 MB)"
        )

    def _connect_failed(self, detail: str) -> Exception:
        if _is_auth_error(detail):
            return self._refused(detail)
        return TransientSinkError(f"nats sink: cannot connect to {self.where}: {detail}")

    def _refused(self, detail: str) -> SinkUnusable:
        s = self.settings
        if s.creds_file is not None:
            how = f"the credentials file {s.creds_file}"
        elif s.nkey_seed is not None:
            how = "sink.nkey_seed"
        elif s.token is not None:
            how = "sink.token"
        elif s.user is not None or s.password is not None:
            how = f"sink.user ({s.user!r}) and sink.password"
        elif self._url_credentials is not None:
            how = "the credentials in sink.servers' URLs"
        else:
            how = "no credentials (the server requires some: set sink.user and sink.password, "
            how += "sink.token, sink.nkey_seed or sink.creds_file)"
        return SinkUnusable(
            f"nats sink: {self.where} refused the credentials ({prefix(detail, 200)}): check {how}"
        )

    async def _on_error(self, exc: Exception) -> None:
        text = describe(exc)
        if _is_auth_error(text):
            self._auth_error = text
            if self._auth_failed is not None and not self._auth_failed.done():
                self._auth_failed.set_result(text)
        match = _PERMISSION.search(str(exc)[:2000])
        if match is not None:
            if len(self._violations) >= _MAX_VIOLATIONS:
                self._violations.pop(next(iter(self._violations)))
            # (nats-py lowercases the server's error line, subject included.)
            self._violations[(match.group(1).lower(), match.group(2).lower())] = text
        if self._auth_failed is not None:  # connecting: _connect reports it
            self._last_connect_error.append(text)
            del self._last_connect_error[:-1]
            return
        self._log.warning("nats connection error", server=self.where, error=text)

    def _on_garbled(self, what: str) -> None:
        if self._garbled is None:
            self._garbled = what
        self._log.warning(
            "nats sink: the server sent what no NATS server sends; reconnecting",
            server=self.where,
            sent=what,
        )

    def _not_nats(self) -> SinkUnusable | None:
        """SinkUnusable once the server sent what no NATS server sends (_BoundedParser): the
        answer a write or an API call waited for will not come from it."""
        if self._garbled is None:
            return None
        return SinkUnusable(
            f"nats sink: {self.where} sent {self._garbled}, which no NATS server sends a "
            "client: is sink.servers a NATS server, with nothing between rewriting what it "
            "sends?"
        )

    async def _on_disconnected(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            self._log.warning("nats disconnected; reconnecting", server=self.where)

    async def _on_reconnected(self) -> None:
        self.reconnects += 1
        self._auth_error = None
        self._log.info("nats reconnected", server=self.where)

    async def _connection(self) -> tuple[Client, JetStreamContext]:
        """The open connection, or a new one when it was closed (by the server, say)."""
        nc, js = self._nc, self._js
        if nc is not None and js is not None and not nc.is_closed:
            return nc, js
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            nc, js = self._nc, self._js
            if nc is not None and js is not None and not nc.is_closed:
                return nc, js
            nc = await self._connect()
            js = nc.jetstream(timeout=self._timeout)
            self._nc, self._js = nc, js
            return nc, js

    # --- the stream -----------------------------------------------------------------------

    async def open(self, committed: str | None) -> None:
        await self.close()  # (opened again: a new connection)
        nc = await self._connect()
        try:
            js = nc.jetstream(timeout=self._timeout)
            info, notes = await self._inspect(js)
            if info is None:
                info = await self._create(nc, js)
                notes = self._check(info)
            for note in notes:
                log.warning(
                    "nats sink: check the stream",
                    server=self.where,
                    stream=self.settings.stream,
                    warning=note,
                )
        except BaseException:
            await _shut(nc, self._timeout)
            raise
        self._nc, self._js = nc, js
        log.info(
            "nats sink open",
            server=self.where,
            stream=self.settings.stream,
            subject=self.settings.subject,
            duplicate_window_s=info.config.duplicate_window,
        )

    async def _inspect(self, js: JetStreamContext) -> tuple[StreamInfo | None, list[str]]:
        """The stream's info and what to warn about, or None when it does not exist and
        ``on_start`` is ``create``; :class:`SinkUnusable` for what makes it unusable."""
        s = self.settings
        info = await self._api("reading the stream", js.stream_info(s.stream), missing_ok=True)
        if info is not None:
            return info, self._check(info)
        if s.on_start == "must-exist":
            raise SinkUnusable(
                f"nats sink: JetStream stream {s.stream!r} does not exist on {self.where} "
                f'(sink.on_start = "must-exist"): create it, capturing the subjects of '
                f"sink.subject and with a duplicate window of at least "
                f"{_duration(s.duplicate_window_s)} (e.g. `nats stream add {s.stream} "
                f"--subjects '{s.stream_subjects[0] if s.stream_subjects else 'opera.>'}' "
                f"--dupe-window {round(s.duplicate_window_s)}s`), "
                f'or set sink.on_start = "create"'
            )
        planned = StreamConfig(name=s.stream, num_replicas=s.replicas)  # as _create makes it
        notes = self._check_subjects(list(s.stream_subjects), "sink.stream_subjects")
        return None, notes + _replication(s.stream, planned, s)

    async def _create(self, nc: Client, js: JetStreamContext) -> StreamInfo:
        s = self.settings
        config = StreamConfig(
            name=s.stream,
            subjects=list(s.stream_subjects),
            duplicate_window=s.duplicate_window_s,
            storage=StorageType.FILE,
            num_replicas=s.replicas,
        )
        try:
            info = await self._api("creating the stream", self._add_stream(nc, js, config))
        except _AlreadyThere:
            # Another daemon created it meanwhile: check what it made.
            found = await self._api("reading the stream", js.stream_info(s.stream))
            assert found is not None
            return found
        assert info is not None
        log.info(
            "nats sink: created the JetStream stream",
            server=self.where,
            stream=s.stream,
            subjects=list(s.stream_subjects),
            duplicate_window_s=s.duplicate_window_s,
            replicas=s.replicas,
        )
        return info

    async def _add_stream(
        self, nc: Client, js: JetStreamContext, config: StreamConfig
    ) -> StreamInfo:
        s = self.settings
        try:
            return await js.add_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code == _ERR_REPLICAS_UNCLUSTERED:
                raise SinkUnusable(
                    f"nats sink: creating the stream {s.stream!r} on {self.where} with "
                    f"sink.replicas = {s.replicas}: {_api_text(exc)}: the server is not part of "
                    "a JetStream cluster; set sink.replicas = 1, or point sink.servers at a "
                    "cluster"
                ) from None
            verdict = placement(exc.err_code, exc.description, s.replicas)
            if verdict is None:
                raise  # (classified by _api)
            raise self._unplaced(exc, verdict, announced(nc)) from None

    def _unplaced(
        self, exc: nats.js.errors.APIError, verdict: str, servers: int | None
    ) -> Exception:
        """The stream's copies cannot be placed: SinkUnusable when the cluster has too few
        servers for sink.replicas (``verdict`` "impossible"); else (a server may be down and
        come back) TransientSinkError, with a warning naming sink.replicas logged once."""
        s = self.settings
        seen = f"; the cluster announces {servers} server(s) to clients" if servers else ""
        fix = "set sink.replicas to at most the number of JetStream servers in the cluster"
        if servers and servers < s.replicas:
            fix = f"set sink.replicas = {servers} (or fewer)"
        if verdict == "impossible":
            return SinkUnusable(
                f"nats sink: cannot create the stream {s.stream!r} on {self.where} with "
                f"sink.replicas = {s.replicas}: the JetStream cluster has fewer servers than "
                f"that to hold its copies ({_api_text(exc)}{seen}) -> {fix}, or add servers "
                "to the cluster, then restart"
            )
        detail = (
            "a server of the cluster is offline"
            if exc.err_code == _ERR_NO_PEERS
            else "the server does not say why (before nats-server 2.9)"
        )
        message = (
            f"nats sink: cannot create the stream {s.stream!r} on {self.where} with "
            f"sink.replicas = {s.replicas} now ({_api_text(exc)}{seen}): {detail}; it is "
            "tried again, but if the cluster has fewer than "
            f"{s.replicas} JetStream servers it never succeeds: then {fix}"
        )
        if not self._placement_warned:
            self._placement_warned = True
            log.warning(
                "nats sink: the stream's copies cannot be placed; check sink.replicas",
                server=self.where,
                stream=s.stream,
                replicas=s.replicas,
                warning=message,
            )
        return TransientSinkError(message)

    def _check(self, info: StreamInfo) -> list[str]:
        """Raise :class:`SinkUnusable` for a stream we cannot publish to; the warnings."""
        s, config = self.settings, info.config
        name = s.stream
        if config.sealed:
            raise SinkUnusable(f"nats sink: JetStream stream {name!r} is sealed: it takes no more")
        if config.mirror is not None:
            raise SinkUnusable(
                f"nats sink: JetStream stream {name!r} is a mirror: it takes no publishes"
            )
        if config.no_ack:
            raise SinkUnusable(
                f"nats sink: JetStream stream {name!r} has no_ack set: without acknowledgements "
                "no publish can be confirmed; unset it"
            )
        if config.retention == RetentionPolicy.INTEREST and not info.state.consumer_count:
            raise SinkUnusable(
                f"nats sink: JetStream stream {name!r} has interest retention and no consumer: "
                "it acknowledges each event, then drops it at once (nobody is interested), so "
                "events would be checkpointed and lost; create the consumers that read it "
                f"first (`nats consumer add {name} ...`), or use a stream with limits or "
                "work-queue retention"
            )
        notes = self._check_subjects(list(config.subjects or []), f"stream {name!r}'s subjects")
        notes += _dropping(name, config)
        notes += _replication(name, config, s)
        window = config.duplicate_window or 0.0
        if window + 1e-6 < s.duplicate_window_s:
            notes.append(
                f"the stream's duplicate window ({_duration(window)}) is shorter than "
                f"sink.duplicate_window_s ({_duration(s.duplicate_window_s)}): an event "
                "replayed later than that after its publish (a crash, then a late restart) "
                "is stored twice; raise it (`nats stream edit "
                f"{name} --dupe-window {round(s.duplicate_window_s)}s`)"
            )
        return notes

    def _patterns(self) -> list[str]:
        """The subjects the template can produce, one pattern per configured stream."""
        if not self._chains:
            return [self.template.pattern({})]
        return list(
            dict.fromkeys(
                self.template.pattern(
                    {"chainCode": subject_token(chain), "stream": subject_token(stream)}
                )
                for stream, chain in self._chains.items()
            )
        )

    def _check_subjects(self, filters: list[str], what: str) -> list[str]:
        """SinkUnusable when no subject of the template can be captured; warnings when only
        some can."""
        notes: list[str] = []
        for pattern in self._patterns():
            if any(covers(f, pattern) for f in filters):
                continue
            shown_filters = printable(", ".join(filters), 300) or "none"  # the server's list
            if any(overlaps(f, pattern) for f in filters):
                notes.append(
                    f"{what} ({shown_filters}) capture only some of the subjects {pattern} "
                    "of sink.subject: an event published outside them stops the daemon"
                )
                continue
            raise SinkUnusable(
                f"nats sink: {what} ({shown_filters}) capture none of the subjects {pattern} "
                f"of sink.subject {self.settings.subject!r}: make sink.subject and the "
                "stream's subjects agree"
            )
        return notes

    async def _api(self, doing: str, call: Awaitable[_T], *, missing_ok: bool = False) -> _T | None:
        """A JetStream API call, its failures classified."""
        try:
            return await call
        except nats.js.errors.NotFoundError as exc:
            if missing_ok and exc.err_code == _ERR_STREAM_NOT_FOUND:
                return None
            raise SinkUnusable(
                f"nats sink: {doing} {self.settings.stream!r} on {self.where}: {_api_text(exc)}"
            ) from None
        except nats.js.errors.ServiceUnavailableError as exc:
            # No responders at all (nobody serves the JetStream API), or it says it is off.
            if exc.code is None or exc.err_code in _ERR_JETSTREAM_OFF:
                raise SinkUnusable(
                    f"nats sink: JetStream does not answer on {self.where} (no responders "
                    "to its API): enable JetStream on the server (nats-server -js) and for "
                    "this account"
                ) from None
            raise TransientSinkError(
                f"nats sink: {doing} on {self.where}: {_api_text(exc)}"
            ) from None
        except nats.js.errors.APIError as exc:
            if exc.err_code == _ERR_STREAM_NAME_IN_USE:
                raise _AlreadyThere() from None
            if exc.code is not None and 400 <= exc.code < 500:
                raise SinkUnusable(
                    f"nats sink: {doing} {self.settings.stream!r} on {self.where}: {_api_text(exc)}"
                ) from None
            raise TransientSinkError(
                f"nats sink: {doing} on {self.where}: {_api_text(exc)}"
            ) from None
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            if (not_nats := self._not_nats()) is not None:
                raise not_nats from None
            denied = self._denied(api=True)
            if denied is not None:
                raise SinkUnusable(
                    f"nats sink: {doing} on {self.where}: permission denied ({denied}): the "
                    "user needs publish permission on $JS.API.> and subscribe permission on "
                    "_INBOX.>"
                ) from None
            raise TransientSinkError(
                f"nats sink: {doing} on {self.where}: no answer within {self._timeout:g} s "
                f"({describe(exc)})"
            ) from None
        except (nats.errors.Error, OSError) as exc:
            if (not_nats := self._not_nats()) is not None:
                raise not_nats from None
            raise TransientSinkError(
                f"nats sink: {doing} on {self.where}: {describe(exc)}"
            ) from None

    def _denied(self, subject: str | None = None, *, api: bool = False) -> str | None:
        """A permission violation the server reported: for a subscription (the only one is
        the reply inbox), a publish to ``subject``, or (``api``) to the JetStream API."""
        wanted = subject.lower() if subject is not None else None
        for (kind, denied), text in self._violations.items():
            if kind == "subscription" or denied == wanted:
                return text
            if api and denied.startswith("$js.api."):
                return text
        return None

    # --- writing --------------------------------------------------------------------------

    def subject(self, stream: str, ev: Event) -> str:
        return self.template.render(
            {
                "chainCode": subject_token(self._chains.get(stream)),
                "hotelId": subject_token(ev.hotel_id),
                "eventName": subject_token(ev.event_name),
                "moduleName": subject_token(ev.module_name),
                "stream": subject_token(stream),
            }
        )

    def _message(self, stream: str, ev: Event, limit: int) -> _Message:
        body = serialized(ev)
        mid = msg_id(ev.unique_event_id)
        size = len(body) + len(mid) + len(stream) + len(self.settings.stream) + _HEADER_OVERHEAD
        if size > limit:
            raise PermanentSinkError(
                f"nats sink: event of {len(body)} bytes (with headers about {size}) exceeds "
                f"the server's max_payload of {limit} bytes on {self.where}",
                unique_event_id=ev.unique_event_id,
            )
        return _Message(ev, self.subject(stream, ev), body, mid)

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        if not events:
            return
        nc, js = await self._connection()
        limit = self._max_payload(nc)  # a reconnect may have reached another server
        # Every message is made before the first publish: an event that cannot be sent is
        # named at once.
        chains: dict[str, list[_Message]] = {}
        for ev in events:
            chains.setdefault(ev.primary_key, []).append(self._message(stream, ev, limit))
        if len(chains) == 1:
            await self._publish_chain(nc, js, stream, next(iter(chains.values())))
            return
        results = await asyncio.gather(
            *(self._publish_chain(nc, js, stream, chain) for chain in chains.values()),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            order = {ev.unique_event_id: i for i, ev in enumerate(events)}
            raise _most_severe(failures, order)

    async def _publish_chain(
        self, nc: Client, js: JetStreamContext, stream: str, chain: list[_Message]
    ) -> None:
        """One key's events in order, each only once the previous one is acknowledged."""
        for message in chain:
            await self._publish(nc, js, stream, message)

    async def _publish(self, nc: Client, js: JetStreamContext, stream: str, m: _Message) -> None:
        """JetStream's publish (a request on the subject, the stream's answer), with the answer
        read here, with orjson: nats-py's json.loads raises RecursionError for deeply nested
        bytes, which no handler of ours expected (orjson's depth limit is a decode error)."""
        s = self.settings
        headers = {MSG_ID_HEADER: m.msg_id, STREAM_HEADER: stream, Header.EXPECTED_STREAM: s.stream}
        try:
            reply = await nc.request(m.subject, m.body, timeout=self._timeout, headers=headers)
            ack = self._acknowledgement(reply.data, m)
        except nats.errors.NoRespondersError:
            raise await self._no_responders(js, m) from None
        except nats.js.errors.APIError as exc:
            raise self._rejected(exc, m) from None
        except nats.errors.BadSubjectError:  # cannot be: subjects are sanitised
            raise PermanentSinkError(
                f"nats sink: invalid subject {prefix(m.subject, 300)}",
                unique_event_id=m.event.unique_event_id,
            ) from None
        except nats.errors.MaxPayloadError:
            raise PermanentSinkError(
                f"nats sink: event of {len(m.body)} bytes exceeds the server's max_payload "
                f"on {self.where}",
                unique_event_id=m.event.unique_event_id,
            ) from None
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise self._timed_out(m, exc) from None
        except (nats.errors.Error, OSError) as exc:
            raise self._unreachable(exc) from None
        # nats-py takes any JSON object with these names as an acknowledgement: one from
        # another stream, or without a sequence, is not our stream storing the event, and
        # returning would checkpoint an event that is nowhere.
        seq_ok = isinstance(ack.seq, int) and not isinstance(ack.seq, bool) and ack.seq > 0
        if ack.stream != s.stream or not seq_ok:
            raise SinkUnusable(
                f"nats sink: the answer to a publish to {prefix(m.subject, 300)} on "
                f"{self.where} is not an acknowledgement by stream {s.stream!r} "
                f"({shown({'stream': ack.stream, 'seq': ack.seq}, 120)}): does something "
                "else answer requests on that subject?"
            )
        # The stream answers again: what the connection refused before (_BoundedParser) no
        # longer turns a later timeout into SinkUnusable.
        self._garbled = None
        if ack.duplicate:
            self.duplicates += 1
        else:
            self.published += 1

    def _acknowledgement(self, data: bytes, m: _Message) -> PubAck:
        """The stream's answer to a publish: its acknowledgement, or the APIError it reports
        (raised); :class:`SinkUnusable` for anything else (not JSON, nested past orjson's
        limit, no object, an error without its fields): something other than the stream
        answers on the subject, and whatever reading it raised is no fault of the event."""
        try:
            answer = orjson.loads(data)
            if not isinstance(answer, dict):
                raise TypeError(f"a JSON {type(answer).__name__}, not an object")
            if "error" in answer:
                nats.js.errors.APIError.from_error(answer["error"])  # raises it
            return PubAck.from_response(answer)
        except nats.js.errors.APIError:
            raise
        except Exception as exc:  # any answer that is no acknowledgement
            raise SinkUnusable(
                f"nats sink: the answer to a publish to {prefix(m.subject, 300)} on "
                f"{self.where} is not a JetStream acknowledgement ({describe(exc)}): does "
                f"something other than stream {self.settings.stream!r} answer requests on "
                "that subject?"
            ) from None

    def _unreachable(self, exc: BaseException) -> Exception:
        if (not_nats := self._not_nats()) is not None:
            return not_nats
        if self._auth_error is not None:
            return self._refused(self._auth_error)
        return TransientSinkError(f"nats sink: publishing to {self.where}: {describe(exc)}")

    def _timed_out(self, m: _Message, exc: BaseException) -> Exception:
        if (not_nats := self._not_nats()) is not None:
            return not_nats
        denied = self._denied(m.subject)
        if denied is not None:
            return SinkUnusable(
                f"nats sink: permission denied on {self.where}: no acknowledgement for "
                f"{prefix(m.subject, 300)} after the server reported: {denied}; grant the "
                f"user publish permission on the subjects of sink.subject "
                f"({', '.join(self._patterns())}) and subscribe permission on _INBOX.>"
            )
        if self._auth_error is not None:
            return self._refused(self._auth_error)
        return TransientSinkError(
            f"nats sink: no acknowledgement from stream {self.settings.stream!r} on "
            f"{self.where} within {self._timeout:g} s ({describe(exc)})"
        )

    def _rejected(self, exc: nats.js.errors.APIError, m: _Message) -> Exception:
        s = self.settings
        text = _api_text(exc)
        if exc.err_code == _ERR_MESSAGE_TOO_LARGE:
            return PermanentSinkError(
                f"nats sink: stream {s.stream!r} refused the event of {len(m.body)} bytes: {text}",
                unique_event_id=m.event.unique_event_id,
            )
        if exc.err_code == _ERR_STREAM_MISMATCH:
            return SinkUnusable(
                f"nats sink: subject {prefix(m.subject, 300)} is captured by another stream "
                f"than {s.stream!r} on {self.where}: make sink.subject and the streams' "
                "subjects agree"
            )
        if exc.err_code == _ERR_STREAM_NOT_FOUND:
            return self._stream_gone()
        return TransientSinkError(
            f"nats sink: stream {s.stream!r} on {self.where} refused a publish: {text}"
        )

    def _stream_gone(self) -> SinkUnusable:
        s = self.settings
        return SinkUnusable(
            f"nats sink: JetStream stream {s.stream!r} no longer exists on {self.where} "
            "(deleted while the daemon ran?): events not yet checkpointed are published "
            "again after a restart; recreate it, or restart with "
            'sink.on_start = "create"'
        )

    async def _no_responders(self, js: JetStreamContext, m: _Message) -> Exception:
        """No stream listens on the subject: the stream is gone, does not capture the
        subject (SinkUnusable), or is momentarily without a leader (transient)."""
        s = self.settings
        try:
            info = await js.stream_info(s.stream)
        except nats.js.errors.NotFoundError:
            return self._stream_gone()
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            return TransientSinkError(
                f"nats sink: no responders for {prefix(m.subject, 300)} on {self.where}, and "
                f"the stream's info is unavailable: {describe(exc)}"
            )
        filters = list(info.config.subjects or [])
        if not any(covers(f, m.subject) for f in filters):
            return SinkUnusable(
                f"nats sink: stream {s.stream!r} on {self.where} does not capture subject "
                f"{prefix(m.subject, 300)} (its subjects: "
                f"{printable(', '.join(filters), 300) or 'none'}): "
                "make sink.subject and the stream's subjects agree"
            )
        return TransientSinkError(
            f"nats sink: no responders for {prefix(m.subject, 300)} on {self.where}: "
            f"stream {s.stream!r} is temporarily unavailable"
        )

    # --- the rest -------------------------------------------------------------------------

    def counters(self) -> dict[str, float]:
        return {
            "nats_published": float(self.published),
            "nats_duplicates": float(self.duplicates),
            "nats_reconnects": float(self.reconnects),
        }

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            await _shut(nc, self._timeout)

    async def preflight(self) -> str:
        """Connect, authenticate and check the stream (it exists, or can be created, and
        captures the subjects of ``subject``) without publishing anything; a one-line
        description, or :class:`SinkUnusable` saying what is wrong."""
        s = self.settings
        try:
            nc = await self._connect()
        except TransientSinkError as exc:
            raise SinkUnusable(str(exc)) from None
        try:
            js = nc.jetstream(timeout=self._timeout)
            try:
                account = await self._api("reading the JetStream account", js.account_info())
                info, notes = await self._inspect(js)
            except TransientSinkError as exc:
                raise SinkUnusable(str(exc)) from None
        finally:
            await _shut(nc, self._timeout)
        assert account is not None
        subjects = ", ".join(self._patterns())
        if info is None:
            line = (
                f"{self.where}: JetStream available ({account.streams} streams); stream "
                f"{s.stream!r} does not exist yet and is created at start (subjects "
                f"{', '.join(s.stream_subjects)}, duplicate window "
                f"{_duration(s.duplicate_window_s)}, {s.replicas} replica(s)); publishes to "
                f"{subjects}"
            )
        else:
            line = (
                f"{self.where}: stream {s.stream!r} exists ({info.state.messages} messages, "
                f"subjects {', '.join(info.config.subjects or [])}, duplicate window "
                f"{_duration(info.config.duplicate_window or 0.0)}, "
                f"{info.config.num_replicas or 1} replica(s)); publishes to {subjects}"
            )
        if notes:
            line += "; WARNING: " + "; ".join(notes)
        return line


def _dropping(name: str, config: StreamConfig) -> list[str]:
    """What in the stream's configuration removes acknowledged events, read or not (an
    event the stream acknowledged is checkpointed: gone from the stream, it is gone)."""
    notes = []
    if config.storage == StorageType.MEMORY:
        notes.append(
            "the stream keeps its messages in memory (storage: memory): a restart of its "
            "server (of every server holding a copy) loses every event it acknowledged, and "
            "the daemon checkpointed them; use file storage (a new stream: the storage of one "
            "cannot be changed)"
        )
    if config.retention == RetentionPolicy.INTEREST:
        notes.append(
            "the stream has interest retention: an event on a subject that no consumer's "
            "filter matches is dropped as soon as it is stored; make sure its consumers "
            "cover every subject of sink.subject (or use limits retention)"
        )
    per_subject = config.max_msgs_per_subject or -1
    if per_subject > 0 and not (
        config.discard == DiscardPolicy.NEW and config.discard_new_per_subject
    ):
        notes.append(
            f"the stream keeps only the last {per_subject} message(s) of each subject "
            "(max_msgs_per_subject): older events of a subject (a hotel's event name, with "
            "the default sink.subject) are removed as new ones come, read or not; remove the "
            f"limit (`nats stream edit {name} --max-msgs-per-subject=-1`)"
        )
    if config.discard != DiscardPolicy.NEW:
        limits = [
            f"{what} {value}"
            for what, value in (("max_msgs", config.max_msgs), ("max_bytes", config.max_bytes))
            if value is not None and value > 0
        ]
        if limits:
            notes.append(
                f"the stream removes its oldest events, read or not, once it reaches "
                f"{' or '.join(limits)} (discard old); use discard new (`nats stream edit "
                f"{name} --discard new`: a full stream then refuses publishes, which are "
                "retried until readers make room), or remove the limit"
            )
    if config.max_age:
        notes.append(
            f"the stream removes events older than {_duration(config.max_age)} (max_age), "
            "read or not: a reader lagging longer loses them; raise or remove it "
            f"(`nats stream edit {name} --max-age=0`) unless that is intended"
        )
    return notes


def _replication(name: str, config: StreamConfig, s: NatsSinkSettings) -> list[str]:
    """A stream kept on one server while several are configured (a cluster, most likely):
    losing that server's disk loses every event it acknowledged, which we checkpointed."""
    replicas = config.num_replicas or 1
    if replicas > 1 or len(s.servers) < 2:  # one server listed: nothing to say of a cluster
        return []
    fix = f"`nats stream edit {name} --replicas 3`"
    if s.replicas > 1:
        fix += f" (sink.replicas = {s.replicas} applies only when the daemon creates it)"
    else:
        fix += ", or sink.replicas = 3 before the daemon creates it"
    return [
        f"the stream has 1 replica while {len(s.servers)} servers are configured: the "
        "loss of the server that stores it loses the events it acknowledged (checkpointed "
        f"here); give it replicas: {fix}"
    ]


def placement(err_code: int | None, description: str | None, replicas: int) -> str | None:
    """What JetStream's refusal to create a stream of ``replicas`` copies means: "impossible"
    when it is certain that the cluster has too few servers (a configuration to fix), "maybe"
    when a server that is down may be what is missing, None for another refusal.

    nats-server >= 2.9 answers 10005 and lists why it skipped servers: without any reason,
    every server it knows (those down too, once heard from) was eligible and still too few:
    no restart cures that. "peer offline" (a server down, or not heard from since a restart)
    and "miscellaneous issue" (a server not known yet) may pass. Before 2.9 the answer is
    10023 "insufficient resources" whatever the cause: it cannot tell a server down from one
    that does not exist. (A server's connect_urls cannot either: a server down leaves it.)"""
    if replicas < 2:
        return None  # one copy: any server holds it; not a question of sink.replicas
    if err_code == _ERR_INSUFFICIENT_RESOURCES:
        return "maybe"
    if err_code != _ERR_NO_PEERS:
        return None
    text = (description or "").strip().lower()
    if not text.startswith(_NO_PEERS):
        return None
    reasons = text[len(_NO_PEERS) :].strip(" ,")
    if not reasons:
        return "impossible"
    if any(reason in reasons for reason in _PEER_MAY_RETURN):
        return "maybe"
    return None  # tags, storage, JetStream off in the cluster: an operator's fix (_api)


def announced(nc: Client) -> int | None:
    """How many servers the cluster announces to clients (their connect_urls, the server's
    own among them), or None when it announces none (not clustered, or no_advertise)."""
    info = getattr(nc, "_server_info", None)  # nats-py's, no public way
    urls = info.get("connect_urls") if isinstance(info, dict) else None
    if not isinstance(urls, list) or not urls:
        return None
    return len({u for u in urls[:_MAX_ANNOUNCED] if isinstance(u, str)}) or None


class _AlreadyThere(Exception):
    """The stream was created by someone else between our look and our create."""


def _is_auth_error(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in _AUTH_MARKERS)


def _api_text(exc: nats.js.errors.APIError) -> str:
    return prefix(
        f"code {exc.code}, err_code {exc.err_code}: {exc.description or 'no description'}", 300
    )


def _most_severe(failures: list[BaseException], order: Mapping[str, int]) -> BaseException:
    """The error to raise for a batch whose keys failed in several ways: what stops the
    daemon, then what retries the batch, then the event that comes first in the batch."""
    for kind in (SinkUnusable, TransientSinkError):
        for exc in failures:
            if isinstance(exc, kind):
                return exc
    for exc in failures:
        if not isinstance(exc, Exception):  # a cancellation
            return exc
    permanent = [e for e in failures if isinstance(e, PermanentSinkError)]
    if permanent:
        return min(permanent, key=lambda e: order.get(e.unique_event_id or "", len(order)))
    return failures[0]


# Closes given up at their deadline, still winding down: held so that none is collected
# while it runs (their sockets are aborted, so they end soon).
_ABANDONED: set[asyncio.Future[None]] = set()


async def _shut(nc: Client, seconds: float) -> None:
    """Close the connection, within ``seconds``.

    No drain: an event counts as written only once the stream acknowledged it, so nothing
    still buffered has to go out (it is published again after a restart), and nats-py's
    drain() swallows a cancellation, then flushes with its own 10 s timeout, so no deadline
    holds it. A close that does not end in time (a frozen server, the socket's buffer full)
    is cancelled and its socket aborted."""
    if nc.is_closed:
        return
    closing = asyncio.ensure_future(nc.close())
    try:
        await asyncio.wait({closing}, timeout=seconds)
    finally:
        if not closing.done():
            closing.cancel()
            _abort(nc)
            _ABANDONED.add(closing)
            closing.add_done_callback(_forget)
    if closing.done():
        _forget(closing)


def _forget(closing: asyncio.Future[None]) -> None:
    """A close that ended: its error (if any) read, so that asyncio does not log it."""
    _ABANDONED.discard(closing)
    if not closing.cancelled():
        closing.exception()


def _abort(nc: Client) -> None:
    """Drop the connection's socket at once (asyncio's close waits for the buffer to drain)."""
    transport = getattr(nc, "_transport", None)  # nats-py's, no public way
    writer = getattr(transport, "_io_writer", None)
    socket = getattr(writer, "transport", None)
    if socket is not None:
        with contextlib.suppress(Exception):
            socket.abort()
