"""``[state]``: the backend choice and the PostgreSQL store's keys, loaded like the rest of the
configuration (file, environment, secret files), every bad combination an error naming the
key and the fix, and the DSN a secret everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumer.config import effective, load_settings, secret_values
from consumer.errors import ConfigError

PASSWORD = "state-pw-VERY-SECRET-0005"
DSN = f"postgresql://opera:{PASSWORD}@db.example.com:5432/hotel"

BASE = """
[streams.main]
gateway_url = "https://gw.example.com/"
chain_code = "CHAIN1"
app_key = "app-key-0001"

[streams.main.auth]
client_id = "cid"
client_secret = "client-secret-0002"
"""


pytestmark = pytest.mark.usefixtures("hermetic_config")


def write(tmp_path: Path, state: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(BASE + "\n[state]\n" + state)
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = str(info.value)
    assert PASSWORD not in text and DSN not in text
    return text


def test_the_default_is_sqlite(tmp_path: Path) -> None:
    st = load_settings(write(tmp_path, "")).state
    assert (st.backend, st.dsn, st.schema_, st.pool_min, st.pool_max) == (
        "sqlite",
        None,
        "opera_consumer",
        1,
        4,
    )


def test_postgres_from_the_file(tmp_path: Path) -> None:
    st = load_settings(
        write(
            tmp_path,
            f'backend = "postgres"\ndsn = "{DSN}"\nschema = "fleet_a"\npool_min = 2\n'
            "pool_max = 8\n",
        )
    ).state
    assert st.backend == "postgres"
    assert st.dsn is not None and st.dsn.get_secret_value() == DSN
    assert (st.schema_, st.pool_min, st.pool_max) == ("fleet_a", 2, 8)


def test_postgres_dsn_and_schema_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPERA_CONSUMER_STATE__DSN", DSN)
    monkeypatch.setenv("OPERA_CONSUMER_STATE__SCHEMA", "from_env")
    st = load_settings(write(tmp_path, 'backend = "postgres"\n')).state
    assert st.dsn is not None and st.dsn.get_secret_value() == DSN
    assert st.schema_ == "from_env"


def test_postgres_dsn_from_a_secret_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "state__dsn").write_text(DSN + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = load_settings(write(tmp_path, 'backend = "postgres"\n'))
    assert settings.state.dsn is not None
    assert settings.state.dsn.get_secret_value() == DSN
    # a secret: masked in repr and in check-config's output, known to the log redactor
    assert PASSWORD not in repr(settings)
    shown = json.dumps(effective(settings))
    assert PASSWORD not in shown
    assert '"schema": "opera_consumer"' in shown
    assert {DSN, PASSWORD} <= set(secret_values(settings))


def test_the_redactor_knows_the_percent_encoded_password(tmp_path: Path) -> None:
    dsn = "postgresql://opera:p%40ss%2Fword-Secret@db/hotel"
    settings = load_settings(write(tmp_path, f'backend = "postgres"\ndsn = "{dsn}"\n'))
    values = set(secret_values(settings))
    assert {dsn, "p%40ss%2Fword-Secret", "p@ss/word-Secret"} <= values


def test_postgres_without_a_dsn_names_the_key_and_the_ways_to_set_it(tmp_path: Path) -> None:
    text = config_error(write(tmp_path, 'backend = "postgres"\n'))
    assert "state.dsn" in text
    assert "OPERA_CONSUMER_STATE__DSN" in text
    assert "state__dsn" in text


@pytest.mark.parametrize(
    ("state", "key"),
    [
        (f'dsn = "{DSN}"\n', "state.dsn"),
        ('schema = "other"\n', "state.schema"),
        ("pool_max = 9\n", "state.pool_max"),
    ],
)
def test_postgres_keys_with_the_sqlite_backend_are_refused(
    tmp_path: Path, state: str, key: str
) -> None:
    text = config_error(write(tmp_path, state))
    assert key in text
    assert 'backend = "postgres"' in text  # the fix


def test_pool_min_above_pool_max_is_refused(tmp_path: Path) -> None:
    text = config_error(
        write(tmp_path, f'backend = "postgres"\ndsn = "{DSN}"\npool_min = 5\npool_max = 2\n')
    )
    assert "state.pool_min" in text
    assert "raise pool_max" in text


@pytest.mark.parametrize("schema", ["bad-name", "x; DROP TABLE y", "1st", "pg_mine", "a" * 64])
def test_a_schema_that_is_not_a_plain_identifier_is_refused(tmp_path: Path, schema: str) -> None:
    text = config_error(
        write(tmp_path, f'backend = "postgres"\ndsn = "{DSN}"\nschema = "{schema}"\n')
    )
    assert "state.schema" in text


def test_an_unknown_backend_is_refused(tmp_path: Path) -> None:
    assert "state.backend" in config_error(write(tmp_path, 'backend = "mysql"\n'))


def test_a_sqlite_sink_in_the_store_is_refused_with_a_postgres_state(tmp_path: Path) -> None:
    """The sqlite sink without a path writes into the state store's SQLite file, which a
    PostgreSQL state store does not have: refused at config time, naming sink.path."""
    path = write(tmp_path, f'backend = "postgres"\ndsn = "{DSN}"\n')
    path.write_text(path.read_text() + '\n[sink]\ntype = "sqlite"\n')
    assert "sink.path" in config_error(path)
    path.write_text(path.read_text() + 'path = "events.db"\n')
    assert load_settings(path).state.backend == "postgres"


def test_the_lease_check_interval_default_and_a_value_with_postgres(tmp_path: Path) -> None:
    """``lease_check_interval_s``: how often a daemon outside a fleet checks its lease."""
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
def test_a_lease_check_interval_is_refused_naming_the_key(
    tmp_path: Path, state: str, fix: str
) -> None:
    """A PostgreSQL key: refused with the SQLite backend; and never 0."""
    text = config_error(write(tmp_path, state))
    assert "state.lease_check_interval_s" in text and fix in text
