"""A key twice in a ``next`` frame, end to end: the sandbox gateway on 127.0.0.1, the daemon, a
real SQLite state store and a real jsonl file.

Readers of a stored text disagree on a key twice (SQLite's json_extract reads the first, orjson
and PostgreSQL the last). A header key twice (``uniqueEventId``...) is refused: the event would
be deduplicated and checkpointed by one and stored with both. Any other key twice is stored
once, the last, as the pipeline read it.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

from support import (
    committed,
    dead_letter_rows,
    make_settings,
    newest_offset,
    running,
    sink_ids,
    truth_ids,
    wait_until,
)

DEPTHS = range(900, 1024)  # about where Python's json stops reading and orjson reads on


def first_read(line: bytes, path: str) -> Any:
    """What SQLite's json_extract reads at ``path`` of ``line`` (the first of a key twice)."""
    with sqlite3.connect(":memory:") as db:
        return db.execute("SELECT json_extract(?, ?)", (line.decode(), path)).fetchone()[0]


async def test_a_key_twice_is_dead_lettered_or_stored_once_and_the_stream_goes_on(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The gateway sends events whose metadata holds uniqueEventId twice ("A<depth>" then
    "B<depth>"), each beside a value nested <depth> levels deep (900-1023): the check for a
    header key twice parsed the frame again with Python's json and passed it on a
    RecursionError, so some went into events.jsonl holding both ids, recorded as processed
    under the second. Then an event whose detail element holds newValue twice, in a frame with
    an escaped "/": its line held both values. Now each of the first is dead-lettered as
    malformed, the other stored with newValue once (the last), and every event after them is
    delivered once: the stream goes on."""
    gw = await sandbox_factory(backlog=3)
    at = newest_offset(gw)
    for d in DEPTHS:
        event = (
            f'{{"metadata":{{"offset":"{at}","uniqueEventId":"A{d}","uniqueEventId":"B{d}"}},'
            f'"eventName":"N","primaryKey":"K{d}"}}'
        )
        gw.inject_event("DEMO", event + ',"x":' + "[" * d + "]" * d)  # "x" beside newEvent
    gw.inject_event(
        "DEMO",
        f'{{"metadata":{{"offset":"{at}","uniqueEventId":"rate"}},"eventName":"N\\/AME",'
        '"detail":[{"elementName":"rate","newValue":"100","newValue":"999"}]}',
    )
    gw.append("DEMO", 3)
    newest, state, sink = newest_offset(gw), tmp_path / "state.db", tmp_path / "events.jsonl"
    async with running(make_settings(tmp_path, gw.url)) as daemon:
        await wait_until(lambda: committed(state, newest), timeout=60)
        assert not daemon._stop.is_set()
    lines = sink.read_bytes().splitlines()
    twice = [
        (
            json.loads(line)["metadata"]["uniqueEventId"],
            first_read(line, "$.metadata.uniqueEventId"),
        )
        for line in lines
        if line.count(b'"uniqueEventId"') > 1
    ]
    assert not twice, f"lines with uniqueEventId twice (as json reads it, as SQLite does): {twice}"
    (rate,) = [line for line in lines if b'"rate"' in line and b'"uniqueEventId":"rate"' in line]
    assert rate.count(b'"newValue"') == 1 and first_read(rate, "$.detail[0].newValue") == "999"
    assert Counter(sink_ids(sink)) == Counter([*truth_ids(gw.events("DEMO")), "rate"])
    letters = dead_letter_rows(state)
    assert [r["reason"] for r in letters] == ["malformed"] * len(DEPTHS)
    reasons = {r["error"].split(":")[0] for r in letters}
    assert "nested deeper than can be checked for keys twice" in reasons, reasons
    assert reasons <= {
        "uniqueEventId twice in the metadata object",
        "nested deeper than can be checked for keys twice",
        "invalid JSON",
    }
