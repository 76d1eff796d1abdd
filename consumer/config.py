"""Configuration: a TOML file, overridden by ``OPERA_CONSUMER_…`` environment variables
(``__`` between nested keys), with secrets also readable from files in
``$CREDENTIALS_DIRECTORY`` (systemd) or ``/run/secrets`` (Docker), named like the environment
variable without its prefix, e.g. ``streams__main__auth__client_secret``.

Every model forbids unknown keys: a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
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
from .core.protocol import InvalidInput, SubscribeInput
from .errors import ConfigError

ENV_PREFIX = "OPERA_CONSUMER_"
DEFAULT_CONFIG_PATHS = (Path("config.toml"), Path("/etc/opera-consumer/config.toml"))
SECRET_DIRS = ("/run/secrets",)  # $CREDENTIALS_DIRECTORY is added at load time
DEFAULT_SCOPE = "urn:opc:hgbu:ws:__myscopes__"
_SECRET_FIELDS = frozenset({"app_key", "client_secret", "password"})


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
    token_url: str | None = None  # default: {gateway_url}/oauth/v1/tokens
    refresh_margin_s: float = Field(default=120.0, ge=0)
    timeout_s: float = Field(default=15.0, gt=0)
    retry_max_s: float = Field(default=120.0, gt=0)

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
    proxy: str | None = None  # None: no proxy, even if the environment names one

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
    gateway_url: str
    chain_code: str
    app_key: SecretStr
    auth: AuthSettings
    subscription: SubscriptionSettings = SubscriptionSettings()
    connection: ConnectionSettings = ConnectionSettings()

    @field_validator("gateway_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("https://", "http://")):
            raise ValueError(
                "must start with https:// (the gateway URL of the portal's environment card)"
            )
        return v.rstrip("/")

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
    state: StateSettings = StateSettings()
    sink: JsonlSinkSettings = JsonlSinkSettings()
    pipeline: PipelineSettings = PipelineSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()

    @field_validator("streams")
    @classmethod
    def _names(cls, v: dict[str, StreamSettings]) -> dict[str, StreamSettings]:
        for name in v:
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"stream name {name!r}: use letters, digits, '-' and '_'")
        return v

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
