"""A python sink's handler that swallows its cancellation (catches BaseException and goes on)
held the stop for ever: the pipeline's stop waited for its cancelled workers, so the daemon
never committed, closed or exited, until systemd's kill. Now a worker still running
CANCEL_GRACE_S after its cancellation is abandoned, named in the log; the rest of the stop
goes on (the final commit, the close), and the process exits 1 of itself (asyncio's teardown
would wait for the abandoned worker too). Nothing is lost: the events the handler held were
not committed, and the next start delivers them.

The daemon as a process against the sandbox; the handler is a module beside its config."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from support import (
    caught,
    checkpoint,
    committed,
    log_records,
    newest_offset,
    spawn_daemon,
    stop_when_committed,
    tail,
    toml_config,
    truth_ids,
    wait_exit,
    wait_until,
)

from consumer.config.loading import load_settings
from consumer.config.settings import STOP_SLACK_S, stop_budget
from consumer.errors import ExitCode
from consumer.runtime.pipeline import CANCEL_GRACE_S

ABANDONED = "worker did not end when cancelled; abandoned"

# Delivers (a line per event in delivered.txt) unless stubborn.on exists beside it: then it
# never returns, whatever is thrown into it.
HANDLER = """
import asyncio
from pathlib import Path

HERE = Path(__file__).parent


async def handle(stream, events):
    if (HERE / "stubborn.on").exists():
        (HERE / "entered").touch()
        while True:
            try:
                await asyncio.sleep(3600)
            except BaseException:
                pass
    with (HERE / "delivered.txt").open("a") as out:
        out.writelines(ev.unique_event_id + "\\n" for ev in events)
"""


def delivered(tmp_path: Path) -> list[str]:
    path = tmp_path / "delivered.txt"
    return path.read_text().split() if path.exists() else []


async def test_a_handler_that_swallows_its_cancellation_is_abandoned_and_nothing_lost(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=20)
    (tmp_path / "stubborn.py").write_text(HANDLER)
    sink = '[sink]\ntype = "python"\ntarget = "stubborn:handle"\n'
    config = toml_config(tmp_path, gw.url, "[pipeline]\ndrain_timeout_s = 1.0\n", sink=sink)
    budget = stop_budget(load_settings(config))
    state, log = tmp_path / "state.db", tmp_path / "daemon.log"

    proc = spawn_daemon(config, log)
    try:
        before = newest_offset(gw)
        await wait_until(
            lambda: (
                (committed(state, before) and caught(proc.pid, signal.SIGTERM))
                or proc.poll() is not None
            ),
            timeout=60,
        )
        assert proc.poll() is None, tail(log)
        (tmp_path / "stubborn.on").touch()  # the next events hold their workers for good
        gw.append("DEMO", 5)
        await wait_until(lambda: (tmp_path / "entered").exists() or proc.poll() is not None)
        assert proc.poll() is None, tail(log)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await wait_exit(proc, budget.total_s + STOP_SLACK_S)
        took = time.monotonic() - started
    finally:
        proc.kill()
        await wait_exit(proc)
    assert code == ExitCode.RUNTIME, tail(log)
    assert took >= CANCEL_GRACE_S, tail(log)
    abandoned = log_records(log, ABANDONED)
    assert abandoned, tail(log)
    for record in abandoned:
        assert record["level"] == "error"
        assert record["stream"] == "main" and record["sink"] == "python"
        assert record["waiting_in"] == "stubborn:handle"  # the handler, by its code's name
        assert record["worker"].startswith("worker-main-")
    [stopped] = log_records(log, "stopped")
    assert stopped["abandoned_workers"] == len(abandoned) and stopped["exit_code"] == 1
    # The rest of the stop went on: what the handler had delivered is committed, what it
    # held is not.
    assert checkpoint(state) is not None and checkpoint(state)[0] == before  # type: ignore[index]

    # The next start (the handler well again) delivers what it held: nothing lost, none twice.
    (tmp_path / "stubborn.on").unlink()
    proc = spawn_daemon(config, log)
    await stop_when_committed(proc, state, newest_offset(gw), log)
    assert Counter(delivered(tmp_path)) == Counter(truth_ids(gw.events("DEMO")))
