"""Fleet mode end to end: daemon processes sharing a PostgreSQL state store split 30 streams
of the sandbox between them, and every failure ends with each event in the sink exactly once.

One scenario, in phases, with the fleet's timers scaled down (6 s leases, 0.5 s ticks: a
handover, 2 x (complete_timeout_s + 2) + drain_timeout_s, must fit in a lease minus a tick):
three members share the streams → ``kill -9`` of one: its streams resume on the others → a
fourth joins: the streams rebalance → ``SIGSTOP`` of one past its lease, others take over,
``SIGCONT``: its late commit is refused by the epoch → one is cut off from PostgreSQL (a TCP
proxy the test black-holes): it stops its subscriptions, the others take over → the end.

Ground truth is the sandbox's event log. The sink is ``postgres`` on the state database (rows
commit with the checkpoint); a trigger the test puts on the sink table records every row
written (insert or update) in an audit table, so a second write of any event, even an
identical upsert, shows. The sandbox counts second subscribers (it would answer them 4409):
none may ever happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from fleet_support import chain, member_config, sandbox_options, stream
from pg import proxied, sql
from support import FAST_CONNECTION, spawn_daemon, wait_until
from tcp_proxy import TcpProxy

from consumer.sandbox import SandboxGateway
from consumer.sinks.postgres import create_table_sql

STREAMS = 30
# Three phases wait out a lease: the shortest the settings allow (a handover of 2 x (0.5 + 2)
# + 0.5 s, the 2 s being STOP_GRACE_S, and a tick).
TTL_S = 6.0
TICK_S = 0.5
TABLE = "fleet_events"
LOCKOUT_S = 0.5
# A stream of a dead member resumes elsewhere within its lease's expiry, a tick, the status
# poll and the lockout; the rest is the processes' and the database's own pace on a loaded
# machine (a positive condition bounds each wait, never a sleep).
RESUME_BOUND_S = TTL_S + TICK_S + 1.0 + LOCKOUT_S + 20.0


@dataclass
class Member:
    name: str
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = spawn_daemon(self.config, self.log)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(raw))
        return out

    def logged(self, event: str) -> bool:
        return any(line.get("event", "").startswith(event) for line in self.lines())


@dataclass
class Fleet:
    gw: SandboxGateway
    dsn: str
    schema: str
    tmp: Path
    members: dict[str, Member] = field(default_factory=dict)

    def config(self, name: str, dsn: str) -> Path:
        connection = {
            **FAST_CONNECTION,
            "complete_timeout_s": 0.5,
            "status_poll_s": 0.3,
            "takeover_jitter_s": 0.1,
            "lockout_s": LOCKOUT_S,
        }
        text = member_config(
            self.gw,
            member=name,
            streams=STREAMS,
            dsn=dsn,
            schema=self.schema,
            table=TABLE,
            connection=connection,
            fleet={"lease_ttl_s": TTL_S, "renew_interval_s": TICK_S},
            state={"commit_interval_ms": 300, "timeout_s": 3.0},
            pipeline={"drain_timeout_s": 0.5},
        )
        path = self.tmp / f"{name}.toml"
        path.write_text(text)
        return path

    def add(self, name: str, dsn: str | None = None) -> Member:
        m = Member(name, self.config(name, dsn or self.dsn), self.tmp / f"{name}.log")
        self.members[name] = m
        m.start()
        return m

    async def query(self, statement: str, *args: Any) -> list[asyncpg.Record]:
        return list(
            await sql(self.dsn, "fetch", statement.replace("{s}", f'"{self.schema}"'), *args)
        )

    async def holders(self) -> dict[str, str | None]:
        """stream -> the member holding a live lease on it (None: nobody)."""
        rows = await self.query(
            "SELECT stream, CASE WHEN expires_at > EXTRACT(EPOCH FROM clock_timestamp()) "
            "THEN holder END AS holder FROM {s}.stream_leases"
        )
        return {r["stream"]: r["holder"] for r in rows}

    async def wait_holders(self, ok: Any, timeout: float) -> dict[str, str | None]:
        """Poll the lease table until ``ok(holders)``."""
        got: dict[str, str | None] = {}
        async with asyncio.timeout(timeout):
            while True:
                try:
                    got = await self.holders()
                except asyncpg.UndefinedTableError:  # no member has created the schema yet
                    got = {}
                if len(got) == STREAMS and ok(got):
                    return got
                await asyncio.sleep(0.2)

    async def written(self) -> set[str]:
        return {r[0] for r in await self.query(f"SELECT unique_event_id FROM {TABLE}")}

    async def wait_caught_up(self, timeout: float) -> None:
        """Every event the sandbox has now is in the sink (a positive condition)."""
        truth = {
            uid: stream(i) for i in range(STREAMS) for uid, _, _ in self.gw.event_keys(chain(i))
        }
        try:
            async with asyncio.timeout(timeout):
                while not truth.keys() <= await self.written():
                    await asyncio.sleep(0.2)
        except TimeoutError:
            missing = truth.keys() - await self.written()
            behind = sorted({truth[uid] for uid in missing})
            holders = await self.holders()
            raise AssertionError(
                f"{len(missing)} events not in the sink, of streams "
                f"{[(s, holders.get(s)) for s in behind]}"
            ) from None

    def stop_all(self) -> None:
        for m in self.members.values():
            if m.proc is not None and m.proc.poll() is None:
                with_cont = m.proc
                os.kill(with_cont.pid, signal.SIGCONT)
                with_cont.terminate()
        for m in self.members.values():
            if m.proc is not None:
                try:
                    m.proc.wait(30)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait(10)


def counts(holders: dict[str, str | None]) -> dict[str | None, int]:
    out: dict[str | None, int] = {}
    for h in holders.values():
        out[h] = out.get(h, 0) + 1
    return out


def balanced(names: set[str]) -> Any:
    share = -(-STREAMS // len(names))

    def ok(holders: dict[str, str | None]) -> bool:
        c = counts(holders)
        return set(c) == names and all(c[n] <= share for n in names)

    return ok


@pytest.fixture
async def fleet(sandbox_factory: Any, postgres_dsn: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    gw = await sandbox_factory(
        **sandbox_options(STREAMS),
        backlog=40,
        rate=4.0,  # new events per second per chain: 120/s over the fleet
        client_timeout_s=2.0,  # the gateway drops a frozen consumer
        stale_hold_s=0.3,
    )
    schema = "fleet_" + uuid.uuid4().hex[:8]
    f = Fleet(gw, postgres_dsn, schema, tmp_path)
    # The sink's table and the audit trigger exist before any member writes.
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(f'DROP TABLE IF EXISTS "{TABLE}"; DROP TABLE IF EXISTS fleet_audit')
        await conn.execute(create_table_sql(TABLE))
        await conn.execute(
            "CREATE TABLE fleet_audit (id BIGSERIAL PRIMARY KEY, uid TEXT NOT NULL, "
            "stream TEXT NOT NULL, op TEXT NOT NULL);"
            "CREATE OR REPLACE FUNCTION fleet_audit_row() RETURNS trigger AS $$ BEGIN "
            "INSERT INTO fleet_audit (uid, stream, op) VALUES "
            "(NEW.unique_event_id, NEW.stream, TG_OP); RETURN NEW; END $$ LANGUAGE plpgsql;"
            f'CREATE TRIGGER fleet_audit AFTER INSERT OR UPDATE ON "{TABLE}" '
            "FOR EACH ROW EXECUTE FUNCTION fleet_audit_row();"
        )
    finally:
        await conn.close()
    try:
        yield f
    finally:
        f.stop_all()


async def test_a_fleet_survives_kill_pause_partition_and_a_join(
    fleet: Fleet, pg_proxy: TcpProxy
) -> None:
    f = fleet
    gw = f.gw
    # --- three members share the 30 streams; one reaches PostgreSQL through the proxy ----------
    f.add("m1")
    f.add("m2")
    f.add("m3", proxied(f.dsn, pg_proxy.port))
    await f.wait_holders(balanced({"m1", "m2", "m3"}), 60)
    await f.wait_caught_up(60)

    # --- kill -9: m1's streams resume on m2 and m3 -------------------------------------------
    before = await f.holders()
    lost = {s for s, h in before.items() if h == "m1"}
    f.members["m1"].signal(signal.SIGKILL)
    killed_at = time.monotonic()
    await f.wait_holders(balanced({"m2", "m3"}), RESUME_BOUND_S)
    took = time.monotonic() - killed_at
    assert took >= TTL_S - 1.0  # a live lease was never taken: only its expiry freed it
    await f.wait_caught_up(60)  # including the events m1's streams got since the kill
    assert lost

    # --- a fourth member joins: the streams rebalance -------------------------------------------
    f.add("m4")
    await f.wait_holders(balanced({"m2", "m3", "m4"}), 60)

    # --- SIGSTOP m2 past its lease; the others take over; SIGCONT: its commit is refused -------
    m2 = f.members["m2"]
    m2.signal(signal.SIGSTOP)
    await f.wait_holders(lambda h: "m2" not in h.values() and None not in h.values(), 60)
    m2.signal(signal.SIGCONT)
    # Whichever comes first after the pause: its renewal finds the leases taken (then nothing
    # of its is committed), or a commit with the old epochs is refused.
    await wait_until(
        lambda: any(m2.logged(m) for m in ("commit refused", "cannot renew leases", "lease lost")),
        timeout=30,
    )
    await f.wait_holders(balanced({"m2", "m3", "m4"}), 60)
    await f.wait_caught_up(60)

    # --- cut m3 off from PostgreSQL: it stops its subscriptions, the others take over ----------
    m3 = f.members["m3"]
    pg_proxy.blackhole()
    await wait_until(lambda: m3.logged("cannot renew leases"), timeout=30)
    await f.wait_holders(lambda h: "m3" not in h.values() and None not in h.values(), 60)
    await f.wait_caught_up(60)
    pg_proxy.restore()
    await f.wait_holders(balanced({"m2", "m3", "m4"}), 60)

    # --- a graceful stop hands the streams over: released, not left to expire ----------------
    m4 = f.members["m4"]
    handed = {s for s, h in (await f.holders()).items() if h == "m4"}
    assert handed
    m4.signal(signal.SIGTERM)
    await f.wait_holders(balanced({"m2", "m3"}), 60)
    assert m4.proc is not None and m4.proc.wait(30) == 0
    takings = sorted(
        (line["timestamp"], line["stream"], line["previous"])
        for m in (f.members["m2"], f.members["m3"])
        for line in m.lines()
        if line.get("event") == "lease taken" and line.get("stream") in handed
    )
    taken = {stream: previous for _, stream, previous in takings}
    # The last taking of each: from a released lease ("-"), never from m4's expired one.
    assert set(taken) == handed and set(taken.values()) == {"-"}, taken

    # --- the end: everything once, in order, and no second subscriber ever ---------------------
    snapshot = {i: gw.event_keys(chain(i)) for i in range(STREAMS)}
    await f.wait_caught_up(60)
    f.stop_all()
    for name in ("m2", "m3"):
        proc = f.members[name].proc
        assert proc is not None and proc.returncode == 0, (name, proc and proc.returncode)
    audit = await f.query("SELECT uid, stream FROM fleet_audit ORDER BY id")
    writes: dict[str, int] = {}
    for r in audit:
        writes[r["uid"]] = writes.get(r["uid"], 0) + 1
    twice = {uid: n for uid, n in writes.items() if n != 1}
    assert not twice, f"events written more than once: {list(twice.items())[:5]}"
    for i in range(STREAMS):
        truth = gw.event_keys(chain(i))  # the whole log: events after the snapshot too
        place = {uid: (k, key) for k, (uid, _, key) in enumerate(truth)}
        missing = {uid for uid, _, _ in snapshot[i]} - set(writes)
        assert not missing, (stream(i), sorted(missing)[:5])
        by_key: dict[str | None, list[int]] = {}
        for r in audit:
            if r["stream"] == stream(i):
                k, key = place[r["uid"]]
                by_key.setdefault(key, []).append(k)
        for key, ks in by_key.items():
            assert ks == sorted(ks), f"{stream(i)}: resource {key} written out of order"
    assert gw.stats.subscriber_conflicts == 0
