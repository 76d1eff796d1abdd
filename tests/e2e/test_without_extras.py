"""``pip install opera-consumer`` without extras: the daemon runs a jsonl deployment without
ever importing asyncpg (tests/without_extras.py makes it unimportable in the process), and
refuses a PostgreSQL configuration at check-config with the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support import (
    newest_offset,
    sink_ids,
    stop_when_committed,
    toml_config,
)

RUNNER = Path(__file__).parents[1] / "without_extras.py"


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(RUNNER), *args], stdout=out, stderr=subprocess.STDOUT
        )


async def test_a_jsonl_daemon_runs_without_the_extras(sandbox_factory, tmp_path: Path):
    gw = await sandbox_factory(backlog=50)
    config = toml_config(tmp_path, gw.url)
    newest, state, log = newest_offset(gw), tmp_path / "state.db", tmp_path / "daemon.log"
    proc = spawn(["run", "--config", str(config)], log)
    await stop_when_committed(proc, state, newest, log, timeout=120)
    truth = [e["metadata"]["uniqueEventId"] for e in gw.events("DEMO")]
    assert sorted(sink_ids(tmp_path / "events.jsonl")) == sorted(truth)


def test_a_postgres_configuration_is_refused_with_the_fix(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text(
        '[streams.main]\ngateway_url = "https://gw.example.com"\nchain_code = "DEMO"\n'
        'app_key = "app-key-0001"\n'
        'auth = { client_id = "c", client_secret = "client-secret-0001" }\n'
        '[state]\nbackend = "postgres"\ndsn = "postgresql://opera:pass@127.0.0.1:1/opera"\n'
    )
    done = subprocess.run(
        [sys.executable, str(RUNNER), "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 78, done.stdout + done.stderr
    assert done.stdout == ""
    assert 'state.backend: backend = "postgres" needs the Python package asyncpg' in done.stderr
    assert "pip install 'opera-consumer[postgres]'" in done.stderr
    assert "pass@" not in done.stderr
