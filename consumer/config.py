"""Configuration: a TOML file, overridden by ``OPERA_CONSUMER_…`` environment variables
(``__`` between nested keys), with secrets also readable from files in
``$CREDENTIALS_DIRECTORY`` (systemd) or ``/run/secrets`` (Docker), named like the environment
variable without its prefix, e.g. ``streams__main__auth__client_secret``.

Every model forbids unknown keys: a typo is an error, not a silently ignored setting.

Every byte of the configuration is treated as hostile: URLs must parse (http/https, a host, no
whitespace or control characters), header names must be HTTP tokens and header values free of
CR/LF/control characters, and plain ``http://`` is refused wherever it would carry credentials
to a host other than loopback (unless ``allow_insecure_http = true``). Secrets never show in
``repr``, in :func:`effective` or in error messages: URL passwords and query values, and the
values of secret-looking headers, are masked like the ``SecretStr`` fields.
:func:`secret_values` lists every secret the settings hold, in every form it may travel in.
"""

from __future__ import annotations

import base64
import importlib
import inspect
import ipaddress
import os
import re
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import SplitResult, quote, quote_plus, unquote, unquote_plus, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .core.close_policy import PolicyConfig
from .core.protocol import SubscribeInput, key_hash
from .errors import ConfigError, InvalidInput
from .logs import MASK

ENV_PREFIX = "OPERA_CONSUMER_"
DEFAULT_CONFIG_PATHS = (Path("config.toml"), Path("/etc/opera-consumer/config.toml"))
SECRET_DIRS = ("/run/secrets",)  # $CREDENTIALS_DIRECTORY is added at load time
DEFAULT_SCOPE = "urn:opc:hgbu:ws:__myscopes__"
_SECRET_FIELDS = frozenset({"app_key", "client_secret", "password", "token", "dsn"})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")  # fullmatch: no trailing newline

# Words that make a header (or a query parameter) name look like it carries a credential: its
# value is masked in repr, check-config and logs, and it counts as credentials for the
# plain-http rule.
SECRET_NAME_WORDS = (
    "auth",
    "cookie",
    "token",
    "secret",
    "key",
    "pass",
    "signature",
    "credential",
    "session",
)
# RFC 9110 section 5.6.2: a field name is a token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HTTP_SCHEMES = ("http", "https")
_ABSOLUTE = ("http://", "https://")  # an orchestration template that is a URL of its own
_PROXY_SCHEMES = ("http", "https", "socks5", "socks5h", "socks4", "socks4a")  # as websockets
_CHAR_NAMES = {"\r": "CR", "\n": "LF", "\t": "TAB", "\0": "NUL", " ": "a space", "\x7f": "DEL"}
INSECURE_FIX = (
    "use https://, or (for a trusted test network only) set allow_insecure_http = true "
    "at the top level of the config"
)


class _Problem(ValueError):
    """A configuration error naming its key and its fix.

    ``items``: (key, problem, fix); the key is relative to where pydantic reports the error
    ("" for that place itself, e.g. a field). :func:`explain` prints one line per item. No
    message ever holds the offending value: it may be a secret.
    """

    def __init__(self, *items: tuple[str, str, str]) -> None:
        self.items = items
        super().__init__("; ".join(f"{(k + ': ') if k else ''}{m} -> {f}" for k, m, f in items))


def _char_name(c: str) -> str:
    return _CHAR_NAMES.get(c) or f"U+{ord(c):04X}"


def _bad_url_char(text: str) -> str | None:
    """Where the first whitespace or control (or format) character is, if any."""
    for i, c in enumerate(text):
        if c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
            return f"{_char_name(c)} at position {i}"
    return None


def _bad_field_char(text: str) -> str | None:
    """Where the first character not allowed in an HTTP field value is (visible ASCII and
    space only: CR/LF would inject headers, and httpx cannot encode the rest), if any."""
    for i, c in enumerate(text):
        if not " " <= c <= "~":
            return f"{_char_name(c)} at position {i}"
    return None


def is_secret_name(name: str) -> bool:
    """A header or query parameter name that looks like it carries a credential."""
    lowered = name.lower()
    return any(word in lowered for word in SECRET_NAME_WORDS)


def is_loopback(host: str | None) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1."""
    if not host:
        return False
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MaskedUrl(str):
    """A URL from the configuration. ``str()`` is the URL itself, for the code that uses it;
    ``repr()`` (and ``check-config``, through the serializer below) masks the password of its
    user information and every query value: either may be a secret."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(mask_url(self))


class MaskedValue(str):
    """A secret-looking header value: ``str()`` is the value, ``repr()`` is ``'***'``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(MASK)


def _mask_params(part: str) -> str:
    pieces = []
    for piece in part.split("&"):
        name, eq, _ = piece.partition("=")
        pieces.append(f"{name}={MASK}" if eq else (MASK if piece else ""))
    return "&".join(pieces)


def mask_url(url: str) -> str:
    """``url`` with the password of its user information (a lone user name, which may be a
    token, too) and every query and fragment value replaced by ``***``."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if colon else f"{MASK}@{hostport}"
    return SplitResult(
        parts.scheme,
        netloc,
        parts.path,
        _mask_params(parts.query),
        _mask_params(parts.fragment),
    ).geturl()


def _dump_url(url: str) -> str:
    return mask_url(url)


def _dump_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: MASK if is_secret_name(k) else str(v) for k, v in headers.items()}


def _parse_url(v: str, schemes: tuple[str, ...], wrong_scheme: str) -> SplitResult:
    bad = _bad_url_char(v)
    if bad:
        raise _Problem(
            (
                "",
                f"contains {bad}: no whitespace or control characters are allowed in a URL",
                "remove it (percent-encode it if it is really part of the URL)",
            )
        )
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018  # raises ValueError for a bad port
    except ValueError:
        raise _Problem(("", "is not a valid URL", "use scheme://host[:port][/path]")) from None
    if parts.scheme not in schemes or not v.lower().startswith(parts.scheme + "://"):
        raise ValueError(wrong_scheme)
    if not parts.hostname:
        raise _Problem(("", "has no host", "use scheme://host[:port][/path]"))
    return parts


def _http_url(v: str) -> str:
    _parse_url(v, _HTTP_SCHEMES, "must be an http:// or https:// URL")
    return MaskedUrl(v)


def _base_url(v: str) -> str:
    return MaskedUrl(_http_url(v).rstrip("/"))


def _gateway_url(v: str) -> str:
    _parse_url(
        v,
        _HTTP_SCHEMES,
        "must start with https:// (the gateway URL of the portal's environment card)",
    )
    return MaskedUrl(v.rstrip("/"))


def _proxy_url(v: str) -> str:
    parts = _parse_url(
        v,
        _PROXY_SCHEMES,
        "must be a proxy URL: http://, https://, socks5://, socks5h://, socks4:// or socks4a://",
    )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _Problem(("", "a proxy URL has no path, query or fragment", "use scheme://host:port"))
    if parts.username is not None and parts.password is None:
        raise _Problem(
            ("", "a user name without a password", "use scheme://user:password@host:port")
        )
    return MaskedUrl(v)


def _check_headers(headers: dict[str, str]) -> dict[str, str]:
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            raise _Problem(
                (
                    "",
                    f"header name {name!a} is not an HTTP field name",
                    "use letters, digits and !#$%&'*+-.^_`|~ only (RFC 9110 token)",
                )
            )
        bad = _bad_field_char(value)
        if bad:
            raise _Problem(
                (
                    "",
                    f"the value of header {name!r} contains {bad}",
                    "remove it: a header value is visible ASCII and spaces only, "
                    "never CR, LF, NUL or other control characters",
                )
            )
        checked[name] = MaskedValue(value) if is_secret_name(name) else value
    return checked


def _no_controls(v: SecretStr | str | None) -> Any:
    """For values sent in an HTTP header (app key, bearer token, enterpriseId)."""
    if v is None:
        return v
    text = v.get_secret_value() if isinstance(v, SecretStr) else v
    bad = _bad_field_char(text)
    if bad:
        raise _Problem(
            (
                "",
                f"contains {bad}",
                "remove it: it travels in an HTTP header (visible ASCII and spaces only)",
            )
        )
    return v


_URL_DUMP = PlainSerializer(_dump_url, return_type=str, when_used="json")
# str() of these is the URL; repr() and check-config mask passwords and query values.
HttpUrl = Annotated[str, AfterValidator(_http_url), _URL_DUMP]
BaseUrl = Annotated[str, AfterValidator(_base_url), _URL_DUMP]  # trailing "/" dropped
GatewayUrl = Annotated[str, AfterValidator(_gateway_url), _URL_DUMP]  # trailing "/" dropped
ProxyUrl = Annotated[str, AfterValidator(_proxy_url), _URL_DUMP]
# Configured HTTP headers: checked names and values; secret-looking values masked.
Headers = Annotated[
    dict[str, str],
    AfterValidator(_check_headers),
    PlainSerializer(_dump_headers, return_type=dict[str, str], when_used="json"),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuthSettings(_Model):
    grant: Literal["client_credentials", "password"] = "client_credentials"
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    scope: str = DEFAULT_SCOPE
    enterprise_id: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    token_url: HttpUrl | None = None  # default: {gateway_url}/oauth/v1/tokens
    refresh_margin_s: float = Field(default=120.0, ge=0)
    timeout_s: float = Field(default=15.0, gt=0)
    retry_max_s: float = Field(default=120.0, gt=0)

    _enterprise_id = field_validator("enterprise_id")(_no_controls)  # the enterpriseId header

    @model_validator(mode="after")
    def _grant_fields(self) -> AuthSettings:
        if self.grant == "password" and (not self.username or self.password is None):
            raise ValueError(
                "grant = 'password' needs username and password (the integration user)"
            )
        return self


class SubscriptionSettings(_Model):
    delta: bool = False
    hotel_codes: tuple[str, ...] = ()
    # Where a stream WITHOUT a checkpoint begins; once one exists it always wins.
    # persisted: `offset` if set, else no offset (the gateway resumes after what it sent last)
    # offset: `offset` (required); highest: only the newest event, then new ones
    start: Literal["persisted", "offset", "highest"] = "persisted"
    offset: str | None = None

    @model_validator(mode="after")
    def _start_fields(self) -> SubscriptionSettings:
        if self.start == "offset" and self.offset is None:
            raise ValueError("start = 'offset' needs offset = \"<digits>\"")
        return self


class ConnectionSettings(_Model):
    ping_interval_s: float = Field(default=15.0, gt=0)
    open_timeout_s: float = Field(default=15.0, gt=0)
    ack_timeout_s: float = Field(default=10.0, gt=0)
    liveness_floor_s: float = Field(default=180.0, gt=0)
    liveness_multiplier: float = Field(default=4.0, gt=0)
    # Largest frame processed; up to 4x larger ones are dead-lettered; beyond that the
    # stream stops (1009) until the limit is raised.
    max_frame_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    complete_timeout_s: float = Field(default=10.0, ge=0)  # wait for the server's close
    resubscribe_gap_s: float = Field(default=10.0, ge=0)  # after a completed session
    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    abnormal_min_s: float = Field(default=4.0, ge=0)
    lockout_s: float = Field(default=120.0, ge=0)
    lockout_jitter_s: float = Field(default=30.0, ge=0)
    rate_limited_s: float = Field(default=120.0, ge=0)
    max_auth_failures: int = Field(default=3, ge=1)
    healthy_after_s: float = Field(default=60.0, ge=0)
    # OHIP: more than 150 upgrades in 2 minutes from one application key -> HTTP 429.
    # Shared by every stream of the same app key (the first stream's values apply).
    upgrade_limit: int = Field(default=140, ge=1)
    upgrade_window_s: float = Field(default=120.0, gt=0)
    proxy: ProxyUrl | None = None  # None: no proxy, even if the environment names one

    def policy(self) -> PolicyConfig:
        return PolicyConfig(
            backoff_initial_s=self.backoff_initial_s,
            backoff_max_s=self.backoff_max_s,
            abnormal_min_s=self.abnormal_min_s,
            lockout_s=self.lockout_s,
            lockout_jitter_s=self.lockout_jitter_s,
            rate_limited_s=self.rate_limited_s,
            max_auth_failures=self.max_auth_failures,
            healthy_after_s=self.healthy_after_s,
        )


class StreamSettings(_Model):
    gateway_url: GatewayUrl
    chain_code: str
    app_key: SecretStr
    auth: AuthSettings
    subscription: SubscriptionSettings = SubscriptionSettings()
    connection: ConnectionSettings = ConnectionSettings()
    # A permanent sink failure: "dead-letter" the event and go on with later events of the
    # same primaryKey, or "park-key": dead-letter the later ones too (reason "parked") until
    # the DLQ entries of that key are replayed or purged, so a resource never goes out of order.
    on_permanent_failure: Literal["dead-letter", "park-key"] = "dead-letter"

    _app_key = field_validator("app_key")(_no_controls)  # the x-app-key header

    @model_validator(mode="after")
    def _input(self) -> StreamSettings:
        try:
            self.subscribe_input(self.subscription.offset).validate()
        except InvalidInput as exc:
            raise ValueError(str(exc)) from None
        return self

    def subscribe_input(self, offset: str | None, *, highest: bool = False) -> SubscribeInput:
        return SubscribeInput(
            chain_code=self.chain_code,
            offset=offset,
            highest=highest,
            delta=self.subscription.delta,
            hotel_codes=self.subscription.hotel_codes,
        )

    @property
    def token_url(self) -> str:
        return self.auth.token_url or f"{self.gateway_url}/oauth/v1/tokens"


class StateSettings(_Model):
    path: Path = Path("opera-consumer.db")
    # FULL survives power loss; NORMAL survives any process crash and is a bit faster.
    synchronous: Literal["normal", "full"] = "full"
    commit_max_events: int = Field(default=500, ge=1)
    commit_interval_ms: int = Field(default=100, ge=1)
    processed_retention_days: float = Field(default=8.0, gt=0)  # OHIP keeps 7 days; +1 margin
    prune_interval_s: float = Field(default=3600.0, gt=0)


class JsonlSinkSettings(_Model):
    type: Literal["jsonl"] = "jsonl"
    path: Path = Path("events.jsonl")
    fsync: bool = True  # off: a power loss may lose lines the checkpoint already covers


class WebhookSinkSettings(_Model):
    type: Literal["webhook"]
    url: HttpUrl
    batch_size: int = Field(default=1, ge=1, le=1000)  # 1: one event per POST; more: JSON array
    headers: Headers = {}
    auth: Literal["none", "bearer", "basic"] = "none"
    token: SecretStr | None = None  # bearer
    username: str | None = None  # basic
    password: SecretStr | None = None  # basic
    timeout_s: float = Field(default=10.0, gt=0)

    _token = field_validator("token")(_no_controls)  # the Authorization header

    @model_validator(mode="after")
    def _auth_fields(self) -> WebhookSinkSettings:
        if self.auth == "bearer" and self.token is None:
            raise ValueError("auth = 'bearer' needs token (a secret)")
        if self.auth == "basic" and (not self.username or self.password is None):
            raise ValueError("auth = 'basic' needs username and password (a secret)")
        if self.auth != "none" and "@" in urlsplit(self.url).netloc:
            # httpx would send the URL's user:password as Basic auth instead of the token.
            raise _Problem(
                (
                    "url",
                    f"holds user information (user:password@) while auth = {self.auth!r}: "
                    "one request cannot carry both",
                    f"remove user:password@ from sink.url and keep auth = {self.auth!r}, "
                    'or set auth = "none" to authenticate with the URL\'s credentials',
                )
            )
        return self

    def credentials(self) -> str | None:
        """What credentials the requests carry (None: none), for the plain-http rule."""
        if self.auth != "none":
            return f"auth = {self.auth!r}"
        parts = urlsplit(self.url)
        if "@" in parts.netloc:
            return "user information (user:password@) in the URL"
        for name in self.headers:
            if is_secret_name(name):
                return f"header {name!r}"
        for piece in parts.query.split("&"):
            name, eq, _ = piece.partition("=")
            if eq and is_secret_name(unquote_plus(name)):
                return f"query parameter {name!r}"
        return None


def _identifier(v: str) -> str:
    if not _IDENTIFIER.fullmatch(v):
        raise ValueError("use letters, digits and '_' (an SQL identifier), e.g. 'opera_events'")
    return v


class SqliteSinkSettings(_Model):
    type: Literal["sqlite"]
    # Default: the state store's own file, so event rows and the checkpoint commit in one
    # transaction. Another file gets idempotent upserts (a replay rewrites the same rows).
    path: Path | None = None
    table: str = "opera_events"

    _table = field_validator("table")(_identifier)


class PostgresSinkSettings(_Model):
    type: Literal["postgres"]
    dsn: SecretStr  # postgresql://user:password@host:5432/db (a secret: it may hold a password)
    table: str = "opera_events"
    pool_min: int = Field(default=1, ge=1)
    pool_max: int = Field(default=4, ge=1)
    timeout_s: float = Field(default=10.0, gt=0)

    _table = field_validator("table")(_identifier)


class PythonSinkSettings(_Model):
    type: Literal["python"]
    target: str  # "package.module:function", an async function taking (stream, events)
    # Exception types (dotted names) that mean "retry later"; ConnectionError, TimeoutError
    # and opera-consumer's TransientSinkError always do, as does an exception whose
    # `transient` attribute is True. Anything else is permanent: the event is dead-lettered.
    transient_exceptions: tuple[str, ...] = ()

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        if not is_async_callable(resolve(v)):
            raise _Problem(
                (
                    "",
                    f"{v} is not an async function",
                    "make it async def handle(stream, events) -> None "
                    "(or an object whose __call__ is async def)",
                )
            )
        return v

    @field_validator("transient_exceptions")
    @classmethod
    def _exceptions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            mod, _, attr = name.rpartition(".")
            obj = resolve(f"{mod or 'builtins'}:{attr}")
            if not (isinstance(obj, type) and issubclass(obj, BaseException)):
                raise ValueError(f"{name} is not an exception class")
        return v


def is_async_callable(obj: Any) -> bool:
    """An ``async def`` function, or an instance whose class has an ``async def __call__``
    (not a class: calling one makes an instance, not a coroutine)."""
    if inspect.iscoroutinefunction(obj):
        return True
    call = None if isinstance(obj, type) else getattr(type(obj), "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(call)


def resolve(target: str) -> Any:
    """Import ``module:attribute``; ValueError saying what is wrong."""
    mod, sep, attr = target.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"{target!r}: use 'package.module:function'")
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as exc:
        raise ValueError(f"cannot import module {mod!r}: {exc}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {mod!r} has no attribute {attr!r}") from None
    return obj


_SINK_TYPES = ("jsonl", "webhook", "sqlite", "postgres", "python")


def _sink_type(v: Any) -> str:
    # A [sink] table without `type` is the jsonl sink (as before there was a choice).
    t = v.get("type", "jsonl") if isinstance(v, dict) else getattr(v, "type", "jsonl")
    return str(t)


SinkSettings = Annotated[
    Annotated[JsonlSinkSettings, Tag("jsonl")]
    | Annotated[WebhookSinkSettings, Tag("webhook")]
    | Annotated[SqliteSinkSettings, Tag("sqlite")]
    | Annotated[PostgresSinkSettings, Tag("postgres")]
    | Annotated[PythonSinkSettings, Tag("python")],
    Discriminator(
        _sink_type,
        custom_error_type="sink_type",
        custom_error_message=f"type must be one of {', '.join(_SINK_TYPES)}",
    ),
]


class HttpSettings(_Model):
    """The one pooled HTTP client of the process: tokens, webhook, orchestration."""

    max_connections: int = Field(default=20, ge=1)
    max_keepalive_connections: int = Field(default=10, ge=0)
    keepalive_expiry_s: float = Field(default=30.0, ge=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    timeout_s: float = Field(default=15.0, gt=0)
    http2: bool = False


class OrchestrationSettings(_Model):
    """Fetch the resource an event is about from the OHIP REST API before the sink."""

    enabled: bool = False
    # Event name (or module name) -> URL template; placeholders: {primaryKey}, {hotelId},
    # {chainCode}, {eventName}, {moduleName}. A relative template is joined to base_url.
    resources: dict[str, str] = {}
    base_url: BaseUrl | None = None  # default: the stream's gateway_url
    rate_per_s: float = Field(default=5.0, gt=0)  # token bucket shared by every stream
    burst: int = Field(default=10, ge=1)
    coalesce_ms: float = Field(default=500.0, ge=0)  # same URL within this window: one GET
    max_attempts: int = Field(default=6, ge=1)  # then the batch is retried as a sink failure
    retry_max_s: float = Field(default=30.0, gt=0)
    # 404 (the resource is gone, e.g. purged): attach null and deliver, or dead-letter
    on_not_found: Literal["attach-null", "dead-letter"] = "attach-null"

    @model_validator(mode="after")
    def _templates(self) -> OrchestrationSettings:
        if self.enabled and not self.resources:
            raise ValueError(
                "enabled = true needs [orchestration.resources], e.g. "
                '"NEW RESERVATION" = "/rsv/v1/hotels/{hotelId}/reservations/{primaryKey}"'
            )
        allowed = {"primaryKey", "hotelId", "chainCode", "eventName", "moduleName"}
        for name, template in self.resources.items():
            if template.startswith(_ABSOLUTE):
                try:
                    _http_url(template)
                except _Problem as exc:
                    items = ((f"resources[{name!r}]", m, f) for _, m, f in exc.items)
                    raise _Problem(*items) from None
                except ValueError as exc:
                    raise ValueError(f"resources[{name!r}]: {exc}") from None
            elif _bad_url_char(template):
                raise _Problem(
                    (
                        f"resources[{name!r}]",
                        f"contains {_bad_url_char(template)}",
                        "no whitespace or control characters in a URL template",
                    )
                )
            fields = set(re.findall(r"{(\w*)}", template))
            if fields - allowed:
                raise ValueError(
                    f"resources[{name!r}]: unknown placeholder(s) {sorted(fields - allowed)}; "
                    f"use {sorted(allowed)}"
                )
        return self


class PipelineSettings(_Model):
    workers: int = Field(default=4, ge=1, le=256)
    queue_size: int = Field(default=2000, ge=1)  # per stream, events read but not yet done
    batch_max: int = Field(default=200, ge=1)
    drain_timeout_s: float = Field(default=20.0, ge=0)
    sink_retry_initial_s: float = Field(default=0.5, gt=0)
    sink_retry_max_s: float = Field(default=30.0, gt=0)


class MetricsSettings(_Model):
    enabled: bool = True
    address: str = "127.0.0.1"  # loopback by default: expose deliberately
    port: int = Field(default=9464, ge=0, le=65535)  # 0: any free port
    event_timezone: str = "UTC"  # zone of the events' timestamps (undocumented by Oracle)

    @field_validator("event_timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}: use an IANA name like 'UTC'") from None
        return v


class LogSettings(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    streams: dict[str, StreamSettings] = Field(min_length=1)
    # Plain http:// to a host other than loopback where credentials travel (gateway, token
    # endpoint, REST API, a webhook with credentials) is refused unless this is true: for a
    # trusted test network (e.g. the Docker sandbox). The daemon warns at every start.
    allow_insecure_http: bool = False
    state: StateSettings = StateSettings()
    sink: SinkSettings = JsonlSinkSettings()
    pipeline: PipelineSettings = PipelineSettings()
    http: HttpSettings = HttpSettings()
    orchestration: OrchestrationSettings = OrchestrationSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()

    @field_validator("streams")
    @classmethod
    def _names(cls, v: dict[str, StreamSettings]) -> dict[str, StreamSettings]:
        for name in v:
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"stream name {name!r}: use letters, digits, '-' and '_'")
        return v

    @model_validator(mode="after")
    def _transport(self) -> Settings:
        """Plain http:// only to loopback where credentials travel (allow_insecure_http lifts
        this rule, never the others: those are checked by each field)."""
        if self.allow_insecure_http:
            return self
        problems: list[tuple[str, str, str]] = []

        def check(key: str, url: str | None, carries: str) -> None:
            if url is None:
                return
            parts = urlsplit(url)
            if parts.scheme == "http" and not is_loopback(parts.hostname):
                problems.append(
                    (
                        key,
                        f"plain http:// to {parts.hostname} (not loopback) would send "
                        f"{carries} unencrypted",
                        INSECURE_FIX,
                    )
                )

        for name, s in self.streams.items():
            check(f"streams.{name}.gateway_url", s.gateway_url, "the application key and tokens")
            check(f"streams.{name}.auth.token_url", s.auth.token_url, "the client secret")
        o = self.orchestration
        check("orchestration.base_url", o.base_url, "the access token and application key")
        for name, template in o.resources.items():
            if template.startswith(_ABSOLUTE):
                check(f"orchestration.resources[{name!r}]", template, "the access token")
        if isinstance(self.sink, WebhookSinkSettings):
            carries = self.sink.credentials()
            if carries is not None:
                check("sink.url", self.sink.url, f"its credentials ({carries})")
        if problems:
            raise _Problem(*problems)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Evaluated per load, not at import: $CREDENTIALS_DIRECTORY is only known at run time.
        dirs = [
            d
            for d in (*SECRET_DIRS, os.environ.get("CREDENTIALS_DIRECTORY"))
            if d and os.path.isdir(d)
        ]
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if dirs:
            sources.append(
                NestedSecretsSettingsSource(
                    file_secret_settings,
                    secrets_dir=dirs,
                    secrets_prefix="",
                    secrets_nested_delimiter="__",
                    secrets_dir_missing="ok",
                )
            )
        sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)


def find_config(path: Path | None) -> Path | None:
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file {path} not found: pass an existing file to --config")
        return path
    return next((p for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)


def load_settings(path: Path | None = None) -> Settings:
    """Load and validate; raises :class:`ConfigError` naming each bad key and its fix."""
    found = find_config(path)

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=found)

    try:
        return _FileSettings()  # type: ignore[call-arg]  # fields come from the sources
    except ValidationError as exc:
        raise ConfigError(explain(exc, found)) from None
    except ValueError as exc:  # e.g. TOML syntax
        raise ConfigError(f"{found}: {exc}") from None


def explain(exc: ValidationError, source: Path | None) -> str:
    where = (
        f"in {source}"
        if source
        else "(no config file found; looked for "
        + ", ".join(str(p) for p in DEFAULT_CONFIG_PATHS)
        + ")"
    )
    lines = [f"invalid configuration {where}:"]
    for err in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in err["loc"]]
        if loc[:1] == ["sink"] and len(loc) > 1 and loc[1] in _SINK_TYPES:
            del loc[1]  # pydantic names the union member; the key is sink.<field>
        problem = (err.get("ctx") or {}).get("error")
        if isinstance(problem, _Problem):  # names its key (relative to loc) and its fix
            for rel, what, fix in problem.items:
                key = ".".join([*loc, rel] if rel else loc) or "(top level)"
                lines.append(f"  {key}: {what} -> {fix}")
            continue
        key = ".".join(loc) or "(top level)"
        env = ENV_PREFIX + "__".join(part.upper() for part in loc)
        if err["type"] == "missing":
            fix = f"set {key} in the config file or the environment variable {env}"
            if loc[-1] in _SECRET_FIELDS:
                secret_file = "__".join(loc)
                fix += (
                    f", or put it in a file named {secret_file} in $CREDENTIALS_DIRECTORY "
                    "or /run/secrets"
                )
        elif err["type"] == "extra_forbidden":
            fix = "unknown key (a typo?): remove or rename it; config.example.toml lists every key"
        else:
            fix = "fix the value (see config.example.toml)"
        lines.append(f"  {key}: {err['msg']} -> {fix}")
    return "\n".join(lines)


def effective(settings: Settings) -> dict[str, Any]:
    """The settings as plain data, secrets masked: what ``check-config`` prints."""
    return settings.model_dump(mode="json")


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
    information (or a lone user name) raw, percent-decoded and re-encoded, the base64 of
    ``user:password`` (Basic auth, as httpx and websockets send URL credentials), and every
    query and fragment value."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return [str(url)]
    values: list[str] = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        raw_user, colon, raw_password = userinfo.partition(":")
        values += _forms(raw_password if colon else raw_user)
        values.append(_b64(f"{unquote(raw_user)}:{unquote(raw_password)}"))
    return values + query_secret_values(parts.query, parts.fragment)


def webhook_secret_values(sink: WebhookSinkSettings) -> list[str]:
    """Every secret a webhook sink sends: the bearer token (and ``Bearer <token>``), the basic
    password and its base64 form, secret-looking header values, and the URL's secrets."""
    values: list[str] = []
    if sink.token is not None:
        token = sink.token.get_secret_value()
        values += [token, f"Bearer {token}"]
    if sink.password is not None:
        password = sink.password.get_secret_value()
        basic = _b64(f"{sink.username or ''}:{password}")
        values += [password, basic, f"Basic {basic}"]
    values += [str(v) for k, v in sink.headers.items() if is_secret_name(k)]
    values += url_secret_values(sink.url)
    return _unique(values)


_DSN_PASSWORD = re.compile(r"""password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)""", re.IGNORECASE)


def _dsn_secret_values(dsn: str) -> list[str]:
    values = [dsn, *url_secret_values(dsn)] if "://" in dsn else [dsn]
    for match in _DSN_PASSWORD.finditer(dsn):  # key=value form, or ?password= in a URL
        raw = match.group(1)
        values += [raw, raw.strip("'").replace("\\'", "'")]
    return values


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def secret_values(settings: Settings) -> list[str]:
    """Every secret string the settings hold, in every form we know it may appear in (for the
    log redactor): app keys and their SHA-256 hex, client secrets and the base64 of
    ``client_id:client_secret`` (Basic auth to the token endpoint), passwords (also
    form-encoded), the secrets of every URL (:func:`url_secret_values`), the webhook's token,
    password and secret headers, the PostgreSQL DSN and its password."""
    values: list[str] = []
    for s in settings.streams.values():
        key = s.app_key.get_secret_value()
        values += [key, key_hash(key)]
        auth = s.auth
        secret = auth.client_secret.get_secret_value()
        values += [secret, _b64(f"{auth.client_id}:{secret}")]
        if auth.password is not None:
            password = auth.password.get_secret_value()
            values += [password, quote_plus(password, safe=""), quote(password, safe="")]
        for url in (s.gateway_url, s.auth.token_url, s.connection.proxy):
            if url is not None:
                values += url_secret_values(url)
    # (Not the orchestration templates: their query values are API parameters, which the
    # redactor would then mask in every log line.)
    if settings.orchestration.base_url is not None:
        values += url_secret_values(settings.orchestration.base_url)
    sink = settings.sink
    if isinstance(sink, WebhookSinkSettings):
        values += webhook_secret_values(sink)
    elif isinstance(sink, PostgresSinkSettings):
        values += _dsn_secret_values(sink.dsn.get_secret_value())
    return _unique(values)
