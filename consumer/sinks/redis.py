"""Redis Streams sink: each event ``XADD``-ed to a stream key at most once, by a Lua script.

Not transactional: exactly-once in effect comes from a **guard** per event. One script call per
event does, atomically (a script runs whole, nothing interleaves)::

    if EXISTS <guard>: return nil                      -- written before: nothing to do
    XADD <stream key> [MAXLEN ~ n] * <fields>           -- the entry
    SET <guard> <entry id> PX <guard_ttl_s * 1000>      -- remembered

so a replay (after a crash between the write and the checkpoint, a retried batch, a DLQ
replay) adds nothing while the guard lives (``guard_ttl_s``, 8 days: OHIP keeps 7 days of
events). Nothing can fail between the ``XADD`` and the ``SET``: the script first checks that
the user may ``SET`` the guard (``redis.acl_check_cmd``, Redis >= 7; on older servers ``open``
probes it), a script's first write is the only one Redis checks against ``maxmemory``
(``OOM``), a replica's ``READONLY`` or a failed disk (``MISCONF``), and a wrong type of the
guard key cannot stop ``SET``. So a guard never exists without its entry; an ``XADD`` that
fails leaves neither.

**Keys.** The stream key comes from ``stream_key`` with the tokens ``{chainCode}`` (of the
consumer's stream), ``{hotelId}``, ``{eventName}``, ``{moduleName}`` and ``{stream}`` (the
consumer's stream name). Braces are written ``{{`` and ``}}`` (as in Python's ``str.format``),
so ``"opera:{{{chainCode}}}"`` makes ``opera:{DEMO}``; any other ``{name}`` is refused. Each
value is sanitised: whitespace, control characters and braces become ``_``, an empty or
missing value is ``_``, and one longer than 128 characters is cut and ends with a hash of it.
The guard key of event ``U`` written to stream key ``K`` (``U`` itself when made of letters,
digits, ``.``, ``_`` and ``-`` only, as a UUID is; any other uniqueEventId as ``~`` and its
SHA-256, so that no id can make its guard another event's, or the barrier's below):

* ``K`` holds a Redis Cluster hash tag (``{...}``, non-empty): ``K:guard:U``, which has the
  same tag (its first ``{`` and the ``}`` closing it are ``K``'s);
* ``K`` holds no brace: ``K:guard:{K}:U``, whose tag is ``K`` itself, which is what a key
  without a tag hashes to;
* any other brace in ``K`` (a ``}`` outside a tag, an empty ``{}``): refused, the guard could
  not share its slot.

Either way the guard and its stream hash to the same cluster slot (a script's keys must) and
both start with ``K``: an ACL key pattern ``~opera:*`` covers the sink's every key. (The sink
speaks to one server, not to a Redis Cluster: a ``MOVED`` reply stops it.)

No stream key is ever a guard key or the barrier (below), whatever the values (which keep
their ``:``): without a hash tag, stream keys hold no brace, guards and the barrier do; with
one, a stream key that ends as a guard does (``:guard:`` and an id as above, e.g. from a
hotelId ``H1:guard:<id>``: :func:`~consumer.core.templates.ends_as_guard`) is refused, its
event dead-lettered (:class:`PermanentSinkError`), and a template whose every key would end
so is refused at load; the barrier holds two braces more than any stream key. (Before, such
an event took the place of the other's guard, which was then skipped as written, or found
its guard there: ``WRONGTYPE``.)

**Entries.** Fields: ``event`` (the JSON document, as the jsonl sink writes a line:
:meth:`~consumer.core.events.Event.document`), ``uniqueEventId``, ``offset``, ``stream``,
``chainCode``, ``hotelId``, ``eventName``, ``moduleName``, ``primaryKey`` and ``timestamp``
(empty when absent). A batch is one pipeline (one round trip per 8 MiB of events): the scripts
run in the order written, so each primaryKey's events are in the stream in arrival order. A
call can be refused while the later ones of the pipeline run (``BUSY`` while another client's
script runs, ``OOM``, ``NOSCRIPT``...): each call of an event therefore names the guard of the
event before it of the same primaryKey and stream key, and adds nothing (answer 0, "held
back") unless that guard exists. A refused event's later events of its resource are never
added ahead of it; the retry adds them after it. (A guard gone within a batch, evicted or
outlived by a tiny ``guard_ttl_s``, holds back its successor too: those calls go again.)
Scripts are loaded at ``open`` (``SCRIPT LOAD``) and called by ``EVALSHA``; after ``NOSCRIPT``
(a server restarted or flushed its scripts) the script is loaded again and the batch goes
again from the first call that was refused or held back (the guards make the calls that did
run no-ops).

**Errors.** Refused connections, timeouts, ``LOADING``, ``BUSY``, ``READONLY`` (a failover),
``MASTERDOWN``, ``MISCONF``, ``OOM`` (``maxmemory``: it may clear) and any other server error
are :class:`TransientSinkError`: the batch is retried with backoff, intake pauses, nothing is
dead-lettered. After ``READONLY`` or ``MASTERDOWN`` (a replica answered: a failover demoted the
server) the pooled connections are dropped, so the retry connects anew and reaches the new
primary wherever the URL's host now leads. :class:`SinkUnusable` (exit 78: only an operator can
fix it, and writing on would dead-letter events for a fault of the configuration) when the
server refuses our credentials (``WRONGPASS``, ``NOAUTH``), its ACL refuses a command or a key
(``NOPERM``), the stream key holds another type (``WRONGTYPE``), the server is a Redis Cluster
node (``MOVED``/``ASK``), does not know a command (no ``XADD`` before Redis 5), has no
database of the URL's number (``DB index is out of range``) or answers what Redis running our
scripts cannot (a reply redis-py's parser refuses, ``:abc``; one over :data:`REPLY_LIMIT`,
refused at its announced length before it is read; "held back" for the first call of a
round, which names no guard before it; a probe's reply of another shape). A write that
fails so has written nothing of that event nor of the later events of its primaryKey (held
back), and the events of other resources that were written are guarded: after the fix and a
restart, the replay adds exactly what is missing, in order.
:class:`PermanentSinkError` naming the event (it is dead-lettered) when it cannot be sent:
larger than the server's ``proto-max-bulk-len`` (read at ``open`` when ``CONFIG GET`` is
allowed, and then checked before sending), not serializable as JSON, or with a stream key
that ends as a guard's (**Keys**). Nothing is sent for a
batch before every event of it passed those checks. Without the ``CONFIG`` right (as it should
be; managed servers), an event with an argument over 1 MiB (Redis's smallest limit) is sent in
a round trip of its own: a server that answers "invalid bulk length" for it, or drops the
connection at it (twice: redis-py sends it again once) while it answers a PING, refuses its
size, and the event is dead-lettered; the others are written.

**Durability.** ``open`` reads the server's ``maxmemory-policy`` (``CONFIG GET``, else ``INFO
memory``) and refuses (:class:`SinkUnusable`) an ``allkeys-*`` policy with a ``maxmemory``: it
may evict a stream, and with it events already checkpointed. ``volatile-*`` evicts only keys
with a TTL: the guards (a replay could then add an event again), never the streams (the sink
sets no TTL on them): a warning, as are a policy that could not be read, a server that
persists nothing (no AOF, no ``save`` rule: its restart loses what we checkpointed) or only
by snapshots (no AOF: its crash loses what was written since the last one) and
``maxlen`` (it trims the oldest entries, read or not). Preflight says the same.

**Replication.** Redis replicates asynchronously: a batch the primary acknowledged, then lost
in a failover before a replica had it, would be checkpointed and gone. With ``wait_replicas``
(0, the default: no wait) each pipeline ends with ``WAIT wait_replicas wait_timeout_ms`` on its
connection, after a ``SET`` of a barrier key (``<guard of {wait}>``, a minute: from Redis 7.2
WAIT waits only for the connection's own last write, and a retried batch of guarded events
writes nothing). Fewer replicas acknowledging in time is a :class:`TransientSinkError`: the
batch is not checkpointed and goes again, its guards making the events already added no-ops, so
each is in the stream once when the replicas are back. The ACL must allow ``WAIT`` (checked at
``open``: :class:`SinkUnusable`); fewer replicas connected than ``wait_replicas`` at ``open``
(``INFO``, when allowed) is a warning: a replica down and one never configured look the same.

The URL and the password are secrets: messages name ``host:port/db`` only, and every text of
the server's or the client's is scrubbed of them and cut short.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
import ssl
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, TypeVar
from urllib.parse import quote, quote_plus, unquote, urlsplit

import structlog
from redis._parsers import _AsyncRESP2Parser
from redis.asyncio import Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ClusterCrossSlotError,
    ClusterDownError,
    MasterDownError,
    MovedError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from ..config import RedisSinkSettings
from ..core.events import Event
from ..core.evidence import masked, prefix
from ..core.templates import (
    EVENT_TOKENS,
    GUARD_ID,
    TOKEN_MAX_CHARS,  # noqa: F401  # re-exported: the sink's token limit
    TOKENS,
    Template,
    TemplateError,
    check_key,
    ends_as_guard,
    hash_tag,
    key_token,
)
from ..errors import ConfigError, PermanentSinkError, SinkError, SinkUnusable, TransientSinkError
from ..logs import RateLimitedLogger
from .base import PlainSink, serialized

log = structlog.get_logger(__name__)
_limited = RateLimitedLogger(log, per_s=1.0, burst=5)  # an unknown error, at every retry
T = TypeVar("T")

DEFAULT_PORT: Final = 6379
_DATABASE: Final = re.compile(r"(/[0-9]+)?/?", re.ASCII)  # a URL's path: the database
# Redis's default proto-max-bulk-len: the largest argument it accepts.
DEFAULT_MAX_BULK: Final = 512 * 1024 * 1024
# The smallest proto-max-bulk-len Redis accepts: no argument up to this size is ever refused.
MIN_MAX_BULK: Final = 1024 * 1024
CHUNK_BYTES: Final = 8 * 1024 * 1024  # at most this much per round trip (the first event aside)
CHUNK_CALLS: Final = 1000
NOSCRIPT_ATTEMPTS: Final = 3
TEXT_LIMIT: Final = 300  # of a server's or client's error text in our messages
# The most one reply may hold, its bytes and VALUE_COST for each value parsed out of it (what
# the objects made of it cost). Every reply the sink reads is an entry id, nil, a count, a
# short text, a few values (the probe, CONFIG GET, HELLO) or INFO's few KB: a larger one is no
# Redis answer to our commands, and redis-py would read it whole, as long as announced.
REPLY_LIMIT: Final = 64 * 1024
VALUE_COST: Final = 64
MIN_SECRET_CHARS: Final = 3
GRANT: Final = "+ping +script|load +evalsha +exists +type +xadd +set"
WAIT_GRANT: Final = " +wait"  # with sink.wait_replicas
# With sink.wait_replicas, each pipeline ends with SET <barrier> and WAIT: the SET makes the
# connection's replication offset the server's latest (from Redis 7.2, WAIT waits only for
# the connection's last write, and a retried batch whose events are all guarded writes
# nothing: its WAIT would not wait for the first try's entries). The barrier is a guard key
# that no event's can be (an event's ends in no brace: see guard_key), nor a stream key (it
# holds two braces more), living a minute.
BARRIER_ID: Final = "{wait}"
BARRIER_TTL_MS: Final = "60000"

# KEYS[1] the stream, KEYS[2] the event's guard, KEYS[3] (optional) the guard of the event
# before it of the same primaryKey and stream key, in the same pipeline. ARGV[1] the guard's
# lifetime (ms), ARGV[2] MAXLEN ~ (empty: no trimming), ARGV[3..] the entry's field/value
# pairs. Returns the entry's id, nil when the guard exists (a replay), or 0 when the event
# before it is not written (held back: never added ahead of it). See the module doc for why
# the SET cannot fail once the XADD is done.
ADD_SCRIPT: Final = """\
-- opera-consumer redis sink: add an event to a stream at most once, after the one before it
if redis.call('EXISTS', KEYS[2]) == 1 then
  return false
end
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 0 then
  return 0
end
if redis.acl_check_cmd and not redis.acl_check_cmd('SET', KEYS[2], '0-0', 'PX', ARGV[1]) then
  return redis.error_reply('NOPERM this user has no permission to SET the guard key')
end
local id
if ARGV[2] == '' then
  id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
end
redis.call('SET', KEYS[2], id, 'PX', ARGV[1])
return id
"""

# Writes nothing: asks what the add script would need. XADD with MAXLEN -1 and SET with PX 0
# are refused by their argument checks, which run only after the ACL (NOPERM) and the
# OOM/READONLY checks: the error says which of them stands in the way.
PROBE_SCRIPT: Final = """\
-- opera-consumer redis sink: may this user write here? (writes nothing)
local function said(r)
  if type(r) == 'table' and r['err'] then return r['err'] end
  return 'accepted'
end
local kind = redis.call('TYPE', KEYS[1])['ok']
local length = -1
if kind == 'stream' then
  local n = redis.pcall('XLEN', KEYS[1])
  if type(n) == 'number' then length = n end
end
return {kind, length,
  said(redis.pcall('XADD', KEYS[1], 'MAXLEN', '-1', '*', 'f', 'v')),
  said(redis.pcall('SET', KEYS[2], 'x', 'PX', '0')),
  said(redis.pcall('EXISTS', KEYS[2]))}
"""

# Error texts (upper-cased) by what they mean. redis-py takes the code off the errors it has
# a class for (NoPermissionError...), so the classes are checked too; a script's error keeps
# its code in the text (Redis 7) or quotes it (Redis 6: "ERR Error running script...").
NOPERM_MARKS: Final = ("NOPERM", "NO PERMISSION", "CAN'T RUN THIS COMMAND")
CLUSTER_MARKS: Final = ("CROSSSLOT", "NON LOCAL KEY")
DB_INDEX_MARKS: Final = ("DB INDEX IS OUT OF RANGE", "INVALID DB INDEX")
# Conditions that clear by themselves (or by a failover) while we retry.
TRANSIENT_MARKS: Final = (
    "OOM",
    "BUSY",
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "MISCONF",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
)
TRANSIENT_REPLIES: Final = (
    OutOfMemoryError,
    ReadOnlyError,
    BusyLoadingError,
    MasterDownError,
    TryAgainError,
    ClusterDownError,
)
# What a replica answers a write (READONLY), or a read while it has lost its primary
# (MASTERDOWN): after a failover our pooled connections may lead to the demoted server.
REPLICA_MARKS: Final = ("READONLY", "MASTERDOWN")
NOEVICTION: Final = "noeviction"
NOEVICTION_FIX: Final = (
    "set `maxmemory-policy noeviction` (CONFIG SET maxmemory-policy noeviction and in "
    "redis.conf, or the managed service's parameter group)"
)


@dataclass(frozen=True, slots=True)
class Durability:
    """What the server says of keeping what it acknowledged; None: it would not say."""

    policy: str | None = None  # maxmemory-policy
    maxmemory: int | None = None  # bytes; 0: no limit
    aof: bool | None = None  # appendonly yes
    rdb: bool | None = None  # a `save` rule


def eviction_risk(d: Durability) -> tuple[bool, str] | None:
    """(refuse, why and the fix) when the server may evict what the sink wrote; None when
    it cannot. allkeys-* evicts any key, the streams too: an event already checkpointed is
    gone, silently, so that is refused (a warning in a log is missed; the fix is one
    setting). volatile-* evicts only keys with a TTL: the streams have none (the sink never
    sets one), the guards do: an evicted guard lets a replay of its event add it again (a
    duplicate, nothing lost), so that is a warning."""
    policy = d.policy
    if policy is None:
        return False, (
            "maxmemory-policy unknown (this user may run neither CONFIG GET nor INFO): make "
            "sure it is noeviction: another policy may evict the streams (allkeys-*) or the "
            "guards (volatile-*)"
        )
    if policy == NOEVICTION:
        return None
    if policy.startswith("allkeys"):
        if d.maxmemory == 0:  # Redis evicts only above a maxmemory
            return False, (
                f"maxmemory-policy {policy} would evict the streams themselves once a "
                f"maxmemory is set (none is now): {NOEVICTION_FIX}"
            )
        return True, (
            f"maxmemory-policy {policy} may evict the streams themselves, and with them "
            f"events already checkpointed: {NOEVICTION_FIX}, then restart"
        )
    if policy.startswith("volatile"):
        if d.maxmemory == 0:
            return None
        return False, (
            f"maxmemory-policy {policy}: guards may be evicted under memory pressure (they "
            "have a TTL; the streams have none), and a replay of such an event adds it again: "
            f"for exactly-once, {NOEVICTION_FIX}"
        )
    return False, f"maxmemory-policy {prefix(policy, 40)} is not known here: {NOEVICTION_FIX}"


def persistence_risk(d: Durability) -> str | None:
    """Why a restart of the server may lose what it acknowledged (and we checkpointed), or
    None when it keeps it or we cannot tell. Snapshots alone (a ``save`` rule, redis.conf's
    default) keep what a clean shutdown saves, not what a crash (kill -9, the OOM killer, the
    host) finds written since the last one; an append-only file keeps it, whatever its fsync
    policy, unless the host itself goes down."""
    if d.aof is False and d.rdb is False:
        return (
            "the server persists nothing (appendonly no, no save rule): a restart of it loses "
            "every event written (and checkpointed here); set `appendonly yes`, or accept that"
        )
    if d.aof is False:
        rules = "" if d.rdb else " (its save rules unknown)"
        return (
            f"the server persists by snapshots only{rules}, appendonly no: a crash of it "
            "(kill -9, the OOM killer, the host) loses every event written since its last "
            "snapshot (and checkpointed here); set `appendonly yes`, or accept that"
        )
    return None


def maxlen_risk(maxlen: int | None) -> str | None:
    """Why sink.maxlen may lose events: MAXLEN trims the oldest entries as new ones come,
    whether the stream's consumers have read them or not (as NATS's max_msgs with discard
    old), and those events are checkpointed here: nothing replays them."""
    if maxlen is None:
        return None
    return (
        f"sink.maxlen = {maxlen} trims each stream to about that many entries (XADD MAXLEN ~): "
        "the oldest are removed as new ones come, read or not, and an event checkpointed here "
        "that its readers had not read yet is gone; remove sink.maxlen and trim once they "
        "have read (XTRIM MINID), unless losing them is intended"
    )


# Few distinct values (hotels, event names), many events.
token_value: Final = functools.lru_cache(maxsize=4096)(key_token)


def guard_key(stream_key: str, unique_event_id: str) -> str:
    """The guard of an event in ``stream_key``: same cluster slot, same prefix (module doc).
    Its last part is the uniqueEventId when made of letters, digits, ``.``, ``_`` and ``-``
    only, else ``~`` and its SHA-256: so it holds no ``:`` (two events' guards never meet:
    ``x:guard:y`` in hotel ``H`` and ``y`` in hotel ``H:guard:x``) and no brace (never the
    barrier's :data:`BARRIER_ID`). With a hash tag, it ends as
    :func:`~consumer.core.templates.ends_as_guard` says, as no stream key may."""
    last = unique_event_id
    if not GUARD_ID.fullmatch(last):
        last = "~" + hashlib.sha256(last.encode("utf-8", "surrogatepass")).hexdigest()
    return _guard(stream_key, last)


def barrier_key(stream_key: str) -> str:
    """The barrier a batch to ``stream_key`` sets before its WAIT: a guard key no event's is."""
    return _guard(stream_key, BARRIER_ID)


def _guard(stream_key: str, last: str) -> str:
    if hash_tag(stream_key) is not None:
        return f"{stream_key}:guard:{last}"
    return f"{stream_key}:guard:{{{stream_key}}}:{last}"


class KeyTemplate(Template):
    """``stream_key`` parsed once: literal text and tokens (``{{``/``}}`` are braces)."""

    __slots__ = ()

    def __init__(self, template: str) -> None:
        try:
            super().__init__(template)
            check_key(self)
        except TemplateError as exc:
            raise ConfigError(exc.at("sink.stream_key", template)) from None

    @property
    def per_event(self) -> bool:
        """Whether the key depends on the event (not only on the consumer's stream)."""
        return bool(self.tokens & EVENT_TOKENS)


@dataclass(frozen=True, slots=True)
class Server:
    """Where the sink connects, and what may be said about it (never the URL itself)."""

    kwargs: dict[str, Any] = field(repr=False)  # for redis.asyncio.Redis: the password too
    where: str  # host:port/db (and "(TLS)"), for messages
    secrets: tuple[str, ...] = field(repr=False)  # longest first


def server(settings: RedisSinkSettings) -> Server:
    """The connection arguments from ``url`` and the fields (which win over the URL's user
    information); ConfigError for a URL we cannot use, saying nothing of its secrets."""
    url = settings.url.get_secret_value()
    secrets: set[str] = {url}
    password = settings.password.get_secret_value() if settings.password is not None else None
    raw_password = url.partition("://")[2].rpartition("@")[0].partition(":")[2]
    for pw in (raw_password, unquote(raw_password), password or ""):
        if pw:
            secrets |= {pw, quote(pw, safe=""), quote_plus(pw, safe="")}
    try:
        parsed: dict[str, Any] = dict(parse_url(url))
    except ValueError:
        raise ConfigError(
            "sink.url: not a Redis URL we can use: redis://[user:password@]host[:port][/db] "
            "(rediss:// for TLS)"
        ) from None
    unknown = sorted(set(parsed) - {"host", "port", "db", "username", "password", "path",
                                    "connection_class"})  # fmt: skip
    if unknown:
        raise ConfigError(
            f"sink.url: query option(s) {', '.join(unknown)} not supported: use the [sink] "
            "fields (username, password, tls_ca_file, timeout_s)"
        )
    scheme = url.partition("://")[0].lower()
    tls = scheme == "rediss"
    if scheme != "unix" and not _DATABASE.fullmatch(urlsplit(url).path):
        # redis-py reads redis://host/abc as database 0 and redis://host/1/2 as 12.
        raise ConfigError(
            "sink.url: the database (the path after host:port) must be a number: "
            "redis://host:port/0 (or no path, for database 0)"
        )
    if settings.tls_ca_file is not None and not tls:
        raise ConfigError(
            "sink.tls_ca_file is set but sink.url is not rediss:// (TLS) -> use rediss:// in "
            "sink.url, or remove sink.tls_ca_file"
        )
    db = int(parsed.get("db") or 0)
    kwargs: dict[str, Any] = {
        "db": db,
        "username": settings.username or parsed.get("username"),
        "password": password or parsed.get("password"),
        "socket_timeout": settings.timeout_s,
        "socket_connect_timeout": settings.timeout_s,
        # One immediate retry of a dead pooled connection; the pipeline's backoff does the rest.
        "retry": Retry(NoBackoff(), 1),
        # RESP2, which every Redis speaks: redis-py's default, RESP3, opens each connection
        # with HELLO, which Redis 5 does not know.
        "protocol": 2,
    }
    if scheme == "unix":
        path = str(parsed.get("path") or "")
        kwargs["unix_socket_path"] = path
        where = f"unix:{path}/{db}"
    else:
        host = str(parsed.get("host") or "localhost")
        port = int(parsed.get("port") or DEFAULT_PORT)
        kwargs |= {"host": host, "port": port}
        if tls:
            kwargs |= {"ssl": True, "ssl_cert_reqs": "required", "ssl_check_hostname": True}
            if settings.tls_ca_file is not None:
                kwargs["ssl_ca_certs"] = str(settings.tls_ca_file)
        shown_host = f"[{host}]" if ":" in host else host
        # Not the URL's form: the log redactor masks the configured URL wherever it appears.
        where = f"{shown_host}:{port}/{db}{' (TLS)' if tls else ''}"
    ordered = sorted((s for s in secrets if len(s) >= MIN_SECRET_CHARS), key=len, reverse=True)
    return Server(kwargs, where, tuple(ordered))


class ReplyTooLarge(Exception):
    """A reply over :data:`REPLY_LIMIT` (raised by :class:`_BoundedParser`)."""


class _BoundedParser(_AsyncRESP2Parser):
    """redis-py's RESP2 parser (the sink's protocol, which every Redis speaks), with a
    budget for each reply (:data:`REPLY_LIMIT`): a bulk string is refused at its announced
    length, before it is read; an array once its values have spent the budget. (redis-py
    reads what the server announces, a bulk string of 1 GiB or an array of 10^8 values, whole
    into memory; only ``socket_timeout`` ended it, and then it sent the command again.) The
    connection is dropped by redis-py."""

    def __init__(self, socket_read_size: int) -> None:
        super().__init__(socket_read_size)
        self._budget = REPLY_LIMIT

    async def read_response(self, disable_decoding: bool = False) -> Any:
        self._budget = REPLY_LIMIT
        return await super().read_response(disable_decoding=disable_decoding)

    def _spend(self, size: int) -> None:
        self._budget -= size
        if self._budget < 0:
            raise ReplyTooLarge(f"a reply of more than {REPLY_LIMIT} bytes")

    async def _read(self, length: int) -> bytes:
        self._spend(max(0, length) + 2)  # before it is read
        data: bytes = await super()._read(length)
        return data

    async def _readline(self) -> bytes:
        line: bytes = await super()._readline()  # a line: at most the stream's 64 KiB
        self._spend(len(line) + 2 + VALUE_COST)
        return line


def connect(kwargs: Mapping[str, Any]) -> Redis:
    """A client of ``kwargs`` (:attr:`Server.kwargs`) whose connections read replies within
    :data:`REPLY_LIMIT` (:class:`_BoundedParser`). It connects at its first command."""
    client = Redis(**kwargs)
    client.connection_pool.connection_kwargs["parser_class"] = _BoundedParser
    return client


class _Call(NamedTuple):
    event: Event
    key: str  # the stream key
    args: tuple[bytes, ...]  # KEYS and ARGV of the add script
    size: int  # bytes of its arguments
    largest: int  # bytes of its largest argument


class _Probe(NamedTuple):
    kind: str  # TYPE of the stream key
    length: int  # its XLEN, -1 if not a stream (or not allowed)
    xadd: str  # the refusal of the no-op XADD: NOPERM, OOM, READONLY... or an argument error
    set: str
    exists: str


class RedisSink(PlainSink):
    name = "redis"

    def __init__(self, settings: RedisSinkSettings, chains: Mapping[str, str]) -> None:
        """``chains``: the consumer's stream name -> its chain code (the ``{chainCode}``)."""
        self.settings = settings
        self.chains = dict(chains)
        self.template = KeyTemplate(settings.stream_key)
        # Its keys hold a hash tag (or none, all of them: values hold no brace).
        self._tagged = hash_tag(self.template.sample()) is not None
        self.server = server(settings)
        self.where = self.server.where
        self._ttl_ms = str(max(1, round(settings.guard_ttl_s * 1000)))
        self._maxlen = "" if settings.maxlen is None else str(settings.maxlen)
        self._client: Redis | None = None
        self._sha = ""
        self._max_bulk = DEFAULT_MAX_BULK
        self._max_bulk_known = False  # read from the server (CONFIG GET), not assumed
        self._added = 0
        self._duplicates = 0
        self._wait_refused = 0  # batches WAIT found on too few replicas (retried)
        self._grant = GRANT + (WAIT_GRANT if settings.wait_replicas else "")

    def __repr__(self) -> str:
        return f"RedisSink(server={self.where!r}, stream_key={self.template.text!r})"

    # --- open, close, counters ----------------------------------------------------------------

    async def open(self, committed: str | None) -> None:
        client = connect(self.server.kwargs)
        try:
            await self._call("PING", client.ping())
            self._sha = await self._load(client)
            limit = await self._bulk_limit(client)
            self._max_bulk, self._max_bulk_known = limit or DEFAULT_MAX_BULK, limit is not None
            self._durable(await self._durability(client))
            short = await self._replicas(client)
            if short is not None:
                log.warning("redis sink: check the server", server=self.where, warning=short)
            if not self.template.per_event:  # the keys are known now: check them
                for key in self._static_keys():
                    self._judge(key, await self._probe(client, key), opening=True)
        except BaseException:
            await _close(client, self.settings.timeout_s)
            raise
        self._client = client
        log.info(
            "redis sink open",
            server=self.where,
            stream_key=self.template.text,
            maxlen=self.settings.maxlen,
            guard_ttl_s=self.settings.guard_ttl_s,
            wait_replicas=self.settings.wait_replicas,
            writes="one script per event: XADD and its guard together (a replay adds nothing)",
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await _close(client, self.settings.timeout_s)

    def counters(self) -> dict[str, float]:
        return {
            "redis_added": self._added,
            "redis_duplicates": self._duplicates,
            "redis_wait_refused": self._wait_refused,
        }

    # --- write --------------------------------------------------------------------------------

    async def write(self, stream: str, events: Sequence[Event]) -> None:
        client = self._client
        if client is None:
            raise TransientSinkError(f"redis sink at {self.where} is not open")
        if not events:
            return
        # Every call is made (and checked) before the first is sent: an event that cannot be
        # sent is named at once, and none of the batch is written twice around it.
        calls = [self._make_call(stream, ev) for ev in events]
        start = 0
        while start < len(calls):
            end, size = start + 1, calls[start].size
            while end < len(calls) and end - start < CHUNK_CALLS and not self._alone(calls[start]):
                if size + calls[end].size > CHUNK_BYTES or self._alone(calls[end]):
                    break
                size += calls[end].size
                end += 1
            await self._run(client, calls[start:end])
            start = end

    def _make_call(self, stream: str, ev: Event) -> _Call:
        document = serialized(ev, "redis")
        chain = self.chains.get(stream)
        key = self.template.render(
            {
                "chainCode": token_value(chain),
                "hotelId": token_value(ev.hotel_id),
                "eventName": token_value(ev.event_name),
                "moduleName": token_value(ev.module_name),
                "stream": token_value(stream),
            }
        )
        if self._tagged and ends_as_guard(key):
            raise PermanentSinkError(
                f"redis sink: the event's stream key ends as a guard key does (':guard:' and an "
                f"id, from its values: {prefix(key, 200)!r}): refused, it could be another "
                "event's guard (and its own guard another stream key)",
                unique_event_id=ev.unique_event_id,
            )
        fields = (
            "event", document,
            "uniqueEventId", ev.unique_event_id,
            "offset", ev.offset,
            "stream", stream,
            "chainCode", chain or "",
            "hotelId", ev.hotel_id or "",
            "eventName", ev.event_name,
            "moduleName", ev.module_name,
            "primaryKey", ev.primary_key,
            "timestamp", ev.timestamp or "",
        )  # fmt: skip
        head = (key, guard_key(key, ev.unique_event_id), self._ttl_ms, self._maxlen)
        # Bytes, made here: redis-py would raise on a lone surrogate (none survives orjson in
        # the document, whose fields these are; "replace" is for the impossible case).
        args = tuple(a if isinstance(a, bytes) else a.encode("utf-8", "replace")
                     for a in (*head, *fields))  # fmt: skip
        largest = max(len(a) for a in args)
        if largest > self._max_bulk:
            raise PermanentSinkError(
                f"redis sink: event of {len(document)} bytes (an argument of {largest}) is "
                f"larger than {self.where} accepts (proto-max-bulk-len {self._max_bulk})",
                unique_event_id=ev.unique_event_id,
            )
        return _Call(ev, key, args, sum(len(a) for a in args), largest)

    def _alone(self, call: _Call) -> bool:
        """Whether the call goes in a round trip of its own: an argument the server may find
        too long (its limit unknown: no CONFIG right) makes it drop the connection, which
        then tells which event it was (:meth:`_too_long`)."""
        return not self._max_bulk_known and call.largest > MIN_MAX_BULK

    async def _run(self, client: Redis, calls: Sequence[_Call]) -> None:
        """One pipeline of add-script calls, in order, each held back unless the one before it
        of its resource is written (module doc). After NOSCRIPT the script is loaded again, and
        the calls go again from the first one refused or held back (those that ran are no-ops;
        the first call sent is never held back, so every round makes progress)."""
        counted: set[int] = set()  # calls whose outcome (added, duplicate) is counted
        first = 0
        reloads = 0
        rounds = 0
        while True:
            # Each round starts further on, or loads the script again (at most
            # NOSCRIPT_ATTEMPTS times): bounded; the bound says so, should that ever break.
            rounds += 1
            if rounds > len(calls) + NOSCRIPT_ATTEMPTS:
                raise self._unexpected("EVALSHA (XADD)", "no progress over the rounds")
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for command in self._commands(calls[first:]):
                        pipe.execute_command(*command)
                    if self.settings.wait_replicas:  # on the same connection as the calls
                        barrier = barrier_key(calls[first].key)
                        pipe.execute_command("SET", barrier, "1", "PX", BARRIER_TTL_MS)
                        pipe.execute_command(
                            "WAIT", self.settings.wait_replicas, self.settings.wait_timeout_ms
                        )
                    results = await pipe.execute(raise_on_error=False)
            except (TimeoutError, RedisError, OSError) as exc:
                failure = self._failure(exc, "EVALSHA (XADD)", calls[first].key)
                if isinstance(failure, TransientSinkError) and first == len(calls) - 1:
                    too_long = await self._too_long(client, calls[first], exc)
                    if too_long is not None:
                        raise too_long from None
                raise failure from None
            except Exception as exc:  # redis-py's parser on a reply that is no RESP (`:abc`)
                raise self._failure(exc, "EVALSHA (XADD)") from None
            refused: int | None = None
            held: int | None = None
            errors: list[tuple[_Call, ResponseError]] = []
            acknowledged: object = None  # WAIT's answer
            if self.settings.wait_replicas:
                *results, barrier_set, acknowledged = results
                if isinstance(barrier_set, ResponseError):
                    errors.append((calls[first], barrier_set))
            for i, result in enumerate(results, first):
                if isinstance(result, NoScriptError):
                    refused = i if refused is None else refused
                elif isinstance(result, ResponseError):
                    errors.append((calls[i], result))
                elif isinstance(result, int):  # held back: the one before it is not written
                    held = i if held is None else held
                elif i not in counted:
                    counted.add(i)
                    if result is None:
                        self._duplicates += 1
                    else:
                        self._added += 1
            for call, error in errors:
                if _bulk_refused(error):
                    raise self._refused_size(call, f"it answered {self._text(error)}")
            if errors:
                if any(_from_replica(e) for _, e in errors):
                    await self._reconnect(client)
                raise self._worst(errors)  # what was held back is added after them, on retry
            if held == first:  # the first call sent names no guard before it: never held
                raise self._unexpected(
                    "EVALSHA (XADD)", "an integer (held back) for the first call"
                )
            if refused is None and held is None:
                if self.settings.wait_replicas:
                    self._replicated(acknowledged, len(calls))
                return
            if refused is not None:
                reloads += 1
                if reloads >= NOSCRIPT_ATTEMPTS:
                    raise TransientSinkError(
                        f"redis sink at {self.where}: the server keeps forgetting the script "
                        "(NOSCRIPT)"
                    )
                log.info(
                    "redis sink: the server lost its scripts; loading again", server=self.where
                )
                self._sha = await self._load(client)
            else:  # held back after one that was written: its guard is gone already
                _limited.warning(
                    "redis sink: a guard vanished within a batch (evicted, or guard_ttl_s too "
                    "short?); sending the rest again",
                    server=self.where,
                )
            first = min(i for i in (refused, held) if i is not None)

    def _replicated(self, acknowledged: object, count: int) -> None:
        """Raise unless WAIT says that sink.wait_replicas replicas have the pipeline's writes
        (and all before them): TransientSinkError, so the batch is not checkpointed and goes
        again (its guards make the events already added no-ops)."""
        s = self.settings
        if isinstance(acknowledged, ResponseError):
            raise self._refusal(acknowledged, "WAIT")
        if isinstance(acknowledged, int) and acknowledged >= s.wait_replicas:
            return
        shown = acknowledged if isinstance(acknowledged, int) else "?"
        self._wait_refused += 1
        _limited.warning(
            "redis sink: too few replicas acknowledged the batch; not checkpointed, retrying",
            server=self.where,
            acknowledged=shown,
            wait_replicas=s.wait_replicas,
        )
        raise TransientSinkError(
            f"redis sink at {self.where}: {shown} replica(s) acknowledged {count} event(s) "
            f"within sink.wait_timeout_ms ({s.wait_timeout_ms} ms), sink.wait_replicas = "
            f"{s.wait_replicas}: not counted as written (a failover could lose them); retried"
        )

    async def _replicas(self, client: Redis) -> str | None:
        """With sink.wait_replicas: SinkUnusable when the ACL refuses WAIT; a warning when the
        server has fewer replicas connected than sink.wait_replicas (INFO, when allowed: down
        for now, or fewer than configured; every batch is retried until enough are back)."""
        n = self.settings.wait_replicas
        if not n:
            return None
        try:
            await client.wait(0, 1)  # answers at once: 0 replicas wanted
        except ResponseError as exc:
            if any(m in self._text(exc).upper() for m in NOPERM_MARKS) or isinstance(
                exc, NoPermissionError
            ):
                raise self._refusal(exc, "WAIT") from None
            # A replica refuses WAIT: it refuses the writes too (READONLY), retried.
        except Exception as exc:
            raise self._failure(exc, "WAIT") from None
        try:
            info = await client.info("replication")
        except ResponseError:
            return None  # no INFO right: not known
        except Exception as exc:
            raise self._failure(exc, "INFO") from None
        connected = _int(info.get("connected_slaves"))
        if connected is None or connected >= n or info.get("role") != "master":
            return None
        return (
            f"{connected} replica(s) connected, fewer than sink.wait_replicas = {n}: no batch "
            "counts as written (each waits sink.wait_timeout_ms, then is retried) until enough "
            "replicas are back; lower sink.wait_replicas if the server has fewer"
        )

    async def _reconnect(self, client: Redis) -> None:
        """After a replica's answer (READONLY, MASTERDOWN: a failover demoted the server our
        pooled connections lead to), drop them: the retry connects anew, and finds the new
        primary where the URL's name or address now leads (DNS, a proxy, a virtual IP)."""
        _limited.warning(
            "redis sink: the server answers as a replica (a failover?); reconnecting, retrying",
            server=self.where,
        )
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                await client.connection_pool.disconnect()
        except Exception as exc:
            log.warning("redis sink: dropping the connections failed", error=type(exc).__name__)

    def _commands(self, calls: Sequence[_Call]) -> list[tuple[bytes | str | int, ...]]:
        """The EVALSHA of each call; from the second call of a (stream key, primaryKey) on,
        with the guard of the one before it as KEYS[3]."""
        before: dict[tuple[str, str], bytes] = {}
        commands: list[tuple[bytes | str | int, ...]] = []
        for call in calls:
            stream_key, guard, *argv = call.args
            chain = (call.key, call.event.primary_key)
            previous = before.get(chain)
            before[chain] = guard
            keys = (stream_key, guard) if previous is None else (stream_key, guard, previous)
            commands.append(("EVALSHA", self._sha, len(keys), *keys, *argv))
        return commands

    def _worst(self, errors: Sequence[tuple[_Call, ResponseError]]) -> SinkError:
        """The error a failed pipeline raises: one that needs an operator wins."""
        judged = [self._refusal(exc, "EVALSHA (XADD)", call.key) for call, exc in errors]
        for e in judged:
            if isinstance(e, SinkUnusable):
                return e
        return judged[0]

    async def _too_long(
        self, client: Redis, call: _Call, exc: BaseException
    ) -> PermanentSinkError | None:
        """The event's fault when the server dropped the connection at a call of its own with
        an argument over Redis's smallest limit, and answers a PING right after: an argument
        over its proto-max-bulk-len (or a query over client-query-buffer-limit) makes it close
        the connection, its "invalid bulk length" mostly lost to the reset. (redis-py sent the
        call twice: a drop by chance would have to strike both times.) Not when the event's
        guard is there: it was written (the drop came after), and the retry finds it a
        duplicate. None otherwise."""
        if not self._alone(call) or not isinstance(exc, RedisConnectionError | OSError):
            return None
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                await client.ping()
        except Exception:
            return None  # the server is gone, not only this call's connection: retried
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                if await client.exists(call.args[1]):
                    return None  # written before the drop: not refused
        except ResponseError:
            pass  # not allowed to ask (ACL): judged by the drops alone
        except Exception:
            return None  # the server went meanwhile: retried
        return self._refused_size(call, f"it dropped the connection ({self._text(exc)}) twice")

    def _refused_size(self, call: _Call, how: str) -> PermanentSinkError:
        return PermanentSinkError(
            f"redis sink: {self.where} refuses the event (an argument of {call.largest} "
            f"bytes): {how}, and answers otherwise; its proto-max-bulk-len (or "
            "client-query-buffer-limit) is smaller: raise it, then replay the dead letter",
            unique_event_id=call.event.unique_event_id,
        )

    # --- errors -------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        """No secret, and short (a secret is masked before the cut, as far past it as masking
        needs: a server may repeat one, so none survives it)."""
        return masked(text, TEXT_LIMIT, self._mask)

    def _mask(self, text: str) -> str:
        for secret in self.server.secrets:
            text = text.replace(secret, "***")
        return text

    def _text(self, exc: BaseException) -> str:
        # Not evidence.describe: that cuts first, and a secret cut in two would escape _scrub.
        try:
            text = str(exc)
        except Exception:  # a __str__ that fails on what it holds
            text = ""
        return self._scrub(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)

    def _refusal(self, exc: ResponseError, doing: str, key: str = "") -> SinkError:
        """What a server's error reply means (``doing``: the command; ``key``: the stream key
        it was for, if any)."""
        text = self._text(exc)
        upper = text.upper()
        shown_key = prefix(key, 200)
        if isinstance(exc, NoPermissionError) or any(m in upper for m in NOPERM_MARKS):
            on = f" for {shown_key!r} or its guard" if key else ""
            return SinkUnusable(
                f"redis sink at {self.where}: the server's ACL refuses {doing}{on} ({text}): "
                f"grant the user `{self._grant}` on the keys "
                f"(e.g. ~{_key_prefix(self.template.text)}*), then restart"
            )
        if "WRONGTYPE" in upper:
            return SinkUnusable(
                f"redis sink at {self.where}: key {shown_key!r} holds another type than a "
                f"stream (WRONGTYPE): rename or delete it, or change sink.stream_key, then "
                f"restart (the event was not written; it is replayed)"
            )
        if isinstance(exc, MovedError | AskError | ClusterCrossSlotError) or any(
            m in upper for m in CLUSTER_MARKS
        ):
            return SinkUnusable(
                f"redis sink at {self.where}: the server is a Redis Cluster node ({text}); "
                "this sink speaks to one server: point sink.url at a standalone Redis or a "
                "primary"
            )
        if any(m in upper for m in DB_INDEX_MARKS):
            return SinkUnusable(
                f"redis sink at {self.where}: the server has no database "
                f"{self.server.kwargs.get('db', 0)} ({text}): set sink.url's database "
                "(redis://host:port/N) to one the server has (below its `databases` setting, "
                "16 by default), then restart"
            )
        if "UNKNOWN COMMAND" in upper:
            return SinkUnusable(
                f"redis sink at {self.where}: the server does not know a command we need "
                f"({text}): Redis >= 5 with scripting (EVALSHA, XADD) is required"
            )
        if not isinstance(exc, TRANSIENT_REPLIES) and not any(m in upper for m in TRANSIENT_MARKS):
            _limited.error("redis sink: server error, retrying", server=self.where, error=text)
        return TransientSinkError(f"redis sink at {self.where}: {doing}: {text}")

    def _failure(self, exc: BaseException, doing: str, key: str = "") -> SinkError:
        """An error while ``doing`` (a command's name): the connection's, the client's, or
        the server's reply."""
        if not isinstance(exc, TimeoutError | RedisError | OSError):
            # redis-py raises what its parser met (a ValueError for `:abc`): not the event's
            # fault (the pipeline would dead-letter every event for it), nor a passing one.
            return self._unexpected(doing, self._text(exc))
        if isinstance(exc, AuthenticationError | AuthorizationError):
            return SinkUnusable(
                f"redis sink at {self.where}: the server refused our credentials "
                f"({self._text(exc)}): set sink.username and sink.password (or the url's "
                "user:password) to a user of that server, then restart"
            )
        if isinstance(exc, ResponseError):
            return self._refusal(exc, doing, key)
        if _tls_untrusted(exc):
            return SinkUnusable(
                f"redis sink at {self.where}: the server's TLS certificate is not trusted "
                f"({self._text(exc)}): set sink.tls_ca_file to the CA that signed it"
            )
        return TransientSinkError(f"redis sink at {self.where}: {doing}: {self._text(exc)}")

    def _unexpected(self, doing: str, what: str) -> SinkUnusable:
        return SinkUnusable(
            f"redis sink at {self.where}: the answer to {doing} is not a Redis answer ({what}): "
            "is sink.url a Redis server (and nothing between rewriting its replies)?"
        )

    async def _call(self, doing: str, awaitable: Awaitable[T], key: str = "") -> T:
        try:
            return await awaitable
        except Exception as exc:  # the connection's, the server's, or a reply no parser took
            raise self._failure(exc, doing, key) from None

    # --- scripts and checks -------------------------------------------------------------------

    async def _load(self, client: Redis) -> str:
        sha = await self._call("SCRIPT LOAD", client.script_load(ADD_SCRIPT))
        return sha.decode() if isinstance(sha, bytes) else str(sha)

    async def _bulk_limit(self, client: Redis) -> int | None:
        """The server's proto-max-bulk-len when CONFIG GET is allowed, else None."""
        try:
            found = await client.config_get("proto-max-bulk-len")
        except ResponseError:
            return None  # a user without CONFIG (as it should be), a managed server
        except Exception as exc:
            raise self._failure(exc, "CONFIG GET") from None
        for value in found.values():
            try:
                return int(value or 0) or None
            except ValueError:
                break
        return None

    async def _config(self, client: Redis, name: str) -> str | None:
        """One CONFIG GET value, or None when it is refused (no CONFIG right; managed)."""
        try:
            found = await client.config_get(name)
        except ResponseError:
            return None
        except Exception as exc:
            raise self._failure(exc, "CONFIG GET") from None
        for value in found.values():
            return prefix(value.decode("utf-8", "replace") if isinstance(value, bytes)
                          else str(value), 200)  # fmt: skip
        return None

    async def _durability(self, client: Redis) -> Durability:
        """CONFIG GET where allowed, else what INFO tells (each part optional)."""
        policy = await self._config(client, "maxmemory-policy")
        if policy is not None:  # CONFIG allowed
            limit = await self._config(client, "maxmemory")
            aof = await self._config(client, "appendonly")
            save = await self._config(client, "save")
            return Durability(policy, _int(limit), aof == "yes", (save or "").strip() != "")
        info: dict[str, Any] = {}
        for section in ("memory", "persistence"):
            try:
                info |= await client.info(section)
            except ResponseError:
                continue
            except Exception as exc:
                raise self._failure(exc, "INFO") from None
        policy = info.get("maxmemory_policy")
        aof = info.get("aof_enabled")
        return Durability(
            policy=None if policy is None else prefix(str(policy), 40),
            maxmemory=_int(info.get("maxmemory")),
            aof=None if aof is None else str(aof) == "1",
        )  # INFO does not tell the save rules

    def _durable(self, d: Durability, *, logged: bool = True) -> list[str]:
        """SinkUnusable when the server may evict the streams; else the warnings (logged,
        unless ``logged`` is False: preflight prints them)."""
        warnings = []
        risk = eviction_risk(d)
        if risk is not None:
            refuse, why = risk
            if refuse:
                raise SinkUnusable(f"redis sink at {self.where}: {why}")
            warnings.append(why)
        lost = persistence_risk(d)
        if lost is not None:
            warnings.append(lost)
        trimmed = maxlen_risk(self.settings.maxlen)
        if trimmed is not None:
            warnings.append(trimmed)
        for why in warnings if logged else ():
            log.warning("redis sink: check the server", server=self.where, warning=why)
        return warnings

    def _static_keys(self) -> list[str]:
        """The stream keys of the consumer's streams, tokens from events shown as ``_``."""
        keys = {
            self.template.render(
                {
                    "chainCode": token_value(chain),
                    "stream": token_value(stream),
                    **{t: "_" for t in EVENT_TOKENS},
                }
            )
            for stream, chain in self.chains.items()
        }
        return sorted(keys) or [self.template.render(dict.fromkeys(TOKENS, "_"))]

    async def _probe(self, client: Redis, key: str) -> _Probe:
        sha = await self._call("SCRIPT LOAD", client.script_load(PROBE_SCRIPT))
        probe = client.evalsha(sha, 2, key, guard_key(key, "preflight"))
        reply: list[Any] = await self._call("EVALSHA", probe, key)
        try:
            kind, length, xadd, set_, exists = (
                v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in reply
            )
            return _Probe(str(kind), int(length), str(xadd), str(set_), str(exists))
        except (TypeError, ValueError) as exc:  # not the probe script's five values
            raise self._unexpected("EVALSHA (probe)", self._text(exc)) from None

    def _judge(self, key: str, probe: _Probe, *, opening: bool = False) -> str | None:
        """Raise SinkUnusable for what an operator must fix; return a transient condition's
        refusal (OOM, READONLY...) to report, or None when a write would go through."""
        if probe.kind not in ("stream", "none"):
            raise SinkUnusable(
                f"redis sink at {self.where}: key {prefix(key, 200)!r} holds a "
                f"{prefix(probe.kind, 40)}, not a stream: rename or delete it, or change "
                "sink.stream_key"
            )
        for command, said in (("XADD", probe.xadd), ("SET", probe.set), ("EXISTS", probe.exists)):
            upper = said.upper()
            if any(m.upper() in upper for m in NOPERM_MARKS):
                raise SinkUnusable(
                    f"redis sink at {self.where}: the server's ACL refuses {command} on "
                    f"{prefix(key, 200)!r} or its guard ({self._scrub(said)}): grant the user "
                    f"`{self._grant}` on the keys (e.g. ~{_key_prefix(self.template.text)}*)"
                )
        for said in (probe.xadd, probe.set):
            if said == "accepted":  # cannot be: both are refused by their argument checks
                raise SinkUnusable(f"redis sink at {self.where}: unexpected reply to a probe")
            if any(said.upper().startswith(m) for m in TRANSIENT_MARKS):
                if opening:
                    log.warning(
                        "redis sink: the server refuses writes for now; retrying when events come",
                        server=self.where,
                        error=self._scrub(said),
                    )
                return self._scrub(said)
        return None

    # --- preflight ----------------------------------------------------------------------------

    async def preflight(self) -> str:
        """Connect, authenticate and check, without writing anything, that the add script
        could write each stream key (ACL, the key's type, maxmemory, a read-only replica).
        Returns one line; raises :class:`SinkUnusable` (or TransientSinkError when the server
        cannot be reached) saying what is wrong and the fix."""
        client = connect(self.server.kwargs)
        try:
            await self._call("PING", client.ping())
            await self._load(client)  # SCRIPT LOAD stores a script, not data
            facts = await self._facts(client)
            durability = await self._durability(client)
            short = await self._replicas(client)
            keys = self._static_keys()
            states = []
            for key in keys:
                probe = await self._probe(client, key)
                refused = self._judge(key, probe)
                if refused is not None:
                    raise SinkUnusable(
                        f"redis sink at {self.where}: writes to {prefix(key, 200)!r} are "
                        f"refused now: {refused}"
                    )
                state = f"{probe.length} entries" if probe.kind == "stream" else "new"
                states.append(f"{prefix(key, 200)} ({state})")
        finally:
            await _close(client, self.settings.timeout_s)
        warnings = self._durable(durability, logged=False)  # SinkUnusable: may evict streams
        sample = " (tokens from events as _)" if self.template.per_event else ""
        version = f" {facts['redis_version']}" if "redis_version" in facts else ""
        user = facts.get("user") or prefix(self.server.kwargs.get("username") or "default", 64)
        line = f"redis{version} at {self.where} as {user}: may XADD to {', '.join(states)}{sample}"
        if durability.maxmemory:
            line += f"; maxmemory {durability.maxmemory} ({durability.policy or '?'})"
        if self.settings.wait_replicas:
            line += f"; WAIT for {self.settings.wait_replicas} replica(s) after each batch"
        if short is not None:
            warnings.append(short)
        if warnings:
            line += "; WARNING: " + "; ".join(warnings)
        return line

    async def _facts(self, client: Redis) -> dict[str, str]:
        """What the server tells a user that may ask (each fact is optional)."""
        facts: dict[str, str] = {}
        try:
            who = await client.acl_whoami()
            facts["user"] = prefix(who.decode("utf-8", "replace") if isinstance(who, bytes)
                                   else str(who), 64)  # fmt: skip
        except Exception:  # Redis < 6, or not allowed (or a reply no parser took)
            pass
        try:
            info = await client.info("server")
        except Exception:
            return facts
        if "redis_version" in info:
            facts["redis_version"] = prefix(str(info["redis_version"]), 40)
        return facts


def _from_replica(exc: ResponseError) -> bool:
    """A replica's refusal (Redis 6 quotes it inside a script's error: not the class)."""
    return isinstance(exc, ReadOnlyError | MasterDownError) or any(
        m in str(exc).upper() for m in REPLICA_MARKS
    )


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


def _bulk_refused(exc: ResponseError) -> bool:
    """The server's answer to an argument over its proto-max-bulk-len (it then closes)."""
    text = str(exc).upper()
    return "PROTOCOL ERROR" in text and "BULK LENGTH" in text


def _key_prefix(template: str) -> str:
    """The literal start of the key template, for an ACL pattern in a message."""
    return template.split("{", 1)[0]


def _tls_untrusted(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


async def _close(client: Redis, seconds: float) -> None:
    """Close the client's connections, bounded; a connection that will not close is dropped."""
    try:
        async with asyncio.timeout(seconds):
            await client.aclose()
    except Exception as exc:
        log.warning("redis sink: closing the connections failed", error=type(exc).__name__)
