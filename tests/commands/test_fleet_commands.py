"""``opera-consumer fleet status | drain`` against the coordination tables of a real PostgreSQL
state store (tests/pg.py: the tests skip without the server binaries), with member and lease
rows written through :class:`FleetTable` for members that exist only in the test.

The fleet used by most tests, on streams a, b, c and d (and the lease row of a stream "old"
no longer configured):

* m1 (weight 1) holds a and b; m2 (weight 2) holds c;
* m3 held d, and its heartbeat and lease ran out: m3 is gone, d's lease expired;
* stream a has a checkpoint at offset 4711, committed 100 s ago.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from fleet_support import fleet_settings
from operator_support import cli
from support import running, wait_until

from consumer.config import StateSettings
from consumer.config.settings import FleetSettings
from consumer.core.records import CommitBatch, Fence
from consumer.core.watermark import Position
from consumer.errors import Fenced
from consumer.runtime.daemon import Daemon
from consumer.state import PostgresStore, open_store
from consumer.state.fleet import FleetTable

pytestmark = pytest.mark.usefixtures("hermetic_config")

STREAMS = ("a", "b", "c", "d")


def write_config(
    tmp_path: Path,
    *,
    dsn: str,
    schema: str,
    backend: str = "postgres",
    fleet: bool = True,
    name: str = "config.toml",
) -> Path:
    lines: list[str] = []
    for stream in STREAMS:
        lines += [
            f"[streams.{stream}]",
            'gateway_url = "http://127.0.0.1:9"',
            f'chain_code = "CH{stream.upper()}"',
            'app_key = "key-0001"',
            f"[streams.{stream}.auth]",
            'client_id = "cid"',
            'client_secret = "secret-0002"',
        ]
    lines += ["[state]", f'backend = "{backend}"']
    if backend == "postgres":
        lines += [f'dsn = "{dsn}"', f'schema = "{schema}"']
    lines += [
        f'path = "{tmp_path / "absent.db"}"',
        "[sink]",
        'type = "webhook"',
        'url = "http://127.0.0.1:9/hook"',
        "[metrics]",
        "enabled = false",
    ]
    if fleet:
        lines += ["[fleet]", "enabled = true", "lease_ttl_s = 30", "renew_interval_s = 5"]
        # A handover, 2 x (complete + 2) + drain, fits in the 30 s lease minus a tick.
        lines += ["[pipeline]", "drain_timeout_s = 1"]
        for stream in STREAMS:
            lines += [f"[streams.{stream}.connection]", "complete_timeout_s = 1"]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def member(
    state: StateSettings, name: str, *, weight: float = 1.0, ttl: float = 30.0
) -> FleetTable:
    return FleetTable(
        state,
        name,
        host=f"host-{name}",
        pid=1000 + int(name[1:]),
        weight=weight,
        started_at=time.time() - 3600,
        lease_ttl_s=ttl,
    )


@dataclass
class Fleet:
    config: Path
    state: StateSettings
    dsn: str
    schema: str

    async def flags(self) -> dict[str, bool]:
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            rows = await conn.fetch(f'SELECT member, draining FROM "{self.schema}".fleet_members')
        finally:
            await conn.close()
        return {str(r[0]): bool(r[1]) for r in rows}

    async def epochs(self) -> dict[str, int]:
        """Each lease row's epoch (a row starts at the database's clock in microseconds)."""
        conn = await asyncpg.connect(self.dsn, timeout=10)
        try:
            rows = await conn.fetch(f'SELECT stream, epoch FROM "{self.schema}".stream_leases')
        finally:
            await conn.close()
        return {str(r[0]): int(r[1]) for r in rows}


@pytest.fixture
async def empty_fleet(postgres_dsn: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    """A fleet config on a schema of its own, created as the daemon creates it."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    state = StateSettings(backend="postgres", dsn=postgres_dsn, schema=schema)
    store = await open_store(state)
    await store.close()
    try:
        yield Fleet(
            write_config(tmp_path, dsn=postgres_dsn, schema=schema), state, postgres_dsn, schema
        )
    finally:
        conn = await asyncpg.connect(postgres_dsn, timeout=10)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
async def fleet(empty_fleet: Fleet) -> AsyncIterator[Fleet]:
    state = empty_fleet.state
    store = await open_store(state, create=False)
    try:
        batch = CommitBatch(checkpoints={"a": Position("4711", "u4711")})
        batch.event_at["a"] = time.time() - 100  # its event's time: the lag
        await store.commit(batch, now=time.time() - 1)
    finally:
        await store.close()
    m1, m2 = member(state, "m1"), member(state, "m2", weight=2.0)
    m3 = member(state, "m3", ttl=0.2)
    try:
        await m1.join([*STREAMS, "old"], 10)
        for m in (m1, m2, m3):
            await m.tick({}, 10)
        await m1.tick({}, 10, connected=True, avoiding=["d"])  # it cannot connect d, say
        assert [a.stream for a in await m1.acquire(["a", "b"], 10)] == ["a", "b"]
        assert [a.stream for a in await m2.acquire(["c"], 10)] == ["c"]
        assert [a.stream for a in await m3.acquire(["d"], 10)] == ["d"]
        await asyncio.sleep(0.3)  # m3's heartbeat and lease run out
        yield empty_fleet
    finally:
        for m in (m1, m2, m3):
            await m.close()


def columns(line: str) -> list[str]:
    return line.split()


# --- status -----------------------------------------------------------------------------------


async def test_fleet_status_table(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await cli(capsys, "fleet", "status", "--config", str(fleet.config))
    assert code == 0, err
    members, streams, summary = out.strip("\n").split("\n\n")

    header, *rows = members.splitlines()
    assert columns(header) == [
        "member",
        "host",
        "pid",
        "weight",
        "state",
        "share",
        "streams_held",
        "heartbeat_age_s",
        "started_at",
        "connected_age_s",
        "avoiding",
    ]
    by_member = {columns(r)[0]: columns(r) for r in rows}
    assert sorted(by_member) == ["m1", "m2", "m3"]
    # 4 streams over weights 1 and 2: shares ceil(4/3) = 2 and ceil(8/3) = 3
    assert by_member["m1"][1:7] == ["host-m1", "1001", "1.0", "live", "2", "2"]
    assert by_member["m2"][1:7] == ["host-m2", "1002", "2.0", "live", "3", "1"]
    assert by_member["m3"][1:7] == ["host-m3", "1003", "1.0", "gone", "-", "0"]
    assert 0 <= float(by_member["m1"][7]) < 10
    assert float(by_member["m3"][7]) > 0.2  # its last heartbeat: before the 0.3 s sleep
    assert by_member["m1"][8].endswith("Z")
    assert 0 <= float(by_member["m1"][9]) < 10 and by_member["m1"][10] == "d"
    assert by_member["m2"][9:] == ["-", "-"]  # never connected a stream, avoids none

    header, *rows = streams.splitlines()
    assert columns(header) == [
        "stream",
        "lease",
        "holder",
        "epoch",
        "expires_in_s",
        "offset",
        "lag_s",
    ]
    by_stream = {columns(r)[0]: columns(r) for r in rows}
    assert sorted(by_stream) == ["a", "b", "c", "d", "old"]
    epochs = await fleet.epochs()
    assert by_stream["a"][1:4] == ["held", "m1", str(epochs["a"])]
    assert 20 < float(by_stream["a"][4]) <= 30
    assert by_stream["a"][5] == "4711"
    assert 99 <= float(by_stream["a"][6]) < 130
    assert by_stream["b"][1:4] + by_stream["b"][5:] == ["held", "m1", str(epochs["b"]), "-", "-"]
    assert by_stream["c"][1:3] == ["held", "m2"]
    assert by_stream["d"][1:3] == ["expired", "m3"] and float(by_stream["d"][4]) < 0
    assert by_stream["old"][1:] == ["free", "-", str(epochs["old"]), "-", "-", "-"]

    assert summary == (
        "2 members live, 3/4 streams held; unheld: d (leases last 30 s, renewed every 5 s)"
    )


async def test_fleet_status_json(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await cli(capsys, "fleet", "status", "--json", "--config", str(fleet.config))
    assert code == 0, err
    doc = json.loads(out)
    assert sorted(doc) == ["members", "streams"]
    members = {m["member"]: m for m in doc["members"]}
    m1 = members["m1"]
    assert {k: m1[k] for k in ("host", "pid", "weight", "state", "draining", "share")} == {
        "host": "host-m1",
        "pid": 1001,
        "weight": 1.0,
        "state": "live",
        "draining": False,
        "share": 2,
    }
    assert m1["streams_held"] == 2 and isinstance(m1["heartbeat_age_s"], float)
    assert m1["started_at"].endswith("Z")
    assert isinstance(m1["connected_age_s"], float) and m1["avoiding"] == ["d"]
    assert (members["m2"]["connected_age_s"], members["m2"]["avoiding"]) == (None, [])
    assert (members["m3"]["state"], members["m3"]["share"]) == ("gone", None)

    streams = {s["stream"]: s for s in doc["streams"]}
    a = streams["a"]
    assert (a["lease"], a["holder"], a["epoch"], a["offset"], a["configured"]) == (
        "held",
        "m1",
        (await fleet.epochs())["a"],
        "4711",
        True,
    )
    assert 20 < a["expires_in_s"] <= 30 and 99 <= a["lag_s"] < 130
    assert (streams["d"]["lease"], streams["d"]["holder"]) == ("expired", "m3")
    assert streams["d"]["expires_in_s"] < 0
    old = streams["old"]
    assert (old["lease"], old["holder"], old["expires_in_s"], old["configured"]) == (
        "free",
        None,
        None,
        False,
    )


async def test_fleet_status_shows_member_rows_with_absurd_values_as_they_are(
    empty_fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """The members' rows are anyone's (another version, a manual edit): a weight of Infinity
    made `fleet status` exit 70 (ValueError from the share, NaN), a start time of 1e300 too
    (OverflowError from the calendar). They show as they are; the weight counts as 0."""
    state = empty_fleet.state
    m1 = member(state, "m1")
    odd = [
        FleetTable(
            state, name, host="h", pid=2, weight=weight, started_at=started,
            lease_ttl_s=30.0,
        )
        for name, weight, started in (
            ("m2", math.inf, 0.0), ("m3", math.nan, 1e300), ("m4", 1.0, math.nan),
        )
    ]  # fmt: skip
    try:
        for m in (m1, *odd):
            await m.tick({}, 10)
        code, out, err = await cli(capsys, "fleet", "status", "--config", str(empty_fleet.config))
        assert code == 0, err
        rows = {columns(r)[0]: columns(r) for r in out.split("\n\n")[0].splitlines()[1:]}
        assert rows["m2"][3:6] == ["inf", "live", "0"]
        assert (rows["m3"][3:6], rows["m3"][8]) == (["nan", "live", "0"], "1e+300")
        assert (rows["m4"][5], rows["m4"][8]) == ("2", "nan")
        assert rows["m1"][5] == "2"  # m4 and m1 share the 4 streams; m2, m3 count as 0
        code, out, err = await cli(
            capsys, "fleet", "status", "--json", "--config", str(empty_fleet.config)
        )
        assert code == 0, err
        members = {m["member"]: m for m in json.loads(out)["members"]}
        assert (members["m2"]["share"], members["m3"]["started_at"]) == (0, "1e+300")
    finally:
        for m in (m1, *odd):
            await m.close()


async def test_fleet_status_before_any_member_joined(
    empty_fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await cli(capsys, "fleet", "status", "--config", str(empty_fleet.config))
    assert code == 0, err
    assert out.startswith("no fleet members")
    assert "0 members live, 0/4 streams held; unheld: a, b, c, d" in out
    code, out, err = await cli(
        capsys, "fleet", "status", "--json", "--config", str(empty_fleet.config)
    )
    assert code == 0, err
    doc = json.loads(out)
    assert doc["members"] == []
    assert [(s["stream"], s["lease"], s["epoch"]) for s in doc["streams"]] == [
        (s, "free", None) for s in STREAMS
    ]


async def test_fleet_status_on_a_database_the_fleet_never_ran_on(
    postgres_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing schema is refused (78, with the fix), not created."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    config = write_config(tmp_path, dsn=postgres_dsn, schema=schema)
    for command in (("status",), ("drain", "m1")):
        code, _, err = await cli(capsys, "fleet", *command, "--config", str(config))
        assert code == 78
        assert f"no state in schema {schema}" in err
    conn = await asyncpg.connect(postgres_dsn, timeout=10)
    try:
        assert not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", schema
        )
    finally:
        await conn.close()


# --- drain ------------------------------------------------------------------------------------


async def test_fleet_drain_and_undo(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ("--config", str(fleet.config))
    assert await fleet.flags() == {"m1": False, "m2": False, "m3": False}

    code, out, err = await cli(capsys, "fleet", "drain", "m1", *cfg)
    assert code == 0, err
    assert await fleet.flags() == {"m1": True, "m2": False, "m3": False}
    assert "member m1 is draining: its fair share is 0" in out
    assert "hands its 2 streams over gracefully" in out and "a, b" in out
    assert "the other live members take them at their next ticks: m2" in out
    assert "fleet drain m1 --undo" in out

    code, out, err = await cli(capsys, "fleet", "status", "--json", *cfg)
    assert code == 0, err
    members = {m["member"]: m for m in json.loads(out)["members"]}
    assert (members["m1"]["state"], members["m1"]["draining"], members["m1"]["share"]) == (
        "draining",
        True,
        0,
    )
    assert members["m2"]["share"] == 4  # every stream: the only member not draining
    code, out, err = await cli(capsys, "fleet", "status", *cfg)
    assert "2 members live (1 draining), 3/4 streams held" in out

    # Draining the last member that is not: nobody is left to take the streams.
    code, out, err = await cli(capsys, "fleet", "drain", "m2", *cfg)
    assert code == 0, err
    assert "WARNING: no other live member that is not draining" in out

    code, out, err = await cli(capsys, "fleet", "drain", "m1", "--undo", *cfg)
    assert code == 0, err
    assert await fleet.flags() == {"m1": False, "m2": True, "m3": False}
    assert "member m1 is no longer draining" in out
    code, out, err = await cli(capsys, "fleet", "drain", "m1", "--undo", *cfg)
    assert code == 0, err
    assert "it was not draining: nothing changes" in out

    # A member that is gone keeps the flag for when it comes back under its name.
    code, out, err = await cli(capsys, "fleet", "drain", "m3", *cfg)
    assert code == 0, err
    assert "it holds no stream: nothing moves" in out
    assert "member m3 has no live heartbeat" in out
    assert (await fleet.flags())["m3"] is True


async def test_fleet_forget_removes_a_gone_member_and_refuses_a_live_one(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """A retired host's row stayed in `fleet status` for good (as "gone"), with its draining
    flag for a name nobody uses any more: nothing removed it."""
    cfg = ("--config", str(fleet.config))
    code, out, err = await cli(capsys, "fleet", "drain", "m3", *cfg)  # gone, and draining
    assert code == 0, err

    code, out, err = await cli(capsys, "fleet", "forget", "m1", *cfg)
    assert code == 1
    assert "fleet member 'm1' is live" in err and "stop it first" in err
    assert set(await fleet.flags()) == {"m1", "m2", "m3"}

    code, out, err = await cli(capsys, "fleet", "forget", "m3", *cfg)
    assert code == 0, err
    assert "forgot fleet member 'm3' (it was draining)" in out
    assert set(await fleet.flags()) == {"m1", "m2"}
    code, out, err = await cli(capsys, "fleet", "status", "--json", *cfg)
    assert [m["member"] for m in json.loads(out)["members"]] == ["m1", "m2"]

    code, out, err = await cli(capsys, "fleet", "forget", "m3", *cfg)
    assert code == 1
    assert "no gone fleet member 'm3'" in err and "m1, m2" in err


@pytest.mark.parametrize("expires", ["'Infinity'::float8", "'NaN'::float8", "n + 1e9"])
async def test_fleet_forget_removes_a_row_expiring_when_no_heartbeat_sets(
    fleet: Fleet, capsys: pytest.CaptureFixture[str], expires: str
) -> None:
    """A row expiring at Infinity (or a year ahead: no member's heartbeat sets that) was live
    for ever: `fleet status` counted its weight in every share, and `fleet forget` refused
    it ("is live"). It is gone, and forgotten."""
    conn = await asyncpg.connect(fleet.dsn, timeout=10)
    try:
        await conn.execute(
            f'INSERT INTO "{fleet.schema}".fleet_members (member, host, pid, weight, '
            f"started_at, heartbeat_at, expires_at) SELECT 'ghost', 'h', 1, 1, 0, n, {expires} "
            "FROM (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS n) t"
        )
    finally:
        await conn.close()
    cfg = ("--config", str(fleet.config))
    code, out, err = await cli(capsys, "fleet", "status", "--json", *cfg)
    assert code == 0, err
    members = {m["member"]: m for m in json.loads(out)["members"]}
    assert (members["ghost"]["state"], members["ghost"]["share"]) == ("gone", None)
    assert (members["m1"]["share"], members["m2"]["share"]) == (2, 3)  # as without the ghost

    code, out, err = await cli(capsys, "fleet", "forget", "ghost", *cfg)
    assert code == 0, err
    assert "forgot fleet member 'ghost'" in out
    assert set(await fleet.flags()) == {"m1", "m2", "m3"}


async def test_fleet_drain_unknown_member(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await cli(capsys, "fleet", "drain", "nope", "--config", str(fleet.config))
    assert code == 1
    assert out == ""
    assert "no fleet member 'nope'" in err and "m1, m2, m3" in err
    assert "opera-consumer fleet status" in err
    assert await fleet.flags() == {"m1": False, "m2": False, "m3": False}
    code, _, err = await cli(
        capsys, "fleet", "drain", "nope", "--undo", "--config", str(fleet.config)
    )
    assert code == 1 and "fleet status" in err


# --- refused without fleet mode (no server needed) --------------------------------------------


@pytest.mark.parametrize("command", [("status",), ("status", "--json"), ("drain", "m1")])
async def test_fleet_commands_need_fleet_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    """Refused before anything connects (the DSN points at a closed port)."""
    dsn = "postgresql://u:pw-0003@127.0.0.1:9/db"
    no_fleet = write_config(tmp_path, dsn=dsn, schema="opera_consumer", fleet=False)
    code, out, err = await cli(capsys, "fleet", *command, "--config", str(no_fleet))
    assert code == 78
    assert out == ""
    assert "fleet.enabled" in err and "[fleet] enabled = true" in err
    assert "pw-0003" not in err

    sqlite = write_config(
        tmp_path, dsn=dsn, schema="x", backend="sqlite", fleet=False, name="s.toml"
    )
    code, out, err = await cli(capsys, "fleet", *command, "--config", str(sqlite))
    assert code == 78
    assert "state.backend" in err and 'backend = "postgres"' in err
    assert not (tmp_path / "absent.db").exists()


async def test_fleet_help_names_the_actions(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await cli(capsys, "fleet", "--help")
    assert code == 0
    assert "status" in out and "drain" in out
    code, out, _ = await cli(capsys, "fleet", "drain", "--help")
    assert code == 0
    assert "--undo" in out and "exit status" in out
    code, _, err = await cli(capsys, "fleet", "drain")
    assert code == 2 and "member" in err


# --- offset set / reset in a fleet --------------------------------------------------------------


async def test_offset_set_is_refused_while_a_live_member_holds_the_stream(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await cli(
        capsys, "offset", "set", "a", "5000", "--execute", "--config", str(fleet.config)
    )
    assert code != 0
    assert "m1" in err and "a" in err
    store = await open_store(fleet.state, create=False)
    try:
        cp = await store.checkpoint("a")
    finally:
        await store.close()
    assert cp is not None and cp.offset == "4711"  # unchanged


async def test_offset_set_on_an_expired_lease_fences_its_old_holder(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """d's holder (m3) is gone and its lease expired: the change goes through under a lease
    of the command's own, whose new epoch refuses m3's late commits; the lease is free after."""
    before = (await fleet.epochs())["d"]
    code, _, err = await cli(
        capsys, "offset", "set", "d", "777", "--execute", "--config", str(fleet.config)
    )
    assert code == 0, err
    store = await open_store(fleet.state, create=False)
    try:
        cp = await store.checkpoint("d")
    finally:
        await store.close()
    assert cp is not None and cp.offset == "777"
    conn = await asyncpg.connect(fleet.dsn, timeout=10)
    try:
        row = await conn.fetchrow(
            f'SELECT holder, epoch FROM "{fleet.schema}".stream_leases WHERE stream = $1', "d"
        )
    finally:
        await conn.close()
    assert row is not None and row["holder"] is None and row["epoch"] == before + 1


@pytest.mark.parametrize("holder", [None, "m3"])
async def test_offset_set_on_a_lease_row_at_the_top_epoch_is_refused_with_the_fix(
    fleet: Fleet, holder: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """d's row is at the largest epoch (a manual edit, another process's row), free or its
    holder gone: the command's hold fences whoever held a row with epoch + 1, which overflowed
    bigint, and the command ended on a raw store error. It is refused (1, as the other
    refusals), naming the stream and the fix; nothing changes."""
    conn = await asyncpg.connect(fleet.dsn, timeout=10)
    try:
        await conn.execute(
            f'UPDATE "{fleet.schema}".stream_leases SET epoch = $1, holder = $2 WHERE stream = $3',
            2**63 - 1,
            holder,
            "d",
        )
    finally:
        await conn.close()
    for args in (("set", "d", "777"), ("reset", "d", "--highest")):
        code, out, err = await cli(
            capsys, "offset", *args, "--execute", "--config", str(fleet.config)
        )
        [line] = [x for x in err.splitlines() if x.startswith("opera-consumer:")]
        assert code == 1 and out == "", err
        assert "stream d" in line and "largest epoch" in line, line
        assert f"delete its row from {fleet.schema}.stream_leases" in line, line
        assert len(line) < 1000 and "Traceback" not in err
    assert await _state_of(fleet.state, "d") == (None, None)
    assert (await fleet.epochs())["d"] == 2**63 - 1


async def test_a_daemon_outside_the_fleet_refuses_its_schema(fleet: Fleet, tmp_path: Path) -> None:
    """Forgetting [fleet] enabled on one host must not make it consume every stream beside
    the fleet: it refuses to start, naming the members."""
    from consumer.config import load_settings
    from consumer.errors import LeaseHeld
    from consumer.runtime.daemon import Daemon

    config = write_config(tmp_path, dsn=fleet.dsn, schema=fleet.schema, fleet=False, name="x.toml")
    with pytest.raises(LeaseHeld, match="m1"):
        await Daemon.create(load_settings(config))


async def test_fleet_drain_escapes_the_other_members_names(
    empty_fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """Names come from other members' configs (or hostnames): an escape sequence in one
    reaches the operator's terminal as text, as in `fleet status`'s cells."""
    state = empty_fleet.state
    m1 = member(state, "m1")
    evil = FleetTable(
        state, "m2\x1b]0;pwned\x07\x1b[2J", host="h", pid=2, weight=1.0,
        started_at=time.time(), lease_ttl_s=30.0,
    )  # fmt: skip
    try:
        await m1.join(list(STREAMS), 10)
        for m in (m1, evil):
            await m.tick({}, 10)
        await m1.acquire(["a"], 10)
        code, out, err = await cli(
            capsys, "fleet", "drain", "m1", "--config", str(empty_fleet.config)
        )
        assert code == 0, err
        assert "\x1b" not in out and "\x07" not in out
        assert "take them at their next ticks: m2\\x1b]0;pwned\\x07\\x1b[2J" in out
    finally:
        for m in (m1, evil):
            await m.close()


async def test_fleet_drain_of_an_unknown_member_escapes_the_members_names(
    empty_fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """The refusal lists the members there are: their names, from other members' configs
    (or hostnames), are escaped in the error itself, as `fleet status` and the drain's story
    escape them (not only by the CLI's printing: the error is logged, raised to callers)."""
    from consumer.commands import fleet as commands
    from consumer.config import load_settings
    from consumer.errors import OperatorRefused

    state = empty_fleet.state
    evil = FleetTable(
        state, "m2\x1b]0;pwned\x07\x1b[2J", host="h", pid=2, weight=1.0,
        started_at=time.time(), lease_ttl_s=30.0,
    )  # fmt: skip
    escaped = "(members: m2\\x1b]0;pwned\\x07\\x1b[2J)"
    try:
        await evil.tick({}, 10)
        with pytest.raises(OperatorRefused) as refused:
            await commands.drain(load_settings(empty_fleet.config), "nope", undo=False)
        assert "\x1b" not in str(refused.value) and escaped in str(refused.value)
        code, out, err = await cli(
            capsys, "fleet", "drain", "nope", "--config", str(empty_fleet.config)
        )
        assert code == 1 and out == ""
        assert "\x1b" not in err and "\x07" not in err and escaped in err
    finally:
        await evil.close()


# --- offset set / reset whatever the operator's [fleet] says -------------------------------------
# The daemon refuses a schema used the other way (a single daemon beside members, or the
# reverse); an operator's config may still say either. The command looks at, and holds, both.


async def _state_of(state: StateSettings, stream: str) -> tuple[str | None, str | None]:
    """The stream's checkpoint offset and pending start override."""
    store = await open_store(state, create=False)
    try:
        cp = await store.checkpoint(stream)
        return (cp.offset if cp else None), await store.start_override(stream)
    finally:
        await store.close()


async def _ran_and_left(dsn: str, schema: str, member: str) -> None:
    """A real member (streams a and b) runs until it holds its leases, then stops: the
    schema has the fleet's lease rows, free, and no live member."""
    async with running(fleet_settings(dsn, schema, member)) as daemon:
        await wait_until(lambda: daemon.fleet is not None and daemon.fleet.leases_held == 2)


def _leased(daemon: Daemon) -> bool:
    return daemon.fleet is not None and daemon.fleet.leases_held == 2


@pytest.mark.usefixtures("contained_logging")
async def test_offset_with_fleet_off_is_refused_beside_a_running_member(
    empty_fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Member m1 (a daemon) holds a and b. With [fleet] off the command looked at the single
    daemon's lease alone: it set a under m1, whose next commit writes its own position over
    it. It is refused, for a stream m1 holds and for one nobody holds yet (m1 may take it at
    any tick; a reset would be dropped by its first commit), naming m1."""
    single = write_config(
        tmp_path, dsn=empty_fleet.dsn, schema=empty_fleet.schema, fleet=False, name="s.toml"
    )
    async with running(fleet_settings(empty_fleet.dsn, empty_fleet.schema, "m1")) as m1:
        await wait_until(lambda: _leased(m1))
        for args in (("set", "a", "100"), ("reset", "c", "--highest")):
            for execute in ((), ("--execute",)):
                code, _, err = await cli(capsys, "offset", *args, *execute, "--config", str(single))
                assert code == 1, (args, execute, err)
                assert "m1" in err
        assert "[fleet] enabled = true" in err  # c: nobody holds it, the config is wrong
        assert m1.fleet is not None and m1.fleet.counters.lost == 0
    assert await _state_of(empty_fleet.state, "a") == (None, None)
    assert await _state_of(empty_fleet.state, "c") == (None, None)


@pytest.mark.usefixtures("contained_logging")
async def test_offset_with_fleet_on_is_refused_beside_a_single_daemon(
    empty_fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """The other way: a daemon outside the fleet holds the schema's advisory lease, and the
    lease rows of a fleet that ran before are there, free. With [fleet] on the command
    looked at the rows alone, took a free one and wrote under the daemon."""
    await _ran_and_left(empty_fleet.dsn, empty_fleet.schema, "m0")
    alone = fleet_settings(empty_fleet.dsn, empty_fleet.schema, "m0")
    alone = alone.model_copy(update={"fleet": FleetSettings()})
    async with running(alone) as daemon:
        assert daemon.fleet is None
        for args in (("set", "a", "100"), ("reset", "b", "--highest")):
            for execute in ((), ("--execute",)):
                code, _, err = await cli(
                    capsys, "offset", *args, *execute, "--config", str(empty_fleet.config)
                )
                assert code == 1, (args, execute, err)
                assert f"pid {os.getpid()}" in err
    assert await _state_of(empty_fleet.state, "a") == (None, None)
    assert await _state_of(empty_fleet.state, "b") == (None, None)


async def test_offset_with_fleet_off_fences_a_member_past_its_lease(
    empty_fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """m3 held d; its heartbeat and lease ran out (frozen, say), nobody took d. The change
    goes through, and m3's late commit is refused: the command took d's row at a new epoch,
    whatever its [fleet] says (with it off, m3 wrote over the change)."""
    m3 = member(empty_fleet.state, "m3", ttl=0.0)  # expired as soon as written
    try:
        await m3.join(STREAMS, 10)
        await m3.tick({}, 10)
        [got] = await m3.acquire(["d"], 10)
        single = write_config(
            tmp_path, dsn=empty_fleet.dsn, schema=empty_fleet.schema, fleet=False, name="s.toml"
        )
        code, _, err = await cli(
            capsys, "offset", "set", "d", "777", "--execute", "--config", str(single)
        )
        assert code == 0, err
        late = CommitBatch(checkpoints={"d": Position("9000", "u9000")})
        late.fence = Fence("m3", {"d": got.epoch})
        store = await open_store(empty_fleet.state, create=False)
        try:
            with pytest.raises(Fenced):
                await store.commit(late)
        finally:
            await store.close()
    finally:
        await m3.close()
    assert await _state_of(empty_fleet.state, "d") == ("777", None)


@pytest.mark.usefixtures("contained_logging")
async def test_no_member_takes_the_stream_while_offset_set_changes_it(
    empty_fleet: Fleet,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fleet ran on the schema and left; a member starts while the command (its config has
    [fleet] off) writes. It must not take the stream then (it would read the position the
    change replaces, and commit over it), and takes it once the command is done."""
    await _ran_and_left(empty_fleet.dsn, empty_fleet.schema, "m0")
    taken: list[list[str]] = []
    write = PostgresStore.set_offset

    async def while_writing(store: PostgresStore, stream: str, offset: str) -> None:
        newcomer = member(empty_fleet.state, "m1")
        try:
            taken.append([a.stream for a in await newcomer.acquire([stream], 10)])
        finally:
            await newcomer.close()
        await write(store, stream, offset)

    monkeypatch.setattr(PostgresStore, "set_offset", while_writing)
    single = write_config(
        tmp_path, dsn=empty_fleet.dsn, schema=empty_fleet.schema, fleet=False, name="s.toml"
    )
    code, _, err = await cli(
        capsys, "offset", "set", "a", "100", "--execute", "--config", str(single)
    )
    assert code == 0, err
    assert taken == [[]]
    assert await _state_of(empty_fleet.state, "a") == ("100", None)
    newcomer = member(empty_fleet.state, "m1")
    try:
        assert [a.stream for a in await newcomer.acquire(["a"], 10)] == ["a"]
    finally:
        await newcomer.close()
