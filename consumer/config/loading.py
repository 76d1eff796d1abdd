"""Finding, loading and explaining the configuration: :func:`load_settings` raises a
:class:`~consumer.errors.ConfigError` that names each bad key (as written in the file, and as
its environment variable) and its fix, never the value (it may be a secret)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from ..errors import ConfigError
from .fields import Problem
from .settings import ENV_PREFIX, SINK_TYPES, Settings

DEFAULT_CONFIG_PATHS = (Path("config.toml"), Path("/etc/opera-consumer/config.toml"))
_SECRET_FIELDS = frozenset({"app_key", "client_secret", "password", "token", "dsn"})


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
        if loc[:1] == ["sink"] and len(loc) > 1 and loc[1] in SINK_TYPES:
            del loc[1]  # pydantic names the union member; the key is sink.<field>
        problem = (err.get("ctx") or {}).get("error")
        if isinstance(problem, Problem):  # names its key (relative to loc) and its fix
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
