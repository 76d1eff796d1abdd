"""The settings: one model per table of the config file, every unknown key an error.

``Settings`` reads, in order of precedence, the ``OPERA_CONSUMER_…`` environment variables
(``__`` between nested keys), secret files in ``$CREDENTIALS_DIRECTORY`` (systemd) or
``/run/secrets`` (Docker) named like the variable without its prefix (e.g.
``streams__main__auth__client_secret``), then the TOML file.
"""

from __future__ import annotations

import importlib
import inspect
import ipaddress
import math
import os
import re
import sys
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote_plus, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationInfo,
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

from ..core.close_policy import OVERRIDABLE, CloseAction, PolicyConfig
from ..core.printable import printable
from ..core.protocol import SubscribeInput
from ..core.rotation import PatternError, Rotation, check_pattern, default_pattern, distinguishes
from ..core.subscribe_timing import SUBSCRIBE_MARGIN_S
from ..core.templates import (
    Template,
    TemplateError,
    always_ends_as_guard,
    check_key,
    check_stream_name,
    check_subject,
    key_token,
)
from ..errors import ConfigError, InvalidInput
from ..pg_target import UNPARSABLE, UNPARSABLE_FIX, Target
from .extras import missing_extras
from .fields import (
    ABSOLUTE,
    INSECURE_FIX,
    PERCENT_ENCODE_FIX,
    SHORT_SECRET,
    AnyUrl,
    BaseUrl,
    GatewayUrl,
    Headers,
    HttpUrl,
    MaskedUrl,
    Problem,
    ProxyUrl,
    UrlTemplates,
    WebhookUrl,
    bad_url_char,
    basic_credentials,
    http_url,
    is_loopback,
    is_secret_name,
    misread_problem,
    misread_user_information,
    no_controls,
    short_secret,
    short_url_problem,
    short_url_secrets,
    undecodable,
    unprintable_char,
    user_information,
)

ENV_PREFIX = "OPERA_CONSUMER_"
SECRET_DIRS = ("/run/secrets",)  # $CREDENTIALS_DIRECTORY is added at load time


def secret_fix(loc: list[str]) -> str:
    """Where a secret at ``loc`` may be given: the file, its variable, its secret file."""
    env = ENV_PREFIX + "__".join(part.upper() for part in loc)
    name = "__".join(loc)
    return (
        f"set {'.'.join(loc)} in the config file or the environment variable {env}, or put it "
        f"in a file named {name} in $CREDENTIALS_DIRECTORY or /run/secrets (systemd: "
        f"LoadCredential={name}:/etc/credstore/<file>; a command run from a shell gets "
        "the unit's credentials only as the README's Deploy section shows)"
    )


DEFAULT_SCOPE = "urn:opc:hgbu:ws:__myscopes__"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")  # fullmatch: no trailing newline
# The config file's directory while it loads (loading.load_settings): a python sink's module
# is also looked for there, as relative paths are resolved against it.
CONFIG_DIR: ContextVar[Path | None] = ContextVar("CONFIG_DIR", default=None)


def _file(example: str) -> Callable[[Any], Any]:
    """A path that must name a file: not empty, not ending in '/', not an existing directory
    (the daemon would fail to open it only at run, after check-config said OK)."""

    def check(v: Any) -> Any:
        fix = f"set it to a file (e.g. {example}), not a directory"
        if isinstance(v, str | Path) and (not str(v).strip() or str(v).endswith(("/", os.sep))):
            raise Problem(("", "is empty or names a directory", fix))
        if isinstance(v, str | Path):
            base = CONFIG_DIR.get()
            try:
                directory = (Path(v) if base is None else base / v).is_dir()
            except (OSError, ValueError):
                directory = False  # opening it says what is wrong, naming the path
            if directory:
                raise Problem(("", "names an existing directory", fix))
        return v

    return check


def _required(what: str) -> Callable[[SecretStr], SecretStr]:
    """A secret that must not be empty (an empty one is refused only later, by the far end)."""

    def check(v: SecretStr) -> SecretStr:
        if not v.get_secret_value().strip():
            raise Problem(("", "is empty", f"set it to {what}"))
        return v

    return check


def _long_enough(what: str) -> Callable[[SecretStr | None], SecretStr | None]:
    """A secret the log redactor masks (:data:`~.fields.SHORT_SECRET`): not 1-3 characters."""

    def check(v: SecretStr | None) -> SecretStr | None:
        if v is not None and short_secret(v.get_secret_value()):
            raise Problem(("", SHORT_SECRET, f"set it to {what}"))
        return v

    return check


def _url_secrets(*, lone_user: bool) -> Callable[[Any], Any]:
    """A URL (or a list of them, or a secret one) whose secrets the log redactor masks: none
    of 1-3 characters (:func:`~.fields.short_url_secrets`)."""

    def check(v: Any) -> Any:
        urls = v if isinstance(v, tuple) else (v,)
        for url in urls:
            text = url.get_secret_value() if isinstance(url, SecretStr) else url
            if text is not None and (found := short_url_secrets(text, lone_user=lone_user)):
                raise short_url_problem(found)
        return v

    return check


def _within(
    low: float, high: float = math.inf, *, unit: str = "s", why: str, off: str = ""
) -> AfterValidator:
    """A number within ``low``..``high`` (both included; also 0 when ``off`` says what 0
    means): the type accepted far worse (a ping flood at OHIP's gateway for a typo), so the
    range, why, and the fix are said at load, before anything connects."""

    def check(v: float) -> float:
        if (off and v == 0) or low <= v <= high:
            return v
        span = f"{low:g} to {high:g} {unit}" if high < math.inf else f"at least {low:g} {unit}"
        side = f"below {low:g}" if v < low else f"above {high:g}"
        raise Problem(
            (
                "",
                f"is {side} {unit}: {why}",
                f"set it to {span}" + (f" (or 0: {off})" if off else ""),
            )
        )

    return AfterValidator(check)


# A connection wait or deadline beyond an hour (1e308 was accepted) keeps a stream down, or a
# dead connection up, for good.
MAX_WAIT_S = 3600.0
_WAIT_WHY = "a wait or deadline that long keeps the stream down (or a dead connection up)"


# Every timeout that adds to what a stop may take (stop_budget, asked of systemd as
# EXTEND_TIMEOUT_USEC): an hour is more than any stop needs; 1e308 made a 300-digit request.
MAX_STOP_STEP_S = 3600.0
_STOP_STEP_WHY = (
    "it adds to what a stop may take (the daemon asks systemd for that time), and no stop "
    "needs more than an hour"
)
StopStepSeconds = Annotated[float, _within(0, MAX_STOP_STEP_S, why=_STOP_STEP_WHY)]


class _Model(BaseModel):
    # allow_inf_nan: TOML's inf and nan are floats, and a timeout of inf overflows aiohttp's.
    # hide_input_in_errors: a ValidationError's text quotes the value otherwise, and a DSN or
    # a secret refused by a validator would be in it.
    model_config = ConfigDict(
        extra="forbid", frozen=True, allow_inf_nan=False, hide_input_in_errors=True
    )


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

    _enterprise_id = field_validator("enterprise_id")(no_controls)  # the enterpriseId header
    _client_secret = field_validator("client_secret")(_required("the OAuth client's secret"))
    _client_secret_long = field_validator("client_secret")(
        _long_enough("the OAuth client's secret from the developer portal")
    )
    _password = field_validator("password")(_long_enough("the integration user's password"))
    _token_url = field_validator("token_url")(_url_secrets(lone_user=True))

    @model_validator(mode="after")
    def _grant_fields(self) -> AuthSettings:
        if self.grant == "password" and (not self.username or self.password is None):
            raise ValueError(
                "grant = 'password' needs username and password (the integration user)"
            )
        if self.grant == "client_credentials" and (self.username or self.password is not None):
            # Sent by no request: the operator meant the password grant, or left them over.
            raise ValueError(
                "username and password have no effect with grant = 'client_credentials' "
                '-> set grant = "password" (the integration user), or remove them'
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


# liveness_floor_s at least this many ping periods: one pong late or lost is not a dead link.
LIVENESS_PINGS = 2.0
MAX_BACKOFF_S = 3600.0  # backoff_initial_s, backoff_max_s and the lockout's waits at most
OHIP_UPGRADE_LIMIT = 150  # OHIP (c_errors.htm): more than 150 upgrades in 2 minutes -> HTTP 429
# Pings more often than this draw a warning unless the gateway is loopback (the sandbox, where
# the tests scale them down): OHIP's gateway wants one every 15 s at least, not a flood.
PING_WARNING_S = 1.0


class ConnectionSettings(_Model):
    # Oracle: a ping at least every 15 s; 10 leaves room for a busy loop and the time to
    # subscribe (the first ping goes out one interval after the subscription). The floor
    # refuses a flood (0.0001: thousands of pings a second), not the tests' scaled timers.
    ping_interval_s: Annotated[
        float,
        _within(
            0.01,
            15,
            why="Oracle wants a ping at least every 15 s, and pings more often than every "
            "10 ms flood the gateway (the default, 10, leaves room for a busy event loop)",
        ),
    ] = 10.0
    open_timeout_s: Annotated[float, _within(0.1, MAX_WAIT_S, why=_WAIT_WHY)] = 15.0
    ack_timeout_s: Annotated[float, _within(0.1, MAX_WAIT_S, why=_WAIT_WHY)] = 10.0
    liveness_floor_s: float = Field(default=180.0, gt=0)
    liveness_multiplier: float = Field(default=4.0, gt=0)
    # The deadline never grows past this.
    liveness_max_s: Annotated[float, _within(0.1, MAX_WAIT_S, why=_WAIT_WHY)] = 600.0
    # Largest frame processed; up to 4x larger ones are dead-lettered; beyond that the
    # stream stops (1009) until the limit is raised.
    max_frame_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    complete_timeout_s: StopStepSeconds = 10.0  # wait for the server's close
    # After a completed session.
    resubscribe_gap_s: Annotated[float, _within(0, MAX_WAIT_S, why=_WAIT_WHY)] = 10.0
    # Reconnects: jittered, from backoff_initial_s doubling up to backoff_max_s. The floors
    # refuse a loop of upgrades at the gateway (0 or 1e-9 reconnected at once, and OHIP counts
    # the attempts), not the tests' scaled timers; past an hour a stream stays down long
    # after an outage ended.
    backoff_initial_s: Annotated[
        float,
        _within(
            0.01,
            MAX_BACKOFF_S,
            why="the first wait before reconnecting: more often than every 10 ms is a loop of "
            "upgrades at OHIP's gateway, which counts them per application key, and no outage "
            "needs more than an hour (default 1)",
        ),
    ] = 1.0
    backoff_max_s: Annotated[
        float,
        _within(
            0.05,
            MAX_BACKOFF_S,
            why="the longest wait between reconnects: more often than every 50 ms is a loop of "
            "upgrades at OHIP's gateway while it fails, which counts them per application key, "
            "and more than an hour leaves a stream down long after an outage ended "
            "(default 60)",
        ),
    ] = 60.0
    # The waits Oracle names (1006: 4 s; HTTP 429: 2 minutes; 4409: a lockout whose length is
    # unconfirmed). The floors refuse 0 (an attempt at once into the close, lockout or rate
    # limit the gateway just answered), not the tests' scaled timers; past an hour a stream
    # stays down long after the gateway would take it again.
    abnormal_min_s: Annotated[
        float,
        _within(
            0.01,
            MAX_BACKOFF_S,
            why="the least wait after a connection lost without a close frame (1006; Oracle: "
            "wait 4 s): less than 10 ms reconnects in a loop at OHIP's gateway, and more than "
            "an hour leaves a stream down long after the link came back (default 4)",
        ),
    ] = 4.0
    lockout_s: Annotated[
        float,
        _within(
            0.1,
            MAX_BACKOFF_S,
            why="the wait after a 4409 (another consumer, or a session never completed): less "
            "than 100 ms subscribes again into the lockout, and more than an hour leaves a "
            "stream down long after the other consumer left (default 120)",
        ),
    ] = 120.0
    lockout_jitter_s: Annotated[
        float,
        _within(
            0,
            MAX_BACKOFF_S,
            why="added at random to the wait after a 4409: more than an hour leaves a stream "
            "down long after the other consumer left (default 30)",
        ),
    ] = 30.0
    # Consecutive 4409s double the wait up to this.
    lockout_max_s: Annotated[
        float,
        _within(
            0.1,
            MAX_BACKOFF_S,
            why="the longest wait after 4409s in a row: less than 100 ms subscribes again into "
            "the lockout, and more than an hour leaves a stream down long after the other "
            "consumer left (default 480)",
        ),
    ] = 480.0
    rate_limited_s: Annotated[
        float,
        _within(
            0.1,
            MAX_BACKOFF_S,
            why="the wait after HTTP 429 on the upgrade (Oracle: retry after 2 minutes): less "
            "than 100 ms upgrades again into the rate limit the gateway just answered, and "
            "more than an hour leaves a stream down long after it lifted (default 120)",
        ),
    ] = 120.0
    max_auth_failures: int = Field(default=3, ge=1)
    healthy_after_s: Annotated[float, _within(0, MAX_WAIT_S, why=_WAIT_WHY)] = 60.0
    # OHIP: more than 150 upgrades in 2 minutes from one application key -> HTTP 429.
    # Shared by every stream of the same app key (the first stream's values apply). The
    # ceiling: a larger limit (1e9) switched the budget off, and a reconnect loop then spent
    # OHIP's own, whose 429s stop every stream of the key for minutes.
    upgrade_limit: Annotated[
        int,
        _within(
            1,
            OHIP_UPGRADE_LIMIT,
            unit="upgrades",
            why="the upgrades one application key may make in upgrade_window_s: OHIP answers "
            f"HTTP 429 to more than {OHIP_UPGRADE_LIMIT} in 2 minutes, and a larger budget lets "
            "a reconnect loop reach that (default 140, with upgrade_window_s 120)",
        ),
    ] = 140
    upgrade_window_s: Annotated[
        float,
        _within(
            0.5,
            why="the window upgrade_limit counts in: OHIP counts 150 upgrades in 120 s, and "
            "a window of a few milliseconds lets every failing attempt through at once "
            "(default 120)",
        ),
    ] = 120.0
    proxy: ProxyUrl | None = None  # None: no proxy, even if the environment names one
    # Oracle's active/passive check: after connection_ack, ask `query { connection { id
    # status } }` and subscribe only when the gateway says "Inactive" (else poll every
    # status_poll_s). "auto": on in fleet mode. What the gateway scopes the answer to (the
    # application key, or the chain) is unconfirmed: turn it off when several chains share
    # one key and the gateway answers "Active" for all of them.
    status_check: Literal["auto", "on", "off"] = "auto"
    status_poll_s: Annotated[
        float,
        _within(
            0.05,
            why="each poll is a query to the gateway: more often than every 50 ms floods it "
            "(default 30)",
        ),
    ] = 30.0
    # This many "Active" answers in a row: the stream is no longer ready (/readyz, systemd's
    # STATUS=) and a warning says so; it keeps asking. 0: never (a passive standby that
    # should stay ready). An answer other than Active or Inactive counts as none: subscribe.
    status_active_limit: int = Field(default=10, ge=0)
    # A short random wait after "Inactive", before subscribing (Oracle: a randomized delay).
    takeover_jitter_s: Annotated[float, _within(0, MAX_WAIT_S, why=_WAIT_WHY)] = 2.0
    # From connection_init to subscribe, at most (OHIP: "within 10 seconds"; UNCONFIRMED what
    # the gateway does when it passes). Bounds the ack wait, the status answer and the
    # takeover jitter together; when it cannot be met: close 1000, reconnect with backoff.
    subscribe_deadline_s: float = Field(default=10.0, gt=SUBSCRIBE_MARGIN_S)
    # UNCONFIRMED whether OHIP wants (or minds) `Authorization: Bearer <token>` on the HTTP
    # upgrade as well: Oracle's GraphiQL tool and sample send the token only in
    # connection_init, which is confirmed to work. true: send it on the upgrade too (the token
    # of that connection; never to another origin a redirect names).
    upgrade_authorization: bool = False
    # UNCONFIRMED whether OHIP reads an enterpriseId in the connection_init payload: Oracle's
    # sample sends it, its GraphiQL tool does not. true: send auth.enterprise_id there.
    init_enterprise_id: bool = False
    # What a close code whose OHIP meaning is unconfirmed does, instead of the default:
    # "stop" or "reconnect" (with backoff), e.g. { 4403 = "reconnect" } (graphql-ws clients
    # retry 4403; the default stops for a human). Codes: 4403 4406 4408 4429 4500 4504.
    close_actions: dict[str, CloseAction] = {}
    # The subscription's id: a fresh UUID per connection (unique for the stream's lifetime, as
    # Oracle asks), or true: one UUID for every connection of the stream in this process, as
    # Oracle's sample client reuses its id across reconnects.
    reuse_subscription_id: bool = False
    # While the reader waits for room downstream (a sink slow, or down and retried for
    # minutes), reading stops and the gateway's pings, which OHIP wants answered at once,
    # wait too. Once a wait has lasted paused_read_ahead_after_s, it reads on: pings answered,
    # everything else held in order (up to paused_read_ahead_bytes of frames) and handled
    # first when room comes. 0 bytes: off (reading stops for the whole wait). 5 s: a catch-up's
    # waits, a commit's fsync even on a slow disk, stay shorter, so its memory is not the
    # read-ahead's too (engaged, 4 MiB of frames held cost ~10 MB of RSS, measured).
    paused_read_ahead_after_s: float = 5.0
    paused_read_ahead_bytes: int = 4 * 1024 * 1024

    @model_validator(mode="after")
    def _liveness_beyond_pings(self) -> ConnectionSettings:
        # A quiet stream (OHIP between events) shows it is alive by its pongs alone: a floor
        # shorter than the pings' period declared it dead between two of its own pings, and
        # it reconnected for ever (dropped without `complete`).
        if self.liveness_floor_s < LIVENESS_PINGS * self.ping_interval_s:
            raise Problem(
                (
                    "liveness_floor_s",
                    f"is less than {LIVENESS_PINGS:g} x ping_interval_s: a quiet stream has only "
                    "its pongs to show it is alive, and would be declared dead between its own "
                    "pings (reconnecting for ever)",
                    f"raise liveness_floor_s to at least {LIVENESS_PINGS:g} x ping_interval_s "
                    "(defaults: 180 and 10), or lower ping_interval_s",
                )
            )
        return self

    _proxy = field_validator("proxy")(_url_secrets(lone_user=True))

    @model_validator(mode="after")
    def _backoff_order(self) -> ConnectionSettings:
        # The doubling is capped at backoff_max_s: a larger start was silently the cap.
        if self.backoff_initial_s > self.backoff_max_s:
            raise Problem(
                (
                    "backoff_initial_s",
                    f"is above backoff_max_s ({self.backoff_initial_s:g} > "
                    f"{self.backoff_max_s:g}): the backoff starts at backoff_initial_s and "
                    "doubles up to backoff_max_s",
                    "lower backoff_initial_s or raise backoff_max_s (defaults: 1 and 60)",
                )
            )
        return self

    @model_validator(mode="after")
    def _lockout_order(self) -> ConnectionSettings:
        # The doubling starts at lockout_s: a ceiling below it was silently lockout_s, and a
        # lockout_s raised alone (600 over the default 480) never escalated.
        if self.lockout_max_s < self.lockout_s:
            raise Problem(
                (
                    "lockout_max_s",
                    f"is below lockout_s ({self.lockout_max_s:g} < {self.lockout_s:g}): the "
                    "wait after a 4409 starts at lockout_s and doubles up to lockout_max_s",
                    "raise lockout_max_s to at least lockout_s (equal: the wait never doubles), "
                    "or lower lockout_s (defaults: 120 and 480)",
                )
            )
        return self

    @field_validator("paused_read_ahead_after_s", "paused_read_ahead_bytes")
    @classmethod
    def _read_ahead(cls, v: float, info: ValidationInfo) -> float:
        if v < 0:
            fix = (
                "use 0 to read ahead as soon as the reader waits for room, or how many "
                "seconds a wait lasts first (default 5.0: a catch-up's waits are shorter)"
                if info.field_name == "paused_read_ahead_after_s"
                else "use 0 to turn the read-ahead off (pings then wait while the reader "
                "waits), or the bytes of frames it may hold (default 4194304: 4 MiB)"
            )
            raise Problem(("", "is negative", fix))
        return v

    @field_validator("close_actions")
    @classmethod
    def _overridable(cls, v: dict[str, CloseAction]) -> dict[str, CloseAction]:
        allowed = ", ".join(map(str, sorted(OVERRIDABLE)))
        canonical = {str(code) for code in OVERRIDABLE}
        for code in v:
            # As written in the list alone: "04403" beside "4403" was the same code twice (the
            # last won, silently), and 5,000 digits failed int() without a fix.
            if code not in canonical:
                raise Problem(
                    (
                        printable(code, 20),
                        "is not a close code whose OHIP meaning is unconfirmed: its action is "
                        "fixed",
                        f"use one of {allowed}",
                    )
                )
        return v

    def policy(self) -> PolicyConfig:
        return PolicyConfig(
            backoff_initial_s=self.backoff_initial_s,
            backoff_max_s=self.backoff_max_s,
            abnormal_min_s=self.abnormal_min_s,
            lockout_s=self.lockout_s,
            lockout_jitter_s=self.lockout_jitter_s,
            lockout_max_s=self.lockout_max_s,
            rate_limited_s=self.rate_limited_s,
            max_auth_failures=self.max_auth_failures,
            healthy_after_s=self.healthy_after_s,
            close_actions={int(code): action for code, action in self.close_actions.items()},
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

    _app_key = field_validator("app_key")(no_controls)  # the x-app-key header
    _app_key_set = field_validator("app_key")(
        _required("the application key from the developer portal (the key, not its hash)")
    )
    _app_key_long = field_validator("app_key")(
        _long_enough("the application key from the developer portal (the key, not its hash)")
    )

    @field_validator("gateway_url")
    @classmethod
    def _no_user_info(cls, v: str) -> str:
        """OHIP's gateway takes no credentials in the URL (the app key and the OAuth client
        authenticate); websockets refuses one with a user name but no password, and its
        error quotes the whole subscription URL, the key's hash with it."""
        if "@" in urlsplit(v).netloc:
            raise Problem(
                (
                    "",
                    "holds user information (user@ or user:password@): the gateway takes no "
                    "credentials in the URL",
                    "remove the user@ part from gateway_url (credentials go in app_key and "
                    "[streams.<name>.auth])",
                )
            )
        return v

    @field_validator("gateway_url")
    @classmethod
    def _no_subscriptions_path(cls, v: str) -> str:
        """The WebSocket's URL is the gateway's plus ``/subscriptions``; a gateway_url copied
        with that path (Oracle's GraphiQL tool takes it so, and strips it) loses it here, or
        the token endpoint ({gateway_url}/oauth/v1/tokens) and the REST API would be asked
        under /subscriptions: a 404."""
        parts = urlsplit(v)
        path = parts.path.rstrip("/")
        if not path.endswith("/subscriptions"):
            return v
        path = path.removesuffix("/subscriptions")
        return MaskedUrl(urlunsplit(parts._replace(path=path)).rstrip("/"))

    # After _no_user_info: a secret-looking query value (user information is refused above).
    _gateway_secrets = field_validator("gateway_url")(_url_secrets(lone_user=False))

    @model_validator(mode="after")
    def _init_enterprise_id(self) -> StreamSettings:
        if self.connection.init_enterprise_id and not self.auth.enterprise_id:
            raise Problem(
                (
                    "connection.init_enterprise_id",
                    "true sends auth.enterprise_id in connection_init, and it is not set",
                    "set auth.enterprise_id (the environment card's Enterprise ID), or "
                    "init_enterprise_id = false",
                )
            )
        return self

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

    def warnings(self) -> list[tuple[str, str, str]]:
        """What is valid but probably wrong, as (key under the stream's table, what, fix):
        check-config prints it, and the stream logs it when it starts."""
        found: list[tuple[str, str, str]] = []
        if self.auth.grant == "client_credentials" and not self.auth.enterprise_id:
            found.append(
                (
                    "auth.enterprise_id",
                    'not set with grant = "client_credentials": OCIM environments (the '
                    "client-credentials ones) require the enterpriseId header on the token "
                    "request, and refuse the credentials without it",
                    "set enterprise_id to the Enterprise ID of the portal's environment card "
                    '(or use grant = "password" for an SSD environment)',
                )
            )
        ping = self.connection.ping_interval_s
        if ping < PING_WARNING_S and not is_loopback(urlsplit(self.gateway_url).hostname):
            found.append(
                (
                    "connection.ping_interval_s",
                    f"is {ping:g} s, under {PING_WARNING_S:g} s, to a gateway that is not "
                    "loopback: a ping that often floods it (Oracle wants one every 15 s at "
                    "least; timers that short are for the sandbox on this host)",
                    "set it to 10 (the default), or at least 1",
                )
            )
        c = self.connection
        # OHIP counts upgrades over 2 minutes; a short window lets upgrade_limit come round
        # again inside them (150 in 0.5 s: some 36,000 in 2 minutes, the budget switched off).
        per_two_minutes = c.upgrade_limit * math.ceil(120 / c.upgrade_window_s)
        if per_two_minutes > OHIP_UPGRADE_LIMIT and not is_loopback(
            urlsplit(self.gateway_url).hostname
        ):
            found.append(
                (
                    "connection.upgrade_window_s",
                    f"is {c.upgrade_window_s:g} s with upgrade_limit {c.upgrade_limit}: up to "
                    f"{per_two_minutes} upgrades in 2 minutes, where OHIP answers HTTP 429 past "
                    f"{OHIP_UPGRADE_LIMIT} (short windows are for the sandbox on this host)",
                    "set upgrade_window_s to 120 (the default), or lower upgrade_limit",
                )
            )
        return found


def _parsable_dsn(v: SecretStr | None) -> SecretStr | None:
    """A DSN the driver would misread is refused here, as ``run`` would refuse it (so
    check-config and every command say so too), never quoting it."""
    if v is not None and not Target(v.get_secret_value()).parsable:
        raise Problem(("", UNPARSABLE, UNPARSABLE_FIX))
    return v


MAX_RETENTION_DAYS = 365.0


class StateSettings(_Model):
    # ``schema`` is a (deprecated) method of pydantic's BaseModel: the field is ``schema_``,
    # read and shown as ``schema``.
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        serialize_by_alias=True,
        allow_inf_nan=False,
        hide_input_in_errors=True,
    )

    # Where the state lives: "sqlite" (a file beside the daemon, the default) or "postgres"
    # (a schema in a PostgreSQL database; dsn required).
    backend: Literal["sqlite", "postgres"] = "sqlite"
    # The SQLite file; with backend = "postgres" still the place of the lease (``<path>.lock``).
    path: Annotated[Path, BeforeValidator(_file("opera-consumer.db"))] = Path("opera-consumer.db")
    # FULL survives power loss; NORMAL survives any process crash and is a bit faster (SQLite).
    synchronous: Literal["normal", "full"] = "full"
    # "adaptive": commit as soon as the previous commit is done (an event on a quiet stream is
    # durable within one commit's time; under load a commit takes whatever gathered meanwhile).
    # "interval": commit every commit_max_events events or commit_interval_ms, whichever first.
    commit_mode: Literal["adaptive", "interval"] = "adaptive"
    # Adaptive: commits start at most this often (each is two fsyncs and about a millisecond
    # of CPU: at 1,000 events/s back-to-back commits cost a third of a core). 0: no limit.
    commit_min_interval_ms: int = Field(default=10, ge=0, le=1000)
    commit_max_events: int = Field(default=500, ge=1)
    commit_interval_ms: int = Field(default=100, ge=1)
    # OHIP keeps 7 days of events, and may send any of them again (a redelivery, an `offset
    # set` back): their ids must outlive that to be skipped. 8: a day's margin. Kept longer,
    # ids OHIP can no longer send only grow the store (1e9 days: never pruned).
    processed_retention_days: Annotated[
        float,
        _within(
            7,
            MAX_RETENTION_DAYS,
            unit="days",
            why="OHIP retains events for 7 days and may send any of them again (a "
            "redelivery, an `offset set` back): ids pruned sooner let those be written twice, "
            "and ids kept for more than a year only grow the state store (OHIP never sends "
            "them again; default 8)",
        ),
    ] = 8.0
    prune_interval_s: Annotated[
        float,
        _within(1, why="each prune is a DELETE over the processed ids (default 3600)"),
    ] = 3600.0
    # PostgreSQL only. dsn: postgresql://user:password@host:5432/db (a secret: it may hold a
    # password; OPERA_CONSUMER_STATE__DSN or a secret file state__dsn).
    dsn: SecretStr | None = None
    schema_: str = Field(default="opera_consumer", alias="schema")  # created if missing
    pool_min: int = Field(default=1, ge=1)
    pool_max: int = Field(default=4, ge=1)
    # Connect, and each statement; also the stop's last commit (stop_budget).
    timeout_s: Annotated[float, Field(gt=0), _within(0, MAX_STOP_STEP_S, why=_STOP_STEP_WHY)] = 10.0
    # A daemon outside a fleet checks its lease's connection this often (each check within
    # timeout_s): after a server restart or the session's end it takes the lease again, or
    # stops at once (exit 78) if another daemon took it meanwhile.
    lease_check_interval_s: float = Field(default=5.0, gt=0)

    _dsn = field_validator("dsn")(_parsable_dsn)
    # A user name alone is no secret in a DSN (peer or .pgpass authentication).
    _dsn_secrets = field_validator("dsn")(_url_secrets(lone_user=False))

    @field_validator("schema_")
    @classmethod
    def _schema(cls, v: str) -> str:
        if not _IDENTIFIER.fullmatch(v):
            raise Problem(
                (
                    "",
                    "is not an SQL identifier",
                    "use letters, digits and '_' (at most 63), e.g. 'opera_consumer'",
                )
            )
        if v.lower().startswith("pg_"):
            raise Problem(
                ("", "names starting with 'pg_' are reserved by PostgreSQL", "choose another")
            )
        return v

    @model_validator(mode="after")
    def _backend_fields(self) -> StateSettings:
        if self.backend == "postgres":
            problems: list[tuple[str, str, str]] = []
            if self.dsn is None:
                problems.append(
                    (
                        "dsn",
                        "backend = 'postgres' needs dsn (a secret)",
                        "set OPERA_CONSUMER_STATE__DSN, or put it in a file named state__dsn "
                        "in $CREDENTIALS_DIRECTORY or /run/secrets, or set dsn in [state] "
                        '(postgresql://user:password@host:5432/db), or use backend = "sqlite"',
                    )
                )
            if self.pool_min > self.pool_max:
                problems.append(
                    (
                        "pool_min",
                        f"is above pool_max ({self.pool_min} > {self.pool_max})",
                        "lower pool_min or raise pool_max",
                    )
                )
            if problems:
                raise Problem(*problems)
            return self
        # Keys of the PostgreSQL store with the SQLite one: a forgotten backend = "postgres"
        # would otherwise keep the state in a local file without a word.
        ignored = sorted(
            ("schema" if name == "schema_" else name)
            for name in self.model_fields_set
            & {"dsn", "schema_", "pool_min", "pool_max", "timeout_s", "lease_check_interval_s"}
        )
        if ignored:
            raise Problem(
                *(
                    (
                        name,
                        "applies to backend = 'postgres' only, and backend is 'sqlite'",
                        f'set backend = "postgres" to use it, or remove {name}',
                    )
                    for name in ignored
                )
            )
        return self


MAX_LEASE_TTL_S = 3600.0

# How long the workers a stream's stop cancels have to end (consumer.runtime.pipeline, which
# uses it). One still running then is in code that swallows its cancellation (a handler that
# catches BaseException and goes on; nats-py while its outbound buffer is full swallows one):
# cancelled once more halfway (one swallowed cancellation is no reason to give up on it), then
# abandoned, so that the stop goes on. Its events are not done, even when its write ends later
# (recorded nowhere then: the stream is forgotten, perhaps taken again): no commit covers them,
# and the next start replays them. Here because a write may still complete within it: the
# self-fence (FleetSettings.self_fence_after_s) leaves room for it before a lease can expire.
CANCEL_GRACE_S = 2.0

# Weights are relative: 1000 to 1 is more than any fleet needs, and keeps the shares' sums
# finite (1e308 overflowed to infinity: every tick failed, or every share was 0).
MAX_FLEET_WEIGHT = 1000.0
# A stream a member cannot connect is handed over after this many leases' TTLs by default, at
# most a day: longer, and an operator's `fleet drain` comes first anyway.
RELEASE_UNREACHABLE_TTLS = 3
MAX_RELEASE_UNREACHABLE_S = 86400.0


# FleetSettings.self_fence_after_s, for the messages.
SELF_FENCE_RULE = (
    f"lease_ttl_s - max(2 x renew_interval_s, renew_interval_s + {CANCEL_GRACE_S:g} s)"
)


class FleetSettings(_Model):
    """Fleet mode: identical daemons sharing the PostgreSQL state store split the streams
    between them, each holding leases (with epochs that fence a member that lost one)."""

    enabled: bool = False
    # This member's name in `fleet status` and the lease rows; "" = "<host>:<pid>".
    member: str = Field(default="", max_length=200)
    # Share of the streams, relative to the other members' weights (0: hold none).
    weight: float = Field(default=1.0, ge=0)
    # A lease not renewed for this long may be taken by another member. Long enough for a
    # stream handed over to stop (fleet_handover_s) with a tick to spare: checked. At most an
    # hour: a member killed -9 holds its streams that long (a year's TTL: never taken over).
    lease_ttl_s: Annotated[
        float,
        Field(gt=0),
        _within(
            0,
            MAX_LEASE_TTL_S,
            why="the streams of a member that died (kill -9, a lost host) wait that long "
            "before another member takes them over (default 60)",
        ),
    ] = 60.0
    # Heartbeat, lease renewal and rebalancing, once per tick (one statement renews all).
    # Also the stop's leave: 2 ticks (stop_budget).
    renew_interval_s: Annotated[
        float, Field(gt=0), _within(0, MAX_STOP_STEP_S, why=_STOP_STEP_WHY)
    ] = 5.0
    # A stream not ready (no subscription, a lockout aside) for this long is handed over, if
    # another member shows it reaches the gateway (consumer.core.failover); 0: never. Unset:
    # RELEASE_UNREACHABLE_TTLS x lease_ttl_s. At least twice lease_ttl_s: checked.
    release_unreachable_after_s: (
        Annotated[
            float,
            Field(ge=0),
            _within(
                0,
                MAX_RELEASE_UNREACHABLE_S,
                why="a stream this member cannot connect waits that long for another member "
                "(default 3 x lease_ttl_s)",
            ),
        ]
        | None
    ) = None

    @field_validator("member")
    @classmethod
    def _printable_member(cls, v: str) -> str:
        bad = unprintable_char(v)
        if bad:
            raise Problem(
                (
                    "",
                    f"contains {bad}",
                    "use printable characters only: the name goes to PostgreSQL (which "
                    "refuses a NUL in every statement and at connect), the logs and "
                    "`fleet status`",
                )
            )
        return v

    @field_validator("weight")
    @classmethod
    def _bounded_weight(cls, v: float) -> float:
        if v > MAX_FLEET_WEIGHT:
            raise Problem(
                (
                    "",
                    f"is above {MAX_FLEET_WEIGHT:g}",
                    "weights only count relative to each other: scale them down (e.g. 1, 2 "
                    f"and 4), to at most {MAX_FLEET_WEIGHT:g}",
                )
            )
        return v

    @model_validator(mode="after")
    def _timers(self) -> FleetSettings:
        tick, ttl = self.renew_interval_s, self.lease_ttl_s
        if tick * 4 > ttl:
            raise Problem(
                (
                    "renew_interval_s",
                    f"leaves too little time to renew ({tick} s ticks, a {ttl} s lease): a "
                    f"member stops its streams {SELF_FENCE_RULE} after its last renewal",
                    "keep renew_interval_s at most a quarter of lease_ttl_s",
                )
            )
        # With the sink's grace (ticks under CANCEL_GRACE_S) a quarter is not enough: the
        # self-fence must still leave two ticks to renew, as a quarter does without it.
        if self.self_fence_after_s < 2 * tick:
            needed = 3 * tick + CANCEL_GRACE_S
            most = math.floor((ttl - CANCEL_GRACE_S) / 0.03) / 100  # down to 0.01 s
            raise Problem(
                (
                    "lease_ttl_s",
                    f"leaves too little time to renew ({ttl:g} s lease, {tick:g} s ticks): a "
                    f"member stops its streams {SELF_FENCE_RULE} after its last renewal (the "
                    f"{CANCEL_GRACE_S:g} s: for a sink write under way to end before the lease "
                    f"can expire), {self.self_fence_after_s:g} s here, less than two ticks: "
                    "one late renewal would stop every stream of a healthy member",
                    f"raise lease_ttl_s to at least {needed:g}"
                    + (f", or lower renew_interval_s to at most {most:g}" if most > 0 else ""),
                )
            )
        after = self.release_unreachable_after_s
        if after is not None and 0 < after < 2 * self.lease_ttl_s:
            raise Problem(
                (
                    "release_unreachable_after_s",
                    f"is below twice lease_ttl_s ({after:g} s, a {self.lease_ttl_s:g} s "
                    "lease): another member's connection counts as evidence that it reaches "
                    "the gateway for lease_ttl_s, so during a gateway outage for every member "
                    "streams could be handed around before that evidence ages",
                    f"set it to at least {2 * self.lease_ttl_s:g} (or 0: never hand a stream "
                    "over for want of the gateway; unset: 3 x lease_ttl_s)",
                )
            )
        return self

    @property
    def release_after_s(self) -> float:
        """How long a stream this member runs may stay unconnected before it is handed
        over (0: never)."""
        after = self.release_unreachable_after_s
        return RELEASE_UNREACHABLE_TTLS * self.lease_ttl_s if after is None else after

    @property
    def self_fence_after_s(self) -> float:
        """Without a renewal for this long a member stops its streams, before anyone may
        take them: the lease lasts lease_ttl_s from the renewal's start, and the stop gives
        a worker stuck in a sink write CANCEL_GRACE_S to end (its write may complete within
        it). Two ticks before the expiry at least, the grace and a tick with short ticks."""
        tick = self.renew_interval_s
        return self.lease_ttl_s - max(2 * tick, tick + CANCEL_GRACE_S)


# runtime.daemon.stop_stream: a stream handed over has complete_timeout_s + this to close,
# then drain_timeout_s to drain, then complete_timeout_s + this again for its last commit.
STOP_GRACE_S = 2.0


def fleet_handover_s(connection: ConnectionSettings, pipeline: PipelineSettings) -> float:
    """The longest a fleet member may take to hand a stream over (stop it gracefully)."""
    return 2 * (connection.complete_timeout_s + STOP_GRACE_S) + pipeline.drain_timeout_s


# What a stop may take beyond its bounded steps (cancelling tasks; closing the sink, the HTTP
# client and the store, each within its own timeout): asked of systemd with them.
STOP_SLACK_S = 5.0
# The grace the compose file, the README (`docker stop -t 50`) and the systemd unit
# (TimeoutStopSec=) give a stop: the defaults' 44 s and STOP_SLACK_S; a plain `docker stop`
# gives 10 s, Kubernetes 30 s.
DOCUMENTED_STOP_S = 50.0

# The top-level event_loop setting (consumer.event_loop).
EventLoop = Literal["auto", "asyncio", "uvloop"]
StopStep = Literal["streams_s", "drain_s", "handovers_s", "commit_s", "leave_s", "close_s"]


@dataclass(frozen=True)
class StopBudget:
    """The longest each step of the daemon's stop (runtime.daemon.close) may take, in order:
    the one place that adds them up (the stop bounds each, and asks systemd for the rest)."""

    streams_s: float  # `complete` sent: until the servers close, then cut
    drain_s: float  # the queues drained, or the rest replayed at the next start
    handovers_s: float  # fleet: handovers under way end as they would have (fleet_handover_s)
    # The final commit: the state store's timeout_s (connect, each statement) and a grace. Not
    # cut by the stop: one slower still is ended by systemd's kill, as before (replayed).
    commit_s: float
    leave_s: float  # fleet: the leases released and the fleet left, each within a tick
    # The resources closed: a NATS or Redis sink's connection to a server that does not
    # answer (frozen, the socket's buffers full) holds the close for the sink's timeout_s.
    close_s: float

    def left(self, step: StopStep) -> float:
        """From the start of ``step`` to the end of the stop."""
        names = [f.name for f in fields(self)]
        return float(sum(getattr(self, n) for n in names[names.index(step) :]))

    @property
    def total_s(self) -> float:
        return self.left("streams_s")


def stop_budget(settings: Settings) -> StopBudget:
    streams, p, f = settings.streams.values(), settings.pipeline, settings.fleet
    return StopBudget(
        streams_s=max(s.connection.complete_timeout_s for s in streams) + STOP_GRACE_S,
        drain_s=p.drain_timeout_s,
        handovers_s=max(fleet_handover_s(s.connection, p) for s in streams) if f.enabled else 0.0,
        commit_s=settings.state.timeout_s + STOP_GRACE_S,
        leave_s=2 * f.renew_interval_s if f.enabled else 0.0,
        close_s=_sink_close_s(settings.sink),
    )


def _sink_close_s(sink: SinkSettings) -> float:
    """How long closing the sink may take: a NATS or Redis sink aborts its connection after
    its timeout_s (unbounded in the settings: capped as the other steps are)."""
    if isinstance(sink, NatsSinkSettings | RedisSinkSettings):
        return min(sink.timeout_s, MAX_STOP_STEP_S)
    return 0.0


class JsonlSinkSettings(_Model):
    type: Literal["jsonl"] = "jsonl"
    path: Annotated[Path, BeforeValidator(_file("events.jsonl"))] = Path("events.jsonl")
    fsync: bool = True  # off: a power loss may lose lines the checkpoint already covers
    # Rotation (README "jsonl"): none unless rotate_bytes or rotate_interval_s is set.
    rotate_bytes: int | None = Field(default=None, gt=0)
    rotate_interval_s: int | None = Field(default=None, gt=0)
    rotate_name: str | None = None  # strftime pattern (UTC); default <stem>-%Y%m%dT%H%M%SZ.jsonl
    keep_files: int | None = Field(default=None, gt=0)  # rotated files kept besides the current
    keep_days: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _rotation(self) -> JsonlSinkSettings:
        rotating = self.rotate_bytes is not None or self.rotate_interval_s is not None
        problems: list[tuple[str, str, str]] = []
        for key in ("rotate_name", "keep_files", "keep_days"):
            if getattr(self, key) is not None and not rotating:
                problems.append(
                    (
                        key,
                        "has no effect: no rotation is configured",
                        f"set rotate_bytes and/or rotate_interval_s, or remove {key}",
                    )
                )
        pattern = self.rotate_name or default_pattern(self.path)
        if rotating or self.rotate_name is not None:
            try:
                check_pattern(pattern)
            except PatternError as exc:
                key = "rotate_name" if self.rotate_name is not None else "path"
                problems.append((key, exc.what, exc.fix))
        if problems:
            raise Problem(*problems)
        interval = self.rotate_interval_s
        if interval is not None and not distinguishes(pattern, interval):
            raise Problem(
                (
                    "rotate_name",
                    f"does not tell successive {interval} s intervals apart (their files' "
                    "names would differ only by their sequence numbers)",
                    "add strftime fields as fine as the interval (e.g. %Y%m%d for days, %H "
                    "for hours, %M for minutes), or leave rotate_name out for the default",
                )
            )
        return self

    def rotation(self) -> Rotation | None:
        if self.rotate_bytes is None and self.rotate_interval_s is None:
            return None
        return Rotation(
            self.rotate_name or default_pattern(self.path),
            max_bytes=self.rotate_bytes,
            interval_s=self.rotate_interval_s,
            keep_files=self.keep_files,
            keep_days=self.keep_days,
        )


# Headers the webhook sink sets on every request itself.
_WEBHOOK_OWN_HEADERS = {
    "content-type": "every body is application/json",
    "idempotency-key": "the event's uniqueEventId (a batch's: batch- and a digest of its ids)",
    "x-opera-stream": "the stream's name",
}


def _after_scheme(value: str) -> str:
    """The credentials of "<scheme> <credentials>" (as webhook_secret_values takes them)."""
    return value.partition(" ")[2].strip()


_SINK_TOKEN_FIX = secret_fix(["sink", "token"])
_SINK_PASSWORD_FIX = secret_fix(["sink", "password"])


class WebhookSinkSettings(_Model):
    type: Literal["webhook"]
    url: WebhookUrl
    batch_size: int = Field(default=1, ge=1, le=1000)  # 1: one event per POST; more: JSON array
    headers: Headers = {}
    auth: Literal["none", "bearer", "basic"] = "none"
    token: SecretStr | None = None  # bearer
    username: str | None = None  # basic
    password: SecretStr | None = None  # basic
    timeout_s: float = Field(default=10.0, gt=0)
    # A request answered 409 (what a receiver honouring Idempotency-Key answers while it still
    # processes the first try of the key) is tried again for this long, then the receiver's
    # refusal: one that answers 409 for good would otherwise hold the stream for ever.
    conflict_retry_s: Annotated[
        float,
        _within(
            0.1,
            86400.0,
            why="how long the receiver may take over the first try of a key before its 409 is "
            "a refusal (default 300)",
        ),
    ] = 300.0

    _token = field_validator("token")(no_controls)  # the Authorization header
    _token_long = field_validator("token")(_long_enough("the receiver's bearer token"))
    _password = field_validator("password")(_long_enough("the receiver's password"))
    _url_long = field_validator("url")(_url_secrets(lone_user=True))

    @field_validator("headers")
    @classmethod
    def _header_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        """A secret-looking header's value, its credentials after a scheme ("Bearer x") and
        the password of Basic ones: all are masked in logs (webhook_secret_values), so none may
        be 1-3 characters (as auth = "basic" refuses a short password)."""
        problems = []
        for name, value in v.items():
            if not is_secret_name(name) or name.lower() in _WEBHOOK_OWN_HEADERS:
                continue  # not a secret, or refused as such below
            if short_secret(value) or (" " in value and short_secret(_after_scheme(value))):
                what = "its value"
            elif (basic := basic_credentials(value)) is not None and short_secret(basic[1]):
                what = "the password its Basic credentials encode"
            else:
                continue
            fix = (
                "use the real credential (at least 4 characters, after a scheme such as "
                "Bearer too, and the password of Basic credentials)"
            )
            problems.append(("", f"header {name!a}: {what} {SHORT_SECRET}", fix))
        if problems:
            raise Problem(*problems)
        return v

    @model_validator(mode="after")
    def _auth_fields(self) -> WebhookSinkSettings:
        # Named by key, with where a secret may come from (a credential under systemd).
        missing: list[tuple[str, str, str]] = []
        if self.auth == "bearer" and self.token is None:
            missing.append(("token", "auth = 'bearer' needs token (a secret)", _SINK_TOKEN_FIX))
        if self.auth == "basic" and not self.username:
            missing.append(("username", "auth = 'basic' needs username", "set sink.username"))
        if self.auth == "basic" and self.password is None:
            missing.append(
                ("password", "auth = 'basic' needs password (a secret)", _SINK_PASSWORD_FIX)
            )
        if missing:
            raise Problem(*missing)
        # Given but not sent (auth = "none" sends no Authorization): the receiver answers 401,
        # a permanent refusal, and every event went to the DLQ with the config called OK.
        unused = [
            (key, f"has no effect with auth = {self.auth!r}", f'set auth = "{needs}", or remove it')
            for key, needs, given in (
                ("token", "bearer", self.token is not None),
                ("username", "basic", bool(self.username)),
                ("password", "basic", self.password is not None),
            )
            if given and self.auth != needs
        ]
        if unused:
            raise Problem(*unused)
        for name in self.headers:
            lower = name.lower()
            if lower in _WEBHOOK_OWN_HEADERS:
                # Given, it was silently replaced by the sink's own: say so at load instead.
                raise Problem(
                    (
                        "headers",
                        f"header {name!a} is the sink's own: {_WEBHOOK_OWN_HEADERS[lower]}",
                        "remove it",
                    )
                )
            if lower == "authorization" and self.auth != "none":
                raise Problem(
                    (
                        "headers",
                        f"header {name!a} beside auth = {self.auth!r}: one request carries one",
                        'remove the header, or set auth = "none" to send the header as given',
                    )
                )
            if lower == "authorization" and "@" in urlsplit(self.url).netloc:
                raise Problem(
                    (
                        "headers",
                        f"header {name!a} beside user information (user:password@) in sink.url: "
                        "one request carries one",
                        "remove the header, or the user information from sink.url",
                    )
                )
        if self.auth != "none" and "@" in urlsplit(self.url).netloc:
            # One request has one Authorization header: the URL's user:password or the token.
            raise Problem(
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
    path: Annotated[Path, BeforeValidator(_file("events.db"))] | None = None
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
    _dsn = field_validator("dsn")(_parsable_dsn)
    _dsn_secrets = field_validator("dsn")(_url_secrets(lone_user=False))  # as the state's

    @model_validator(mode="after")
    def _pool(self) -> PostgresSinkSettings:
        if self.pool_min > self.pool_max:
            raise ValueError(
                f"pool_min ({self.pool_min}) is above pool_max ({self.pool_max}): lower "
                "pool_min or raise pool_max"
            )
        return self


class PythonSinkSettings(_Model):
    type: Literal["python"]
    target: str  # "package.module:function", an async function taking (stream, events)
    # Exception types (dotted names) that mean "retry later"; ConnectionError, TimeoutError
    # and opera-consumer's TransientSinkError always do, as does an exception whose
    # `transient` attribute is True. Anything else is permanent: the event is dead-lettered.
    transient_exceptions: tuple[str, ...] = ()
    # A call that has not returned by then is cancelled and retried (transient): a handler
    # hung on a dead connection would hold its worker, then the reader, for ever. Generous:
    # a batch is up to [pipeline] batch_max events, and a slow handler must not loop on it.
    timeout_s: float = Field(default=300.0, gt=0)

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        if not is_async_callable(resolve(v)):
            raise Problem(
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
    beside = CONFIG_DIR.get()
    if beside is not None and str(beside) not in sys.path:
        # After the installed packages: a module named like one of them cannot shadow it.
        sys.path.append(str(beside))
    try:
        obj: Any = importlib.import_module(mod)
    except ImportError as exc:
        raise ValueError(f"cannot import module {mod!r}: {printable(exc, 300)}") from None
    except KeyboardInterrupt:
        raise  # ^C while a slow module imports: the operator's, not the module's
    except BaseException as exc:  # its code failed: a SyntaxError, or what it raised
        # BaseException: sys.exit() at import (a "required variable missing" idiom) went
        # through the validator: check-config and run ended with its status (0: systemd's
        # "stopped on request") or a bare message, naming no key.
        raise Problem(
            (
                "",
                f"importing module {mod!r} failed: {type(exc).__name__}: {printable(exc, 300)}",
                f"fix the module (python -c 'import {mod}' shows the traceback)",
            )
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {mod!r} has no attribute {attr!r}") from None
    return obj


def _destination(key: str, check: Callable[[str], None]) -> Callable[[str], str]:
    """A validator of a sink's destination template (or name): checked as the sink will
    check it, so that check-config refuses it before anything connects. It raises a
    ConfigError, not a Problem: pydantic lets that through as it is, so sink settings built
    in code fail as the sink's constructor did before."""

    def validate(v: str) -> str:
        try:
            check(v)
        except TemplateError as exc:
            raise ConfigError(exc.at(key, v)) from None
        return v

    return validate


class NatsSinkSettings(_Model):
    """NATS JetStream: each event published to a subject from ``subject`` and acknowledged by
    the stream, with ``Nats-Msg-Id`` = uniqueEventId (JetStream's duplicate window drops a
    replay within ``duplicate_window_s``)."""

    type: Literal["nats"]
    servers: tuple[AnyUrl, ...] = ("nats://127.0.0.1:4222",)  # nats:// or tls://
    # Tokens: {chainCode} (the stream's), {hotelId}, {eventName}, {moduleName}, {stream};
    # each value sanitised to a subject token ('.', '*', '>' and spaces become '_').
    subject: str = "opera.{chainCode}.{hotelId}.{eventName}"
    stream: str = "OPERA"  # the JetStream stream
    stream_subjects: tuple[str, ...] = ("opera.>",)  # when it creates the stream
    on_start: Literal["create", "must-exist"] = "create"  # the stream: create or check it
    # Must exceed the longest a replay can come after its publish (a crash, then a restart):
    # JetStream forgets message ids after it.
    duplicate_window_s: float = Field(default=86400.0, gt=0)
    # Copies of the stream when the daemon creates it (JetStream clustered: up to 5, at most
    # the cluster's servers). One copy: the loss of its server loses what it acknowledged.
    replicas: int = Field(default=1, ge=1, le=5)
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    nkey_seed: SecretStr | None = None
    creds_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    timeout_s: float = Field(default=10.0, gt=0)

    _subject = field_validator("subject")(
        _destination("sink.subject", lambda v: check_subject(Template(v)))
    )
    _stream = field_validator("stream")(_destination("sink.stream", check_stream_name))
    _password = field_validator("password")(_long_enough("the NATS user's password"))
    _token = field_validator("token")(_long_enough("the NATS server's token"))
    _nkey_seed = field_validator("nkey_seed")(_long_enough("the user's NKEY seed (SU...)"))
    # nats://TOKEN@host: a user name alone is a token.
    _servers = field_validator("servers")(_url_secrets(lone_user=True))


class RedisSinkSettings(_Model):
    """Redis Streams: ``XADD`` to a key from ``stream_key``, guarded by uniqueEventId in the
    same atomic script (a replay adds nothing while the guard lives)."""

    type: Literal["redis"]
    url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")  # redis:// or rediss:// (TLS)
    # Tokens as for NATS subjects: {chainCode}, {hotelId}, {eventName}, {moduleName}, {stream};
    # a literal brace is {{ or }} (a Redis Cluster hash tag: "opera:{{{chainCode}}}").
    stream_key: str = "opera:{chainCode}"
    maxlen: int | None = Field(default=None, ge=1)  # XADD MAXLEN ~ this (None: no trimming)
    # How long a uniqueEventId's guard lives: a replay later than this after the write (a
    # restart after a long outage, a `dlq replay` days on) adds the event again.
    # OHIP keeps 7 days of events and replays inclusively: 8 days (+1); under 7, warned at
    # start (GUARD_TTL_WARNING_S). Under a minute no value can be meant (a millisecond was
    # accepted: every replay written again). At most ten years: far larger, its PX in
    # milliseconds passes Redis's 64-bit integers, the SET after the XADD fails in the script,
    # and each retry would add the event again.
    guard_ttl_s: Annotated[
        float,
        Field(le=10 * 365 * 86400.0),
        _within(
            60,
            why="the guard is how long a replayed event is still known as written (OHIP "
            "keeps 7 days and replays inclusively): under a minute, events replayed after a "
            "reconnect or a restart are added again (default 691200: 8 days)",
        ),
    ] = 8 * 86400.0
    username: str | None = None  # ACL user (or in the url; these two win over the url's)
    password: SecretStr | None = None
    tls_ca_file: Path | None = None
    timeout_s: float = Field(default=10.0, gt=0)
    # WAIT after each batch: it counts as written (and is checkpointed) only once this many
    # replicas acknowledged it (Redis replicates asynchronously: a failover before that loses
    # what the primary acknowledged). 0: no WAIT. wait_timeout_ms: at most this long per
    # batch; never 0 (WAIT 0 blocks for ever), and below timeout_s (the socket's timeout).
    wait_replicas: int = Field(default=0, ge=0, le=100)
    wait_timeout_ms: int = Field(default=1000, ge=1, le=60_000)

    _stream_key = field_validator("stream_key")(
        _destination("sink.stream_key", lambda v: check_key(Template(v)))
    )
    _password = field_validator("password")(_long_enough("the Redis user's password"))

    @field_validator("url")
    @classmethod
    def _url_credentials(cls, v: SecretStr) -> SecretStr:
        # redis-py reads the URL as urlsplit does: a raw '/' in a password ends it early.
        try:
            misread = misread_user_information(v.get_secret_value())
        except ValueError:
            misread = False  # the sink's own check says what is wrong, without the URL
        if misread:
            raise misread_problem(PERCENT_ENCODE_FIX)
        _url_secrets(lone_user=False)(v)  # redis://user@host: an ACL user alone, no secret
        return v

    @model_validator(mode="after")
    def _wait_within_timeout(self) -> RedisSinkSettings:
        if self.wait_replicas and self.wait_timeout_ms >= self.timeout_s * 1000:
            raise Problem(
                (
                    "wait_timeout_ms",
                    f"{self.wait_timeout_ms} ms is not below timeout_s ({self.timeout_s:g} s): "
                    "the connection would time out before WAIT answers",
                    "lower wait_timeout_ms, or raise timeout_s",
                )
            )
        return self


SINK_TYPES = ("jsonl", "webhook", "sqlite", "postgres", "python", "nats", "redis")
# OHIP keeps 7 days of events and may send any of them again: a Redis guard living less is
# warned about (a replay reaching further back adds the event again).
GUARD_TTL_WARNING_S = 7 * 86400.0


# The state store's files (SQLite): its database, its journals, and the lease beside it (kept
# with backend = "postgres" too).
STATE_COMPANIONS = ("", "-wal", "-shm", "-journal", ".lock")


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: the path as written
        return path


# What loading._PLACEHOLDER begins with: a secret a command was loaded without (not yet an
# UnsetSecret while the settings validate).
SECRET_NOT_GIVEN = "opera-consumer-secret-not-given-"


def _given(secret: SecretStr) -> str | None:
    """The secret's value, or None when this command was loaded without it."""
    try:
        value = secret.get_secret_value()
    except ConfigError:  # loading.UnsetSecret
        return None
    return None if value.startswith(SECRET_NOT_GIVEN) else value


def _subscription_of(stream: StreamSettings) -> tuple[str, str]:
    """What OHIP tells a subscription by, besides the application key: the gateway and the
    chain (the URL's scheme and host in lowercase, its default port spelt out)."""
    parts = urlsplit(stream.gateway_url)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    host = (parts.hostname or "").lower()
    return f"{parts.scheme.lower()}://{host}:{port}{parts.path.rstrip('/')}", stream.chain_code


def _hotels_overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """No hotel codes: every hotel. Codes are not case-sensitive (as `sink adopt` reads)."""
    return not a or not b or bool({h.casefold() for h in a} & {h.casefold() for h in b})


def _sink_type(v: Any) -> str:
    # A [sink] table without `type` is the jsonl sink (as before there was a choice).
    t = v.get("type", "jsonl") if isinstance(v, dict) else getattr(v, "type", "jsonl")
    return str(t)


SinkSettings = Annotated[
    Annotated[JsonlSinkSettings, Tag("jsonl")]
    | Annotated[WebhookSinkSettings, Tag("webhook")]
    | Annotated[SqliteSinkSettings, Tag("sqlite")]
    | Annotated[PostgresSinkSettings, Tag("postgres")]
    | Annotated[PythonSinkSettings, Tag("python")]
    | Annotated[NatsSinkSettings, Tag("nats")]
    | Annotated[RedisSinkSettings, Tag("redis")],
    Discriminator(
        _sink_type,
        custom_error_type="sink_type",
        custom_error_message=f"type must be one of {', '.join(SINK_TYPES)}",
    ),
]


class FilterSettings(_Model):
    """Which events reach the sink: each list holds exact names or glob patterns (``*``,
    ``?``, ``[...]``); an empty include list lets everything through. An event filtered out
    still advances the checkpoint, is counted by reason, and is never dead-lettered."""

    event_names: tuple[str, ...] = ()
    exclude_event_names: tuple[str, ...] = ()
    module_names: tuple[str, ...] = ()
    exclude_module_names: tuple[str, ...] = ()
    hotel_ids: tuple[str, ...] = ()
    exclude_hotel_ids: tuple[str, ...] = ()


class HttpSettings(_Model):
    """The one pooled HTTP client of the process: tokens, webhook, orchestration."""

    max_connections: int = Field(default=20, ge=1)
    max_keepalive_connections: int = Field(default=10, ge=0)
    keepalive_expiry_s: float = Field(default=30.0, ge=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    timeout_s: float = Field(default=15.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _no_http2(cls, data: Any) -> Any:
        # The client is aiohttp, HTTP/1.1 only: a config from before says so, not "unknown key".
        if isinstance(data, dict) and "http2" in data:
            raise Problem(
                (
                    "http2",
                    "HTTP/2 is no longer supported (the HTTP client speaks HTTP/1.1 with "
                    "keep-alive)",
                    "remove the key",
                )
            )
        return data


class OrchestrationSettings(_Model):
    """Fetch the resource an event is about from the OHIP REST API before the sink."""

    enabled: bool = False
    # Event name (or module name) -> URL template; placeholders: {primaryKey}, {hotelId},
    # {chainCode}, {eventName}, {moduleName}. A relative template is joined to base_url.
    resources: UrlTemplates = {}
    base_url: BaseUrl | None = None  # default: the stream's gateway_url
    rate_per_s: float = Field(default=5.0, gt=0)  # token bucket shared by every stream
    burst: int = Field(default=10, ge=1)
    coalesce_ms: float = Field(default=500.0, ge=0)  # same URL within this window: one GET
    max_attempts: int = Field(default=6, ge=1)  # then the batch is retried as a sink failure
    retry_max_s: float = Field(default=30.0, gt=0)
    # 404, 410 or 204 (the resource is gone, e.g. purged): attach null and deliver, or
    # dead-letter
    on_not_found: Literal["attach-null", "dead-letter"] = "attach-null"

    _base_url = field_validator("base_url")(_url_secrets(lone_user=True))

    @model_validator(mode="after")
    def _templates(self) -> OrchestrationSettings:
        if self.enabled and not self.resources:
            raise ValueError(
                "enabled = true needs [orchestration.resources], e.g. "
                '"NEW RESERVATION" = "/rsv/v1/hotels/{hotelId}/reservations/{primaryKey}"'
            )
        # As the orchestration sink renders them (consumer.sinks.orchestration.PLACEHOLDERS).
        allowed = ("primaryKey", "hotelId", "chainCode", "eventName", "moduleName")
        for name, template in self.resources.items():
            # Parsed as it is rendered: a conversion (!r), a format spec (:.2), an index ([0]),
            # an attribute (.upper) or a lone brace would fail or render another URL per event.
            try:
                Template(template, allowed)
            except TemplateError as exc:
                raise Problem((f"resources[{name!r}]", exc.what, exc.fix)) from None
            if template.startswith(ABSOLUTE):
                if user_information(template) is not None:
                    raise Problem(
                        (
                            f"resources[{name!r}]",
                            "holds user information (user@ or user:password@), or an '@' "
                            "that would be read as its end",
                            "remove the user@ part: the REST API takes the stream's token and "
                            "application key; write a literal '@' as %40",
                        )
                    )
                try:
                    http_url(template)
                except Problem as exc:
                    items = ((f"resources[{name!r}]", m, f) for _, m, f in exc.items)
                    raise Problem(*items) from None
                except ValueError as exc:
                    raise ValueError(f"resources[{name!r}]: {exc}") from None
            elif bad_url_char(template):
                raise Problem(
                    (
                        f"resources[{name!r}]",
                        f"contains {bad_url_char(template)}",
                        "no whitespace or control characters in a URL template",
                    )
                )
            if short := short_url_secrets(template, lone_user=False):
                key = f"resources[{name!r}]"
                raise Problem(*((key, m, f) for _, m, f in short_url_problem(short).items))
        return self


class PipelineSettings(_Model):
    # None: the sink's own default (runtime.pipeline.default_workers): 1 where its write never
    # waits (jsonl, sqlite in the state's file, postgres on the state's dsn), 4 elsewhere.
    workers: int | None = Field(default=None, ge=1, le=256)
    # Per stream: read, not yet taken by a worker. None: 500 per worker
    # (runtime.pipeline.QUEUE_PER_WORKER).
    queue_size: int | None = Field(default=None, ge=1)
    # The same events' size, as received: the reader waits at either bound (a single event
    # larger than this still goes through, alone).
    queue_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    batch_max: int = Field(default=200, ge=1)
    drain_timeout_s: StopStepSeconds = 20.0
    # Retries of a failing sink more often than the floors only hammer it while it is down.
    sink_retry_initial_s: Annotated[
        float, _within(0.01, why="a retry every few microseconds hammers a sink that is down")
    ] = 0.5
    sink_retry_max_s: Annotated[
        float,
        _within(
            0.05,
            why="retries of a sink that is down more often than every 50 ms only hammer it "
            "(default 30)",
        ),
    ] = 30.0


class MetricsSettings(_Model):
    enabled: bool = True
    address: str = "127.0.0.1"  # loopback by default: expose deliberately
    port: int = Field(default=9464, ge=0, le=65535)  # 0: any free port
    event_timezone: str = "UTC"  # zone of the events' timestamps (undocumented by Oracle)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        """What ``run`` can listen on, checked before it starts: an IP literal of this host,
        "localhost", or "" (every interface). "999.1.1.1" passed check-config and failed at
        the bind."""
        if v in ("", "localhost"):
            return v
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise Problem(
                (
                    "",
                    "is not an IP address (IPv4 or IPv6, without brackets), 'localhost' or ''",
                    'use e.g. "127.0.0.1" (the default: this host only), "::1", "0.0.0.0" or '
                    '"" (every interface: expose deliberately) or an address of this host',
                )
            ) from None
        return v

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
    # A progress line per stream this often while it is behind (events/s, lag, ETA); 0: none.
    progress_interval_s: Annotated[
        float,
        _within(
            0.1, why="a line per stream more often floods the log (default 10)", off="no lines"
        ),
    ] = 10.0
    # Event-time lag up to this is caught up (no progress lines; `status` says "caught up").
    progress_caught_up_s: float = Field(default=60.0, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        hide_input_in_errors=True,
    )

    streams: dict[str, StreamSettings] = Field(min_length=1)
    # Plain http:// to a host other than loopback where credentials travel (gateway, token
    # endpoint, REST API, a webhook with credentials) is refused unless this is true: for a
    # trusted test network (e.g. the Docker sandbox). The daemon warns at every start.
    allow_insecure_http: bool = False
    # What `run` runs on (consumer.event_loop): "auto" is uvloop for the webhook sink, where
    # the HTTP client's event-loop steps bound one POST per event, and asyncio's loop otherwise.
    event_loop: EventLoop = "auto"
    state: StateSettings = StateSettings()
    sink: SinkSettings = JsonlSinkSettings()
    pipeline: PipelineSettings = PipelineSettings()
    http: HttpSettings = HttpSettings()
    orchestration: OrchestrationSettings = OrchestrationSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
    fleet: FleetSettings = FleetSettings()
    filter: FilterSettings = FilterSettings()

    def warnings(self) -> list[tuple[str, str, str]]:
        """Every stream's :meth:`StreamSettings.warnings`, as (dotted key, what, fix), then
        :meth:`shared_warnings`."""
        return [
            (f"streams.{name}.{key}", what, fix)
            for name, stream in self.streams.items()
            for key, what, fix in stream.warnings()
        ] + self.shared_warnings()

    def shared_warnings(self) -> list[tuple[str, str, str]]:
        """Of streams together and of the sink (a stream logs its own when it starts; the
        daemon these, once): pairs on one gateway and chain, for hotels they share, with
        other application keys (valid: each key's portal template may select other events;
        with the same key they are refused at load); a Redis guard shorter than OHIP's
        retention."""
        found = []
        sink = self.sink
        if isinstance(sink, RedisSinkSettings) and sink.guard_ttl_s < GUARD_TTL_WARNING_S:
            found.append(
                (
                    "sink.guard_ttl_s",
                    f"is {sink.guard_ttl_s:g} s, under 7 days (604800 s): OHIP keeps 7 days of "
                    "events and replays inclusively, and an event replayed later than this "
                    "after its write (a restart after a long outage, a `dlq replay` days on) "
                    "is added to the stream again",
                    "set it to 691200 (8 days, the default), or at least 604800",
                )
            )
        for a, b, same in self._overlapping_streams():
            if same:
                continue  # refused at load
            # None: a key this command was loaded without, so the same one or not.
            keys = (
                "other app_keys"
                if same is False
                else "app_keys this command was not given (if they are one, OHIP refuses the "
                "second: 4409)"
            )
            found.append(
                (
                    f"streams.{b}.subscription.hotel_codes",
                    f"streams {a} and {b} subscribe to the same chain on the same gateway for "
                    f"hotels they share (no hotel_codes: every hotel), with {keys}"
                    ": an event both keys' event templates select is delivered twice into the "
                    "one sink (processed ids are kept per stream)",
                    "give the streams hotel_codes that do not overlap, or make sure the two "
                    "application keys' templates select different events",
                )
            )
        return found

    def _overlapping_streams(self) -> list[tuple[str, str, bool | None]]:
        """Pairs of streams on the same gateway and chain whose hotels overlap (none given:
        every hotel), and whether their app_key is the same (None: a key this command was
        loaded without, so unknown)."""
        found: list[tuple[str, str, bool | None]] = []
        streams = list(self.streams.items())
        for i, (a, sa) in enumerate(streams):
            for b, sb in streams[i + 1 :]:
                if _subscription_of(sa) != _subscription_of(sb):
                    continue
                ka, kb = _given(sa.app_key), _given(sb.app_key)
                same = None if ka is None or kb is None else ka == kb
                if same or _hotels_overlap(
                    sa.subscription.hotel_codes, sb.subscription.hotel_codes
                ):
                    found.append((a, b, same))
        return found

    @model_validator(mode="before")
    @classmethod
    def _utf8(cls, data: Any) -> Any:
        """Bytes that are not UTF-8 in an environment variable become lone surrogates in
        Python: refused here, naming the key, not where the value is first encoded again."""
        if problems := undecodable(data):
            raise Problem(*problems)
        return data

    @field_validator("streams", mode="before")
    @classmethod
    def _one_spelling(cls, v: Any) -> Any:
        """Environment variables and secret files name a stream in lowercase: for a stream
        named with capitals in the file, OPERA_CONSUMER_STREAMS__PROD__APP_KEY made a second
        stream, "prod", and the error asked for the variable that was already set."""
        if isinstance(v, dict):
            seen: dict[str, str] = {}
            for name in v:
                first = seen.setdefault(str(name).lower(), str(name))
                if first != name:
                    raise Problem(
                        (
                            "",
                            f"{printable(first, 64)} and {printable(name, 64)} are one stream "
                            "spelt twice (environment variables and secret files name streams "
                            "in lowercase)",
                            f"name it {printable(first.lower(), 64)} in the config file",
                        )
                    )
        return v

    @field_validator("streams")
    @classmethod
    def _names(cls, v: dict[str, StreamSettings]) -> dict[str, StreamSettings]:
        for name in v:
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"stream name {name!r}: use letters, digits, '-' and '_'")
        return v

    @model_validator(mode="after")
    def _sink_in_the_store(self) -> Settings:
        """A sqlite sink without a file of its own writes into the state store's SQLite file:
        there is none when the state lives in PostgreSQL."""
        sink = self.sink
        if (
            isinstance(sink, SqliteSinkSettings)
            and self.state.backend == "postgres"
            and (sink.path is None or sink.path == self.state.path)
        ):
            raise Problem(
                (
                    "sink.path",
                    "a sqlite sink without a file of its own writes into the state store, "
                    "which is PostgreSQL here",
                    'set sink.path to a file for the events, or use type = "postgres"',
                )
            )
        return self

    @model_validator(mode="after")
    def _one_subscriber(self) -> Settings:
        """OHIP: one subscriber per application key, gateway and chain. A second stream with
        all three the same was refused 4409 for as long as the first ran (hotel_codes filter
        the one subscription, they do not make another)."""
        problems = [
            (
                f"streams.{b}.app_key",
                f"streams {a} and {b} have the same gateway_url, chain_code and app_key: OHIP "
                "takes one subscriber per application key, gateway and chain, and refuses the "
                "other with 4409 for as long as the first runs (hotel_codes filter the one "
                "subscription, they do not make a second)",
                f"remove stream {b} (one stream takes several hotels: hotel_codes = [...], or "
                "[] for all), or give it its own chain_code or application key",
            )
            for a, b, same in self._overlapping_streams()
            if same
        ]
        if problems:
            raise Problem(*problems)
        return self

    @model_validator(mode="after")
    def _redis_keys_apart_from_guards(self) -> Settings:
        """A stream key whose text ends otherwise may, with a stream's chain code or name (the
        same for all its events), end as a guard key does for every event: each would be
        refused and dead-lettered, the stream's whole output in the DLQ."""
        sink = self.sink
        if not isinstance(sink, RedisSinkSettings):
            return self
        template = Template(sink.stream_key)
        for name, stream in self.streams.items():
            constants = {"chainCode": key_token(stream.chain_code), "stream": key_token(name)}
            if always_ends_as_guard(template, constants):
                raise Problem(
                    (
                        "sink.stream_key",
                        f"with stream {name}'s chain code and name every key ends as a guard "
                        "key does (':guard:' and an id): every event would be refused as "
                        "another event's guard and dead-lettered",
                        'end it otherwise, e.g. "opera:{{{chainCode}}}:{hotelId}"',
                    )
                )
        return self

    @model_validator(mode="after")
    def _sink_apart_from_the_store(self) -> Settings:
        """A jsonl sink writing into the state store's files (the SQLite database, its
        journal, the lease): check-config said OK, then run refused the database as a jsonl
        file and suggested `sink adopt --execute`, which would take it for one."""
        sink = self.sink
        if not isinstance(sink, JsonlSinkSettings):
            return self
        base = CONFIG_DIR.get() or Path.cwd()  # as loading anchors relative paths
        companions = STATE_COMPANIONS if self.state.backend == "sqlite" else (".lock",)
        state = base / self.state.path
        files: dict[Path, str] = {}
        for suffix in companions:
            # As given, and with symlinks resolved (SQLite names its journals after the real
            # file): either spelling of sink.path may name it.
            for path in (Path(f"{state}{suffix}"), Path(f"{_real(state)}{suffix}")):
                files.setdefault(_real(path), f"{suffix} file" if suffix else "database")
        target = _real(base / sink.path)
        if target in files:
            raise Problem(
                (
                    "sink.path",
                    f"names the state store's {files[target]} (state.path): the sink would "
                    "write events into it, and `sink adopt` would take it for a jsonl file",
                    "give the sink a file of its own, e.g. events.jsonl beside the state store",
                )
            )
        rotation = sink.rotation()
        for path, what in files.items():
            # The series lives beside sink.path: retention would delete a file it names.
            if rotation and path.parent == target.parent and rotation.seq_of(path.name) is not None:
                raise Problem(
                    (
                        "sink.rotate_name" if sink.rotate_name is not None else "sink.path",
                        f"names the state store's {what} (state.path) as a rotated file of the "
                        "sink: the sink would take it for one of its own, and retention delete it",
                        "give the sink a file name of its own, e.g. events.jsonl beside the "
                        "state store (rotated: events-<time>.<number>.jsonl)",
                    )
                )
        return self

    @model_validator(mode="after")
    def _fleet(self) -> Settings:
        """A fleet shares its state in PostgreSQL, and its sink must be one every member
        reaches: not a file on one host."""
        if not self.fleet.enabled:
            return self
        problems: list[tuple[str, str, str]] = []
        if self.state.backend != "postgres":
            problems.append(
                (
                    "state.backend",
                    "fleet mode keeps the members' shared state in PostgreSQL",
                    'set [state] backend = "postgres" and dsn, or [fleet] enabled = false',
                )
            )
        if self.sink.type in ("jsonl", "sqlite"):
            problems.append(
                (
                    "sink.type",
                    f"a {self.sink.type} sink is a file on one host: a stream taken over by "
                    "another member would continue in another file",
                    'use type = "postgres" (on the state database: rows commit with the '
                    'checkpoint), "webhook" or "python"',
                )
            )
        # A stream handed over stays renewed while it stops, but renewing may fail meanwhile:
        # the stop must end within what the last renewal guarantees, or another member could
        # take the stream while this one still delivers (and refuse its last commit).
        f, p = self.fleet, self.pipeline
        name, slowest = max(
            self.streams.items(), key=lambda item: item[1].connection.complete_timeout_s
        )
        stop, room = fleet_handover_s(slowest.connection, p), f.lease_ttl_s - f.renew_interval_s
        if stop > room:
            c = slowest.connection.complete_timeout_s
            needed = stop + f.renew_interval_s
            fix = (
                f"raise fleet.lease_ttl_s to at least {needed:g}, or lower "
                "pipeline.drain_timeout_s or connection.complete_timeout_s"
                if needed <= MAX_LEASE_TTL_S
                else f"lower pipeline.drain_timeout_s or connection.complete_timeout_s (a "
                f"lease lasts at most {MAX_LEASE_TTL_S:g} s)"
            )
            problems.append(
                (
                    "fleet.lease_ttl_s",
                    f"a stream handed over may take {stop:g} s to stop (twice streams.{name}."
                    f"connection.complete_timeout_s {c:g} s + {STOP_GRACE_S:g} s: to close it, "
                    f"and for its last commit; and pipeline.drain_timeout_s {p.drain_timeout_s:g}"
                    f" s), more than a lease surely lasts after a renewal ({room:g} s: "
                    "lease_ttl_s - renew_interval_s): if renewing failed meanwhile, another "
                    "member could take the stream while this one still delivers",
                    fix,
                )
            )
        if problems:
            raise Problem(*problems)
        return self

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
            if template.startswith(ABSOLUTE):
                check(f"orchestration.resources[{name!r}]", template, "the access token")
        if isinstance(self.sink, WebhookSinkSettings):
            carries = self.sink.credentials()
            if carries is not None:
                check("sink.url", self.sink.url, f"its credentials ({carries})")
        if problems:
            raise Problem(*problems)
        return self

    @model_validator(mode="after")
    def _extras(self) -> Settings:
        """A configured feature whose optional dependency (an extra) is not installed."""
        if problems := missing_extras(self):
            raise Problem(*problems)
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
