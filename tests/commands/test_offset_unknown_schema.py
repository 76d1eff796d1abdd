"""`offset show|set|reset` on a PostgreSQL state store opens it as the daemon left it, never
creating it: a DSN or schema mistyped made an empty schema, reported "no checkpoint", and
`--execute` wrote a checkpoint there, exit 0 (found by a review). As `status` and `dlq` do,
and as the SQLite store refuses a missing file. Real PostgreSQL (tests/pg.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from operator_support import PYSINK, cli, write_config
from pg import sql

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging", "hermetic_config")


@pytest.mark.parametrize("command", [["show"], ["set", "main", "42", "--execute"]])
async def test_a_schema_the_daemon_never_made_is_refused_not_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres_dsn: str, command: list[str]
) -> None:
    schema = f"t_{uuid.uuid4().hex[:16]}"
    state = {"backend": "postgres", "dsn": postgres_dsn, "schema": schema}
    config = write_config(tmp_path, "http://127.0.0.1:9", sink=PYSINK, state=state)
    code, _, err = await cli(capsys, "offset", *command, "--config", str(config))
    assert code != 0
    assert f"no state in schema {schema}" in err
    found = "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)"
    assert not await sql(postgres_dsn, "fetchval", found, schema)
