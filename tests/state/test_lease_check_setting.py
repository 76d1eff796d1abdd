"""``[state] lease_check_interval_s``: how often a daemon outside a fleet checks its PostgreSQL
lease; a PostgreSQL key, so refused with the SQLite backend (naming the key and the fix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.config import load_settings
from consumer.errors import ConfigError

BASE = """
[streams.main]
gateway_url = "https://gw.example.com/"
chain_code = "CHAIN1"
app_key = "app-key-0001"

[streams.main.auth]
client_id = "cid"
client_secret = "client-secret-0002"

[state]
"""
DSN = "postgresql://opera:pw@db.example.com:5432/hotel"

pytestmark = pytest.mark.usefixtures("hermetic_config")


def write(tmp_path: Path, state: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(BASE + state)
    return path


def test_the_default_and_a_value_with_postgres(tmp_path: Path) -> None:
    pg = f'backend = "postgres"\ndsn = "{DSN}"\n'
    assert load_settings(write(tmp_path, pg)).state.lease_check_interval_s == 5.0
    settings = load_settings(write(tmp_path, pg + "lease_check_interval_s = 1.5\n"))
    assert settings.state.lease_check_interval_s == 1.5


@pytest.mark.parametrize(
    ("state", "fix"),
    [
        ("lease_check_interval_s = 2.0\n", 'backend = "postgres"'),
        (f'backend = "postgres"\ndsn = "{DSN}"\nlease_check_interval_s = 0\n', "greater than 0"),
    ],
)
def test_refused_naming_the_key(tmp_path: Path, state: str, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, state))
    assert "state.lease_check_interval_s" in str(info.value)
    assert fix in str(info.value)
