"""A configured feature whose optional dependency (extra) is not installed: a configuration
error naming the key and the fix, exit 78 at check-config. The package's absence is real to
the code under test: ``sys.modules[name] = None`` makes ``import`` fail and ``find_spec``
answer None, as an environment without it does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from operator_support import cli

from consumer.config import load_settings
from consumer.errors import ConfigError

BASE = """
[streams.main]
gateway_url = "https://gw.example.com/"
chain_code = "CHAIN1"
app_key = "app-key"

[streams.main.auth]
client_id = "cid"
client_secret = "client-secret"
"""
POSTGRES_STATE = """
[state]
backend = "postgres"
dsn = "postgresql://opera:pass@127.0.0.1:5432/opera"
"""
POSTGRES_SINK = """
[sink]
type = "postgres"
dsn = "postgresql://opera:pass@127.0.0.1:5432/opera"
"""

pytestmark = pytest.mark.usefixtures("hermetic_config")


def config(tmp_path: Path, *tables: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(BASE + "".join(tables))
    return path


# (the configuration's tables, the module missing, the key named, the extra to install)
CASES = [
    ((POSTGRES_STATE,), "asyncpg", "state.backend", "postgres"),
    ((POSTGRES_SINK,), "asyncpg", "sink.type", "postgres"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[2] for c in CASES])
async def test_check_config_names_the_key_and_the_extra_to_install(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: tuple[tuple[str, ...], str, str, str],
) -> None:
    tables, module, key, extra = case
    path = config(tmp_path, *tables)
    monkeypatch.setitem(sys.modules, module, None)  # type: ignore[arg-type]
    code, out, err = await cli(capsys, "check-config", "--config", str(path))
    assert code == 78, err
    assert out == ""
    line = next(line for line in err.splitlines() if line.strip().startswith(key + ":"))
    assert f"needs the Python package {module}, which is not installed" in line
    assert f"pip install 'opera-consumer[{extra}]'" in line
    assert "pass@" not in err  # the dsn (a secret) is never shown


def test_every_missing_extra_is_named_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        load_settings(config(tmp_path, POSTGRES_STATE, POSTGRES_SINK))
    keys = [line.split(":")[0].strip() for line in str(info.value).splitlines()[1:]]
    assert keys == ["state.backend", "sink.type"]


def test_installed_extras_and_unused_ones_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The suite's environment has every extra: the same configuration loads. Without them, a
    configuration that uses none of them loads too."""
    settings = load_settings(config(tmp_path, POSTGRES_STATE, POSTGRES_SINK))
    assert settings.state.backend == "postgres"
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # type: ignore[arg-type]
    assert load_settings(config(tmp_path)).sink.type == "jsonl"


@pytest.mark.parametrize("value", ["true", "false"])
async def test_the_former_http2_key_is_refused_naming_it_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """The HTTP client is aiohttp (HTTP/1.1): a configuration that still sets [http] http2,
    even to false, is told so, rather than "unknown key (a typo?)"."""
    path = config(tmp_path, f"\n[http]\nhttp2 = {value}\n")
    code, out, err = await cli(capsys, "check-config", "--config", str(path))
    assert code == 78, err
    assert out == ""
    line = next(line for line in err.splitlines() if line.strip().startswith("http.http2:"))
    assert "HTTP/2 is no longer supported" in line and "remove the key" in line
    assert "typo" not in line
