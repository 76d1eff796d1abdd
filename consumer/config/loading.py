"""Finding, loading and explaining the configuration: :func:`load_settings` raises a
:class:`~consumer.errors.ConfigError` that names each bad key (as written in the file, or the
environment variable or secret file that set it) and its fix, never the value (it may be a
secret).

Relative paths (state store, sink files, TLS and credentials files) are made absolute against
the config file's directory, so every command reads the same files wherever it is started
from; a python sink's module is also looked for there. Without a config file they resolve
against the current directory, as before, and are made absolute too.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_settings import (
    EnvSettingsSource,
    NestedSecretsSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from ..core.printable import printable
from ..errors import ConfigError
from . import settings as settings_module
from .fields import Problem
from .settings import (
    CONFIG_DIR,
    ENV_PREFIX,
    SECRET_NOT_GIVEN,
    SINK_TYPES,
    Settings,
    secret_fix,
)

DEFAULT_CONFIG_PATHS = (Path("config.toml"), Path("/etc/opera-consumer/config.toml"))
_SECRET_FIELDS = frozenset({"app_key", "client_secret", "password", "token", "dsn"})
_M = TypeVar("_M", bound=BaseModel)


def find_config(path: Path | None) -> Path | None:
    if path is not None:
        try:
            found = path.is_file()
        except OSError as exc:  # e.g. a name too long for the file system
            raise ConfigError(
                f"config file {printable(path)}: {exc.strerror or exc}: pass an existing file "
                "to --config"
            ) from None
        if not found and path.is_dir():
            raise ConfigError(
                f"config file {printable(path)} is a directory: pass the TOML file to --config, "
                f"e.g. {printable(path / 'config.toml')}"
            )
        if not found:
            raise ConfigError(
                f"config file {path} not found: pass an existing file to --config, or copy "
                "config.example.toml there and edit it"
            )
        return path
    return next((p for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)


# What a stream's connection to OHIP needs, and what the sink needs to deliver, and nothing
# else does: a command that only reads or changes the state store (status, dlq list, offset,
# fleet...) is loaded without them. Under systemd they reach the service alone
# (LoadCredential=), not an operator's shell. The state store's dsn is never one of them.
_PLACEHOLDER = f"{SECRET_NOT_GIVEN}{uuid.uuid4().hex}"
# Where a DSN is parsed as it is given (sink.dsn): one the driver would read.
_PLACEHOLDER_DSN = f"postgresql://{_PLACEHOLDER}@127.0.0.1/{_PLACEHOLDER}"


class UnsetSecret(SecretStr):
    """A secret (a stream's, or the sink's) that a command which never uses it was loaded
    without: it is shown as not given, and asking for its value is a configuration error
    naming the key."""

    def __init__(self, key: str) -> None:
        super().__init__("")
        self.key = key

    def get_secret_value(self) -> str:
        raise ConfigError(
            f"invalid configuration: {self.key}: not given to this command, which needs it "
            f"-> {secret_fix(self.key.split('.'))}"
        )

    def _display(self) -> str:
        return "(not given)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UnsetSecret) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


def _missing(table: dict[str, Any], names: list[str], value: str) -> dict[str, str]:
    return {name: value for name in names if name not in table}


class _SecretPlaceholders(PydanticBaseSettingsSource):
    """The last source: a placeholder for each required secret no other source gave, of the
    streams (app_key, auth.client_secret, and auth.password with the password grant) and of
    the sink (a postgres sink's dsn, a webhook's token or password for its auth), replaced by
    an :class:`UnsetSecret` once the settings are valid. (The others are optional: a nats or
    redis sink's credentials, absent, are absent for every command alike.)"""

    def __init__(self, settings_cls: type[Settings], *, streams: bool, sink: bool) -> None:
        super().__init__(settings_cls)
        self._streams, self._sink = streams, sink

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        filled: dict[str, Any] = {}
        if self._streams and (streams := self._stream_secrets()):
            filled["streams"] = streams
        if self._sink and (sink := self._sink_secrets()):
            filled["sink"] = sink
        return filled

    def _stream_secrets(self) -> dict[str, Any]:
        streams = self.current_state.get("streams")
        if not isinstance(streams, dict):
            return {}
        filled: dict[str, Any] = {}
        for name, stream in streams.items():
            if not isinstance(stream, dict):
                continue
            fill: dict[str, Any] = _missing(stream, ["app_key"], _PLACEHOLDER)
            auth = stream.get("auth")
            if isinstance(auth, dict):
                wanted = [
                    "client_secret",
                    *(["password"] if auth.get("grant") == "password" else []),
                ]
                if given := _missing(auth, wanted, _PLACEHOLDER):
                    fill["auth"] = given
            if fill:
                filled[name] = fill
        return filled

    def _sink_secrets(self) -> dict[str, str]:
        sink = self.current_state.get("sink")
        if not isinstance(sink, dict):
            return {}
        kind = sink.get("type")
        if kind == "postgres":
            return _missing(sink, ["dsn"], _PLACEHOLDER_DSN)
        if kind == "webhook":
            auth = sink.get("auth")
            wanted = {"bearer": ["token"], "basic": ["password"]}.get(str(auth), [])
            return _missing(sink, wanted, _PLACEHOLDER)
        return {}


def _replaced(
    model: _M, replace: Callable[[SecretStr, str], SecretStr | None], key: str = ""
) -> _M:
    """``model`` with each secret in it (at any depth) that ``replace(secret, dotted key)``
    replaces (None: kept) replaced; the models are frozen, so changed ones are copies."""
    update: dict[str, Any] = {}
    for name in type(model).model_fields:
        value, at = getattr(model, name), f"{key}.{name}" if key else name
        if isinstance(value, SecretStr):
            if (secret := replace(value, at)) is not None:
                update[name] = secret
        elif isinstance(value, BaseModel):
            if (inner := _replaced(value, replace, at)) is not value:
                update[name] = inner
        elif isinstance(value, dict):
            items = {
                k: _replaced(v, replace, f"{at}.{k}") if isinstance(v, BaseModel) else v
                for k, v in value.items()
            }
            if any(items[k] is not value[k] for k in value):
                update[name] = items
    return model.model_copy(update=update) if update else model


def _unset(secret: SecretStr, key: str) -> UnsetSecret | None:
    """A placeholder of :class:`_SecretPlaceholders` as the :class:`UnsetSecret` of ``key``."""
    if isinstance(secret, UnsetSecret):
        return None
    return (
        UnsetSecret(key) if secret.get_secret_value() in (_PLACEHOLDER, _PLACEHOLDER_DSN) else None
    )


def unset_secrets(settings: Settings) -> list[str]:
    """The keys of the secrets these settings were loaded without (see
    ``load_settings(stream_secrets=False, sink_secrets=False)``): what ``run`` would refuse."""
    found: list[str] = []
    _replaced(settings, lambda s, _: found.append(s.key) if isinstance(s, UnsetSecret) else None)
    return found


def not_given(keys: list[str], what: str) -> ConfigError:
    """The error for secrets ``what`` needs and was not given: each key and where to give it."""
    lines = [f"invalid configuration for {what}:"]
    lines += [f"  {key}: not given -> {secret_fix(key.split('.'))}" for key in keys]
    return ConfigError("\n".join(lines))


def load_settings(
    path: Path | None = None, *, stream_secrets: bool = True, sink_secrets: bool = True
) -> Settings:
    """Load and validate; raises :class:`ConfigError` naming each bad key and its fix.

    ``stream_secrets=False``: for a command that never connects to OHIP, the streams' secrets
    (app_key, client_secret, a password grant's password) may be missing; ``sink_secrets=False``:
    for one that never delivers, the sink's (a postgres sink's dsn, a webhook's token or
    password). Each missing one is an :class:`UnsetSecret`, which names its key if it is asked
    for after all. The state store's dsn is always required: every command reads the state."""
    found = find_config(path)
    unknown = _unknown_variables()
    if unknown:
        raise ConfigError("\n".join(["invalid configuration in the environment:", *unknown]))
    if found is None and not _env_variables():
        raise ConfigError(
            f"no config file: looked for {_looked_for()}. Copy config.example.toml (every key, "
            "with its default and what it does) to ./config.toml and edit it, or pass --config "
            "FILE"
        )
    # resolve(): a lexical ".." would go wrong where a directory is a symlink.
    base = (found.parent if found else Path.cwd()).resolve()

    sources: list[PydanticBaseSettingsSource] = []

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=found)

        @classmethod
        def settings_customise_sources(
            cls, *args: Any, **kwargs: Any
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            made = super().settings_customise_sources(*args, **kwargs)
            if not (stream_secrets and sink_secrets):
                placeholders = _SecretPlaceholders(
                    cls, streams=not stream_secrets, sink=not sink_secrets
                )
                made = (*made, placeholders)
            sources[:] = made  # for _source_error: which variable or file it could not parse
            return made

    where = CONFIG_DIR.set(base)
    try:
        loaded = _FileSettings()  # type: ignore[call-arg]  # fields come from the sources
    except ValidationError as exc:
        raise ConfigError(explain(exc, found)) from None
    except SettingsError as exc:
        raise ConfigError(_source_error(exc, sources, found)) from None
    except UnicodeDecodeError:  # the file's or a secret file's bytes (no name in it)
        raise ConfigError(_undecodable_file(found)) from None
    except ValueError as exc:  # e.g. TOML syntax
        raise ConfigError(f"{found}: {exc}") from None
    except OSError as exc:  # e.g. a secret file the daemon's user may not read
        name = printable(exc.filename) if exc.filename else (found or "a file")
        raise ConfigError(
            f"cannot read {name}: {exc.strerror or exc} -> make it readable by the user "
            "opera-consumer runs as (or remove it)"
        ) from None
    except RecursionError:
        raise ConfigError(
            f"{found or 'the configuration'}: values nested too deeply (arrays or tables "
            "inside each other, in the file or in a JSON value of an OPERA_CONSUMER_ "
            "variable) -> flatten them; no key of opera-consumer nests more than a few levels"
        ) from None
    finally:
        CONFIG_DIR.reset(where)
    return anchored(loaded if stream_secrets and sink_secrets else _replaced(loaded, _unset), base)


def _secret_files() -> list[Path]:
    """The files in the secret directories, as the secrets source reads them (top level)."""
    dirs = [
        d
        for d in (*settings_module.SECRET_DIRS, os.environ.get("CREDENTIALS_DIRECTORY"))
        if d and os.path.isdir(d)
    ]
    try:
        return [p for d in dirs for p in sorted(Path(d).iterdir()) if p.is_file()]
    except OSError:
        return []


def _undecodable_file(found: Path | None) -> str:
    """Which file is not UTF-8 text: the config file, or a secret file."""
    for path in [*([found] if found else []), *_secret_files()]:
        try:
            path.read_bytes().decode()
        except UnicodeDecodeError as exc:
            what = "config file" if path == found else "secret file"
            return (
                f"{what} {path} is not UTF-8 text (byte {exc.start}) -> save it as UTF-8 "
                "(its bytes are not shown: it may hold a secret)"
            )
        except OSError:
            continue
    return f"{found or 'the configuration'}: a value is not UTF-8 text -> save it as UTF-8"


_SOURCE_FIELD = re.compile(r'for field "(\w+)" from source "(\w+)"')
_JSON_FIX = (
    "a list or table set from the environment or a secret file is written in JSON, e.g. "
    '\'["H1","H2"]\' for a list, \'{"X-Source":"opera"}\' for a table; or set it in the '
    "config file"
)


def _source_error(
    exc: SettingsError, sources: list[PydanticBaseSettingsSource], found: Path | None
) -> str:
    """A value pydantic-settings could not parse, naming the variable or secret file that set
    it (the source is tried with each of its values alone) and the fix."""
    match = _SOURCE_FIELD.search(str(exc))
    if match is None:  # e.g. the secret directory too large
        return f"cannot read the configuration: {exc}"
    field, source_name = match.groups()
    source = next((s for s in sources if type(s).__name__ == source_name), None)
    if not isinstance(source, EnvSettingsSource):
        return f"{found}: {field}: {exc}"
    bad = _unparsable(source)
    is_env = not isinstance(source, NestedSecretsSettingsSource)
    env_names = {name.lower(): name for name in os.environ}
    files = {p.name.lower(): p for p in _secret_files()}
    lines = [f"invalid configuration in {'the environment' if is_env else 'a secret file'}:"]
    for name in bad or [field]:
        shown = env_names.get(name, name) if is_env else files.get(name, name)
        what = "environment variable" if is_env else "secret file"
        lines.append(f"  {what} {shown}: is not valid JSON -> {_JSON_FIX}")
    return "\n".join(lines)


def _unparsable(source: EnvSettingsSource) -> list[str]:
    """The names of the source's values that it cannot parse alone."""
    everything = source.env_vars
    bad = []
    try:
        for name, value in everything.items():
            source.env_vars = {name: value}
            try:
                source()
            except Exception:  # SettingsError, or what it did not wrap
                bad.append(name)
    finally:
        source.env_vars = everything
    return bad


def anchored(model: _M, base: Path) -> _M:
    """``model`` with every relative path in it (at any depth) made absolute against
    ``base``; the models are frozen, so changed ones are copies."""
    update: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path):
            if not value.is_absolute():
                update[name] = base / value
        elif isinstance(value, BaseModel):
            if (inner := anchored(value, base)) is not value:
                update[name] = inner
        elif isinstance(value, dict):
            items = {
                k: anchored(v, base) if isinstance(v, BaseModel) else v for k, v in value.items()
            }
            if any(items[k] is not value[k] for k in value):
                update[name] = items
    return model.model_copy(update=update) if update else model


def _looked_for() -> str:
    return " and ".join(str(p) for p in DEFAULT_CONFIG_PATHS)


def _env_variables() -> list[str]:
    # pydantic-settings matches the names case-insensitively.
    return [name for name in os.environ if name.upper().startswith(ENV_PREFIX)]


def _unknown_variables() -> list[str]:
    """Variables with our prefix that name no top-level key: pydantic-settings would ignore
    them without a word (``OPERA_CONSUMER_STATE_PATH``, one ``_`` short, sets nothing)."""
    known = set(Settings.model_fields)
    return [
        f"  {name}: names no key (a typo? '__' separates the levels, e.g. "
        f"{ENV_PREFIX}STATE__PATH) -> unset or rename it; config.example.toml lists every key"
        for name in sorted(_env_variables())
        if name[len(ENV_PREFIX) :].lower().split("__")[0] not in known
    ]


def _set_by(loc: list[str]) -> str | None:
    """The environment variable, or else the secret file, that set ``loc`` (or a table
    holding it), when one did: a key that is not in the file is not named as if it were."""
    names = {name.upper(): name for name in _env_variables()}
    dirs = [
        d
        for d in (*settings_module.SECRET_DIRS, os.environ.get("CREDENTIALS_DIRECTORY"))
        if d and os.path.isdir(d)
    ]
    for end in range(len(loc), 0, -1):
        var = ENV_PREFIX + "__".join(loc[:end]).upper()
        if var in names:
            return f"environment variable {names[var]}"
        for d in dirs:
            secret = Path(d) / "__".join(loc[:end])
            if secret.is_file():
                return f"secret file {secret}"
    return None


def explain(exc: ValidationError, source: Path | None) -> str:
    where = (
        f"in {source}"
        if source
        else f"(no config file: looked for {_looked_for()}; copy config.example.toml to "
        "./config.toml, or pass --config FILE)"
    )
    lines = [f"invalid configuration {where}:"]
    for err in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in err["loc"]]
        if loc[:1] == ["sink"] and len(loc) > 1 and loc[1] in SINK_TYPES:
            del loc[1]  # pydantic names the union member; the key is sink.<field>
        problem = (err.get("ctx") or {}).get("error")
        if isinstance(problem, Problem):  # names its key (relative to loc) and its fix
            for rel, what, fix in problem.items:
                full = [*loc, *rel.split(".")] if rel else loc
                lines.append(f"  {_key(full)}: {what} -> {fix}")
            continue
        env = ENV_PREFIX + "__".join(part.upper() for part in loc)
        setter = _set_by(loc)
        if err["type"] == "missing":
            fix = f"set {'.'.join(loc)} in the config file or the environment variable {env}"
            if loc[-1] in _SECRET_FIELDS:
                fix = secret_fix(loc)
        elif err["type"] == "finite_number":
            fix = "use a finite number (inf and nan are not allowed)"
        elif err["type"] == "extra_forbidden":
            undo = "unset or rename it" if setter else "remove or rename it"
            fix = f"unknown key (a typo?): {undo}; config.example.toml lists every key"
        else:
            fix = "fix the value (see config.example.toml)"
        lines.append(f"  {_key(loc)}: {err['msg']} -> {fix}")
    return "\n".join(lines)


def _key(loc: list[str]) -> str:
    """The dotted key, and where it was set when that is not the file."""
    key = ".".join(loc) or "(top level)"
    setter = _set_by(loc) if loc else None
    return f"{key} (from the {setter})" if setter else key


def effective(settings: Settings) -> dict[str, Any]:
    """The settings as plain data, secrets masked: what ``check-config`` prints (a secret it
    was loaded without as "(not given)")."""
    unset = unset_secrets(settings)
    if not unset:
        return settings.model_dump(mode="json")
    given = SecretStr("given")  # dumped as the mask, then shown as what it is
    shown = _replaced(settings, lambda s, _: given if isinstance(s, UnsetSecret) else None)
    dumped = shown.model_dump(mode="json")
    for key in unset:
        *parents, last = key.split(".")
        table = dumped
        for part in parents:
            table = table[part]
        table[last] = "(not given)"
    return dumped
