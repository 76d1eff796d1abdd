"""`sink adopt` vouches for a file the state store has no position for. Over a recorded
position it would vouch for a kill -9's uncommitted tail (whose events come again from the
checkpoint: written twice) or move the committed length back (the next start cuts committed
lines): refused. And the file is measured under the lease, after any daemon's last commit.

Following the start's own advice (adopt, then run) writes no event twice: adopt records the
uniqueEventId of every line (of every rotated file too) as processed, so the new store's
replay (from its configured start: it has no checkpoint) skips them; a last line cut short is
left out, cut by the start, and written whole when its event comes again."""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from operator_support import cli, processed_ids, query, write_config
from support import (
    cli as run_cli,
)
from support import (
    committed as checkpointed,
)
from support import (
    newest_offset,
    sink_length,
    spawn_daemon,
    tail,
    toml_config,
    truth_ids,
    wait_exit,
    wait_until,
)

import consumer.commands.sink as sink_command
from consumer.config import Settings, load_settings
from consumer.errors import StoreError
from consumer.sinks.jsonl import rotated_files
from consumer.state import open_store

pytestmark = pytest.mark.usefixtures("hermetic_config", "contained_logging")


def configured(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "events.jsonl"
    return out, write_config(
        tmp_path, "http://127.0.0.1:9", sink={"type": "jsonl", "path": str(out)}
    )


async def committed(settings: Settings, value: str | None = None) -> str | None:
    store = await open_store(settings.state)
    try:
        if value is not None:
            await store.set_sink_state("jsonl", value)
        return await store.sink_state("jsonl")
    finally:
        await store.close()


@pytest.mark.parametrize("execute", [False, True], ids=["plan", "execute"])
async def test_adopt_over_a_recorded_position_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], execute: bool
) -> None:
    out, config = configured(tmp_path)
    settings = load_settings(config)
    out.write_bytes(b'{"e":1}\n' * 10 + b'{"e":"uncommitted"}\n')  # a kill -9's tail
    await committed(settings, "80")
    flags = ["--execute"] if execute else []
    code, _, err = await cli(capsys, "sink", "adopt", *flags, "--config", str(config))
    assert code == 1, err
    assert "already records the jsonl sink's committed position (80)" in err
    assert await committed(settings) == "80"


async def test_the_file_is_measured_under_the_lease(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon's last lines land between the plan and the lease: the length recorded is
    the file's once the lease is held (measured before it, those lines would be cut)."""
    out, config = configured(tmp_path)
    out.write_bytes(b'{"e":1}\n' * 10)
    real = sink_command.acquire

    async def lines_land_first(*args: object, **kwargs: object) -> object:
        with out.open("ab") as f:
            f.write(b'{"e":2}\n' * 5)
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sink_command, "acquire", lines_land_first)
    code, said, err = await cli(capsys, "sink", "adopt", "--execute", "--config", str(config))
    assert code == 0, err
    assert "80 bytes to record" in said
    assert sink_length(await committed(load_settings(config))) == 120
    assert "at byte 120" in err


async def test_adopt_over_a_position_of_another_file_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rotation switched off while the committed position is in a rotated file: the start
    refuses it and names adopt, which records the configured file."""
    out, config = configured(tmp_path)
    settings = load_settings(config)
    out.write_bytes(b'{"e":1}\n' * 2)
    rotated = '{"file":"events-20261201T000000Z.jsonl","seq":2,"length":40,"started":0}'
    await committed(settings, rotated)
    code, _, err = await cli(capsys, "sink", "adopt", "--execute", "--config", str(config))
    assert code == 0, err
    assert sink_length(await committed(settings)) == 16


async def test_adopt_over_a_recorded_file_of_the_series_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With rotation: the store records file 1 at 80 bytes; a kill -9 left a tail in it and a
    file 2. The start cuts file 1 and deletes file 2; adopt (of the newest, file 2) would have
    vouched for both, written again by the replay."""
    out = tmp_path / "events.jsonl"
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        sink={"type": "jsonl", "path": str(out), "rotate_bytes": 1000},
    )
    settings = load_settings(config)
    one = tmp_path / "events-20250101T000000Z.000001.jsonl"
    one.write_bytes(b'{"e":1}\n' * 10 + b'{"e":"tail"}\n')
    (tmp_path / "events-20250101T000100Z.000002.jsonl").write_bytes(b'{"e":"late"}\n' * 3)
    recorded = f'{{"file":"{one.name}","seq":1,"length":80,"started":1735689600}}'
    await committed(settings, recorded)
    code, _, err = await cli(capsys, "sink", "adopt", "--execute", "--config", str(config))
    assert code == 1, err
    assert "already records the jsonl sink's committed position" in err
    assert await committed(settings) == recorded


# --- following the advice: adopt, then run ------------------------------------------------------

START_AT_ZERO = '[streams.main.subscription]\nstart = "offset"\noffset = "0"\n'


async def run_until_committed(config: Path, state: Path, offset: str, log: Path) -> None:
    """The daemon as a process, until the stream's checkpoint is ``offset``, then SIGTERM."""
    proc = spawn_daemon(config, log)
    try:
        await wait_until(lambda: checkpointed(state, offset) or proc.poll() is not None)
        assert proc.poll() is None, tail(log)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc) == 0, tail(log)
    finally:
        proc.kill()


def ids_in(files: list[Path]) -> list[str]:
    return [
        json.loads(line)["metadata"]["uniqueEventId"]
        for f in files
        for line in f.read_bytes().splitlines()
    ]


def lose_the_store(config: Path, tmp_path: Path) -> Path:
    """Point [state] path at a new file (the old store is lost); the new store's path."""
    new = tmp_path / "new-state.db"
    config.write_text(config.read_text().replace(str(tmp_path / "state.db"), str(new)))
    return new


async def adopt_as_advised(config: Path, out: Path) -> str:
    """`run` refuses the file and names adopt; adopt as it says. Adopt's stderr."""
    ran = run_cli("run", "--config", str(config))
    assert ran.returncode == 78, ran.stderr
    assert "sink adopt --execute" in ran.stderr and "uniqueEventIds as processed" in ran.stderr
    adopted = run_cli("sink", "adopt", "--execute", "--config", str(config))
    assert adopted.returncode == 0, adopted.stderr
    return adopted.stderr


async def test_adopt_then_run_writes_every_event_once(sandbox_factory: Any, tmp_path: Path) -> None:
    """The reviewer's case: the store lost, the file kept, the stream configured to start at
    offset 0. `run` refuses and names adopt; after adopt the new store has no checkpoint, so
    the stream replays from 0: it used to append every event of the file again (4067 lines,
    2140 distinct). A kill -9 had also cut the file's last line short: that line is cut by the
    start and its event written whole, once. Events new since then are appended."""
    gw = await sandbox_factory(backlog=300)
    out, log = tmp_path / "events.jsonl", tmp_path / "daemon.log"
    config = toml_config(tmp_path, gw.url, START_AT_ZERO)
    await run_until_committed(config, tmp_path / "state.db", newest_offset(gw), log)
    data = out.read_bytes()
    assert data.count(b"\n") == 300
    kept = data[: data.rindex(b"\n", 0, len(data) - 1) + 1]  # 299 lines
    out.write_bytes(kept + data[len(kept) : len(kept) + 40])  # and 40 bytes of the 300th
    state = lose_the_store(config, tmp_path)
    gw.append("DEMO", 25)

    said = await adopt_as_advised(config, out)
    events = gw.events("DEMO")
    assert len(processed_ids(state)) == 299
    assert "no checkpoint: the next start subscribes per its configuration (offset 0)" in said
    last = events[298]["metadata"]["offset"]
    assert f"`opera-consumer offset set main {last} --execute`" in said, said
    assert f"at byte {len(kept)}" in said, said

    await run_until_committed(config, state, newest_offset(gw), log)
    assert out.read_bytes().startswith(kept)
    written = ids_in([out])
    assert Counter(written) == Counter(truth_ids(events)), "each event exactly once"
    assert written == truth_ids(events)  # and in order: the cut event first, then the new


async def test_adopt_then_run_with_rotation_writes_every_event_once(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The same with rotation: adopt vouches for every file of the series (the newest's
    length is recorded), so it records the ids of all of them, not the newest's alone."""
    gw = await sandbox_factory(backlog=300)
    out, log = tmp_path / "events.jsonl", tmp_path / "daemon.log"
    sink = f'[sink]\npath = "{out}"\nrotate_bytes = 16384'
    config = toml_config(tmp_path, gw.url, START_AT_ZERO, sink=sink)
    rot = load_settings(config).sink.rotation()  # type: ignore[union-attr]
    assert rot is not None
    await run_until_committed(config, tmp_path / "state.db", newest_offset(gw), log)
    # A series (how many files depends on the batches: a batch never spans two files).
    assert len(rotated_files(out, rot)) >= 2
    before = {f.name: f.read_bytes() for f in rotated_files(out, rot)}
    state = lose_the_store(config, tmp_path)
    gw.append("DEMO", 25)

    said = await adopt_as_advised(config, out)
    assert len(processed_ids(state)) == 300, said

    await run_until_committed(config, state, newest_offset(gw), log)
    files = rotated_files(out, rot)
    for f in files:
        if f.name in before:
            assert f.read_bytes().startswith(before[f.name]), f.name
    written = ids_in(files)
    assert Counter(written) == Counter(truth_ids(gw.events("DEMO"))), "each event exactly once"


# --- what adopt records ------------------------------------------------------------------------


def line(uid: str, offset: str) -> bytes:
    doc = {"metadata": {"offset": offset, "uniqueEventId": uid}, "eventName": "X"}
    return json.dumps(doc).encode() + b"\n"


async def test_the_ids_of_the_configured_path_and_every_rotated_file_are_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With rotation: the path's own lines (from before rotation was configured), every
    rotated file's and the newest's up to its last complete line; a torn last line of the
    newest is left out of both the ids and the length. Not a whole list in memory: a few
    ids per transaction."""
    out = tmp_path / "events.jsonl"
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        sink={"type": "jsonl", "path": str(out), "rotate_bytes": 100000},
    )
    settings = load_settings(config)
    rot = settings.sink.rotation()  # type: ignore[union-attr]
    assert rot is not None
    out.write_bytes(line("p1", "1") + line("p2", "2"))
    (tmp_path / rot.name(1, 0)).write_bytes(line("r1", "3") + line("r2", "4"))
    newest = tmp_path / rot.name(2, 60)
    whole = line("n1", "5") + line("n2", "6")
    newest.write_bytes(whole + line("torn", "7")[:-9])
    monkeypatch.setattr(sink_command, "IDS_PER_COMMIT", 2)
    code, said, err = await cli(capsys, "sink", "adopt", "--execute", "--config", str(config))
    assert code == 0, err
    assert "left out" in said
    state = tmp_path / "state.db"
    assert processed_ids(state) == {"p1", "p2", "r1", "r2", "n1", "n2"}
    position = json.loads(await committed(settings) or "")
    assert (position["file"], position["length"]) == (newest.name, len(whole))
    assert "offset set main 6 --execute" in err, err
    assert "no checkpoint" in err and "gateway's position" in err, err


def subscribed(config: Path, **hotel_codes: list[str]) -> None:
    """Each named stream's subscription.hotel_codes, appended to the config."""
    with config.open("a") as f:
        for stream, codes in hotel_codes.items():
            f.write(f"\n[streams.{stream}.subscription]\nhotel_codes = {json.dumps(codes)}\n")


def hotel_line(uid: str, offset: str, hotel: str | None) -> bytes:
    doc = {"metadata": {"offset": offset, "uniqueEventId": uid}, "eventName": "X"}
    return json.dumps({**doc, "hotelId": hotel}).encode() + b"\n"


async def test_with_several_streams_an_id_is_recorded_for_its_own_stream_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line names no stream, and ids are unique per stream only. Recorded for every stream,
    an id skipped the other stream's event with that id (lost). A line is its stream's where
    the streams' hotel_codes leave one stream that could have sent its hotelId; a line more
    than one could have sent (no hotelId, a hotel no stream names alone) is recorded for none,
    counted and said. Offsets are per stream, so no `offset set` is suggested."""
    out = tmp_path / "events.jsonl"
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        sink={"type": "jsonl", "path": str(out)},
        streams={"east": "E", "west": "W", "all": "A"},
    )
    subscribed(config, east=["H1"], west=["H2", "H3"], all=["H3"])
    out.write_bytes(
        hotel_line("a", "1", "H1")
        + hotel_line("b", "2", "H2")
        + hotel_line("c", "3", "h1")  # hotel codes are not case-sensitive
        + hotel_line("d", "4", "H3")  # west's or all's
        + hotel_line("e", "5", None)  # a chain's event: anyone's
        + hotel_line("f", "6", "H9")  # no stream subscribes to it: not known whose
        + b'{"kept": 1}\n'
    )
    code, said, err = await cli(capsys, "sink", "adopt", "--execute", "--config", str(config))
    assert code == 0, err
    assert "for the stream it came from" in said and "recorded for none" in said
    state = tmp_path / "state.db"
    assert processed_ids(state, "east") == {"a", "c"}
    assert processed_ids(state, "west") == {"b"}
    assert processed_ids(state, "all") == set()
    assert "by stream: all 0, east 2, west 1" in err, err
    assert "3 of 7 lines could have come from more than one of the streams" in err, err
    assert "1 of 7 lines hold no event" in err
    assert "offset set" not in err


async def test_with_several_streams_and_no_hotel_codes_no_id_is_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two chains' streams: any line could be either's; the operator is told what follows
    (written again if sent again) and what to do."""
    out = tmp_path / "events.jsonl"
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        sink={"type": "jsonl", "path": str(out)},
        streams={"east": "E", "west": "W"},
    )
    out.write_bytes(hotel_line("a", "1", "H1") + hotel_line("b", "2", "H2"))
    code, _, err = await cli(capsys, "sink", "adopt", "--execute", "--config", str(config))
    assert code == 0, err
    for stream in ("east", "west"):
        assert processed_ids(tmp_path / "state.db", stream) == set()
    assert "2 of 2 lines could have come from more than one of the streams east, west" in err
    assert "hotel_codes" in err and "writes them again" in err
    assert sink_length(await committed(load_settings(config))) == out.stat().st_size


SHARED = "same-id-in-two-chains"


def shared(offset: str, key: str) -> str:
    """A valid event whose uniqueEventId another chain's event has too."""
    return json.dumps(
        {
            "metadata": {"offset": offset, "uniqueEventId": SHARED},
            "moduleName": "Reservation",
            "eventName": "UPDATE RESERVATION",
            "primaryKey": key,
            "hotelId": "HOTEL1",
            "timestamp": "28-APR-24 06.18.59.028027 AM",
            "detail": [],
        }
    )


async def test_adopt_then_run_with_two_streams_loses_no_event_of_a_shared_id(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """Two chains, one file. East's event with an id that west's next event has too is in
    the file; the store is lost; adopt recorded that id for west as well, so west's own event
    with it was skipped as a duplicate: lost. Now no line of the file is recorded (either
    stream could have sent any): both streams replay into it (duplicates), and west's event
    is written."""
    gw = await sandbox_factory(backlog=40, chains=("E", "W"))
    out, log = tmp_path / "events.jsonl", tmp_path / "daemon.log"
    config = write_config(
        tmp_path,
        gw.url,
        sink={"type": "jsonl", "path": str(out)},
        streams={"east": "E", "west": "W"},
    )
    with config.open("a") as f:
        for stream in ("east", "west"):
            f.write(f'\n[streams.{stream}.subscription]\nstart = "offset"\noffset = "0"\n')
    east, west = gw.events("E"), gw.events("W")
    east_last = str(int(east[-1]["metadata"]["offset"]) + 1)
    gw.inject_event("E", shared(east_last, "EAST-1"))
    west_last = west[-1]["metadata"]["offset"]
    state = tmp_path / "state.db"

    async def run_until(state: Path, west_at: str) -> None:
        proc = spawn_daemon(config, log)
        try:
            await wait_until(
                lambda: (
                    (
                        checkpointed(state, east_last, "east")
                        and checkpointed(state, west_at, "west")
                    )
                    or proc.poll() is not None
                ),
                timeout=60,
            )
            assert proc.poll() is None, tail(log)
            proc.send_signal(signal.SIGTERM)
            assert await wait_exit(proc) == 0, tail(log)
        finally:
            proc.kill()

    await run_until(state, west_last)
    first = ids_in([out])
    assert Counter(first) == Counter([*truth_ids(east), SHARED, *truth_ids(west)])
    state = lose_the_store(config, tmp_path)
    west_new = str(int(west_last) + 1)
    gw.inject_event("W", shared(west_new, "WEST-1"))

    said = await adopt_as_advised(config, out)
    assert "could have come from more than one of the streams east, west" in said, said
    await run_until(state, west_new)
    lines = [json.loads(x) for x in out.read_bytes().splitlines()]
    keys = [x["primaryKey"] for x in lines if x["metadata"]["uniqueEventId"] == SHARED]
    assert keys.count("WEST-1") == 1, "west's event with the shared id is written, once"
    assert keys.count("EAST-1") == 2  # east's: adopted, then written again by the replay
    # Nothing recorded: every line of the file written again by the replay, then west's new.
    assert Counter(ids_in([out])) == Counter(first * 2 + [SHARED])


async def test_adopt_stopped_half_way_records_no_position_and_runs_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The position goes in the last chunk's transaction: adopt stopped before it left the
    start refusing (no position), and adopt runs again over the ids it recorded."""
    out, config = configured(tmp_path)
    out.write_bytes(b"".join(line(f"e{i}", str(i + 1)) for i in range(5)))
    monkeypatch.setattr(sink_command, "IDS_PER_COMMIT", 2)
    real = sink_command._record

    async def stopped(store: Any, lines: Any, position: str) -> None:
        ids = await sink_command.asyncio.to_thread(lines.chunk, 2)
        await store.commit(sink_command.CommitBatch(processed=ids))
        raise StoreError("database or disk is full", retriable=True)

    monkeypatch.setattr(sink_command, "_record", stopped)
    with pytest.raises(StoreError, match="full"):
        await sink_command.adopt(load_settings(config), execute=True)
    state = tmp_path / "state.db"
    assert query(state, "SELECT * FROM sink_state") == []
    assert processed_ids(state) == {"e0", "e1"}
    monkeypatch.setattr(sink_command, "_record", real)
    code, _, err = await cli(capsys, "sink", "adopt", "--execute", "--config", str(config))
    assert code == 0, err
    assert processed_ids(state) == {f"e{i}" for i in range(5)}
    assert sink_length(await committed(load_settings(config))) == out.stat().st_size
