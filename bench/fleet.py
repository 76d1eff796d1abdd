"""Fleet benchmark: what a member costs per stream when a fleet shares many idle-ish streams,
and how long a dead member's streams take to resume elsewhere.

    .venv/bin/python bench/fleet.py [--streams 1000] [--members 3] [--seconds 60]
        [--kills 3] [--rate 0.05] [--backlog 5] [--settle 10] [--listen-backlog 4096]
        [--log-level warning] [--keep]

1. Starts a throwaway PostgreSQL server (tests/pg.py) and the sandbox gateway in this process
   with one chain and one application key per stream, a small backlog, server pings every
   15 s and, from this process, `rate` new events per second per chain spread evenly over time
   (a steady trickle, not one burst on every chain at once).
2. Starts `members` daemons as processes (`python -OO -m consumer run`), fleet mode on the state
   database, sink `postgres` on that database (rows commit with the checkpoint), and waits
   until every stream has a live lease and an active subscription at the sandbox.
3. Steady state for `seconds`: each member's CPU time (utime + stime from /proc/PID/stat)
   and RSS (VmRSS, sampled every second): CPU ms per second per stream, RSS per stream and per
   process; the sandbox's (this process) and PostgreSQL's CPU alongside.
4. `kills` rounds: `kill -9` of one member (round robin), then for each of its streams the
   time from the kill to the stream resumed elsewhere. Resumed: the sandbox received a new
   subscribe for the chain after the kill and holds an active subscription on it (polled
   every 20 ms in this process), and the stream's lease is live in another member's name
   (polled every 0.25 s). The lease takeover time (the lease row's acquired_at, on the
   database's clock, minus the kill) is reported too. The member is restarted and the fleet
   rebalances before the next round.
Alongside: the busiest 2 s of CPU (cores) during the start and each takeover, warning and
error records of the members' logs, ERRORs of PostgreSQL's log. The sandbox listens with an
accept queue of 4096 (asyncio's default of 100 overflows when hundreds of streams connect at
once: the kernel drops the handshakes and the clients retry after 1, 3, 7 s...).
Results go to stdout and bench/results/fleet.json. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fleet_support import chain, member_config, sandbox_options  # noqa: E402  (tests/)
from pg import PostgresServer, find_bindir  # noqa: E402  (tests/pg.py)

from consumer.sandbox import SandboxGateway, SandboxOptions, launcher  # noqa: E402
from consumer.sinks.postgres import create_table_sql  # noqa: E402

DATABASE = "fleet_bench"
SCHEMA = "fleet_bench"
TABLE = "fleet_events"
TTL_S = 15.0
RENEW_S = 3.0
PING_S = 15.0
CONNECTION = {
    "ping_interval_s": PING_S,
    "status_poll_s": 5.0,
    "takeover_jitter_s": 1.0,
    "lockout_s": 0.5,
    "lockout_jitter_s": 0.5,
    "lockout_max_s": 2.0,
    # A handover, 2 x (complete_timeout_s + 2) + drain_timeout_s, fits in the lease minus a
    # tick (the settings check it): 10 s of 12.
    "complete_timeout_s": 2.0,
}
DRAIN_S = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- /proc ----------------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def family(root: int) -> list[int]:
    """``root`` and its direct children (the postmaster and its backends)."""
    pids = [root]
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = (d / "stat").read_text()
            if int(raw[raw.rindex(")") + 2 :].split()[1]) == root:
                pids.append(int(d.name))
    return pids


def family_cpu_s(root: int) -> float:
    total = 0.0
    for pid in family(root):
        with contextlib.suppress(OSError):
            total += cpu_s(pid)
    return total


def listen_overflows() -> int:
    """The kernel's TcpExt ListenOverflows counter (connections dropped at a full accept
    queue; system-wide)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


@contextlib.contextmanager
def listen_backlog(n: int) -> Iterator[None]:
    """``asyncio.start_server`` with an accept queue of ``n`` (asyncio's default is 100):
    hundreds of streams connecting at once overflow 100, and the dropped handshakes are
    retried by the clients' kernels after 1, 3, 7, 15 s, which a real gateway's front end
    would not cause."""
    original = asyncio.start_server

    async def start_server(*args: Any, **kwargs: Any) -> asyncio.Server:
        kwargs.setdefault("backlog", n)
        return await original(*args, **kwargs)

    asyncio.start_server = start_server  # type: ignore[assignment]
    try:
        yield
    finally:
        asyncio.start_server = original  # type: ignore[assignment]


# --- PostgreSQL --------------------------------------------------------------------------------


class BenchPostgres(PostgresServer):
    """tests/pg.py's server with room for the fleet's connections (pools + the fleet's own)."""

    max_connections = 50

    def _spawn(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        args = [
            f"max_connections={self.max_connections}" if a == "max_connections=50" else a
            for a in args
        ]
        return super()._spawn(args, **kwargs)

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])


# --- the fleet -------------------------------------------------------------------------------


@dataclass
class Member:
    name: str
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.proc = launcher.spawn(["run", "--config", str(self.config)], self.log)
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


async def wait_exit(proc: subprocess.Popen[bytes], seconds: float) -> int | None:
    """Without blocking the event loop (the sandbox runs in it)."""
    deadline = time.monotonic() + seconds
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return proc.poll()


@dataclass
class Bench:
    gw: SandboxGateway
    dsn: str
    work: Path
    streams: int
    pg: BenchPostgres
    log_level: str = "warning"
    members: dict[str, Member] = field(default_factory=dict)
    conn: Any = None
    _subs_seen: int = 0
    subscribed_at: dict[str, float] = field(default_factory=dict)  # chain -> monotonic

    def write_config(self, name: str) -> Path:
        text = member_config(
            self.gw,
            member=name,
            streams=self.streams,
            dsn=self.dsn,
            schema=SCHEMA,
            table=TABLE,
            connection=CONNECTION,
            fleet={"lease_ttl_s": TTL_S, "renew_interval_s": RENEW_S},
            pipeline={"workers": 1, "drain_timeout_s": DRAIN_S},
            log_level=self.log_level,
        )
        path = self.work / f"{name}.toml"
        path.write_text(text)
        return path

    def add(self, name: str) -> Member:
        m = Member(name, self.write_config(name), self.work / f"{name}.log")
        self.members[name] = m
        return m

    def live_names(self) -> set[str]:
        return {n for n, m in self.members.items() if m.alive()}

    async def holders(self) -> dict[str, str | None]:
        """stream -> the member holding a live lease on it (None: nobody)."""
        table = f'"{SCHEMA}".stream_leases'
        if await self.conn.fetchval("SELECT to_regclass($1)", table) is None:
            return {}  # no member has created the schema yet
        rows = await self.conn.fetch(
            "SELECT stream, CASE WHEN expires_at > EXTRACT(EPOCH FROM clock_timestamp()) "
            f"THEN holder END AS holder FROM {table}"
        )
        return {r["stream"]: r["holder"] for r in rows}

    async def acquired_at(self, names: list[str]) -> dict[str, tuple[str | None, float]]:
        rows = await self.conn.fetch(
            f'SELECT stream, holder, acquired_at FROM "{SCHEMA}".stream_leases '
            "WHERE stream = ANY($1::text[])",
            names,
        )
        return {r["stream"]: (r["holder"], float(r["acquired_at"] or 0.0)) for r in rows}

    def active(self, c: str) -> bool:
        return self.gw.stats.active_subscriptions.get(c, 0) >= 1

    def all_subscribed(self) -> bool:
        return all(self.active(chain(i)) for i in range(self.streams))

    def note_subscribes(self) -> None:
        """Time of the first subscribe per chain since the last reset (polled)."""
        subs = self.gw.stats.subscribes
        now = time.monotonic()
        for args in subs[self._subs_seen :]:
            c = args.get("chainCode")
            if isinstance(c, str):
                self.subscribed_at.setdefault(c, now)
        self._subs_seen = len(subs)

    def reset_subscribes(self) -> None:
        self._subs_seen = len(self.gw.stats.subscribes)
        self.subscribed_at.clear()

    async def wait_settled(
        self, names: set[str], seconds: float, cpu: CpuSampler | None = None
    ) -> float:
        """Until every stream has a live lease in one of ``names``, at most its fair share
        each, every member of ``names`` holding some, and every chain subscribed; returns the
        seconds it took. Raises TimeoutError (with the state) past ``seconds``."""
        started = time.monotonic()
        share = -(-self.streams // len(names))
        got: dict[str, str | None] = {}
        while time.monotonic() - started < seconds:
            if cpu is not None:
                cpu.sample()
            got = await self.holders()
            c = Counter(got.values())
            if (
                len(got) == self.streams
                and set(c) == names
                and all(c[n] <= share for n in names)
                and self.all_subscribed()
            ):
                return time.monotonic() - started
            for m in self.members.values():
                if m.proc is not None and m.name in names and not m.alive():
                    raise RuntimeError(f"member {m.name} exited ({m.proc.returncode}); {m.log}")
            await asyncio.sleep(0.5)
        subscribed = sum(self.active(chain(i)) for i in range(self.streams))
        raise TimeoutError(
            f"not settled in {seconds:.0f}s: leases {dict(Counter(got.values()))}, "
            f"{subscribed}/{self.streams} chains subscribed"
        )


async def trickle(gw: SandboxGateway, streams: int, rate: float) -> None:
    """``rate`` events per second per chain, spread evenly: chains in turn, every 0.1 s (by
    the clock: a late wake-up makes up for the time it lost)."""
    due, cursor, last = 0.0, 0, time.monotonic()
    while True:
        await asyncio.sleep(0.1)
        now = time.monotonic()
        due += rate * streams * (now - last)
        last = now
        n, due = int(due), due - int(due)
        for _ in range(n):
            gw.append(chain(cursor), 1)
            cursor = (cursor + 1) % streams


async def steady(b: Bench, seconds: float) -> dict[str, Any]:
    pg_root = b.pg.postmaster_pid()
    me = os.getpid()
    pids = {n: m.pid for n, m in b.members.items()}
    rows0 = await b.conn.fetchval(f'SELECT count(*) FROM "{TABLE}"')
    cpu0 = {n: cpu_s(p) for n, p in pids.items()}
    sb0, pg0 = cpu_s(me), family_cpu_s(pg_root)
    t0 = time.monotonic()
    rss: dict[str, list[float]] = {n: [] for n in pids}
    while time.monotonic() - t0 < seconds:
        for n, p in pids.items():
            rss[n].append(rss_mb(p))
        await asyncio.sleep(1.0)
    elapsed = time.monotonic() - t0
    cpu1 = {n: cpu_s(p) for n, p in pids.items()}
    sb1, pg1 = cpu_s(me), family_cpu_s(pg_root)
    rows1 = await b.conn.fetchval(f'SELECT count(*) FROM "{TABLE}"')
    for n, m in b.members.items():
        if not m.alive():
            raise RuntimeError(f"member {n} died during the measurement; see {m.log}")
    holders = Counter((await b.holders()).values())
    per_member = {
        n: {
            "streams": holders.get(n, 0),
            "cpu_ms_per_s": round((cpu1[n] - cpu0[n]) * 1000 / elapsed, 1),
            "rss_mb": round(rss[n][-1], 1),
            "rss_mb_peak": round(max(rss[n]), 1),
        }
        for n in pids
    }
    cpu_total = sum(cpu1[n] - cpu0[n] for n in pids) * 1000 / elapsed
    rss_total = sum(rss[n][-1] for n in pids)
    return {
        "seconds": round(elapsed, 1),
        "events_per_s_into_sink": round((rows1 - rows0) / elapsed, 1),
        "members_cpu_ms_per_s": round(cpu_total, 1),
        "cpu_ms_per_s_per_stream": round(cpu_total / b.streams, 3),
        "members_rss_mb": round(rss_total, 1),
        "rss_mb_per_process": round(rss_total / len(pids), 1),
        "rss_mb_per_stream": round(rss_total / b.streams, 3),
        "sandbox_cpu_ms_per_s": round((sb1 - sb0) * 1000 / elapsed, 1),
        "postgres_cpu_ms_per_s": round((pg1 - pg0) * 1000 / elapsed, 1),
        "per_member": per_member,
    }


class CpuSampler:
    """CPU seconds of the members, the sandbox (this process) and PostgreSQL, sampled over
    time, for the busiest stretch of a phase (is the machine the bottleneck?)."""

    def __init__(self, members: list[int], pg_root: int) -> None:
        self.members, self.pg_root = members, pg_root
        self.samples: list[tuple[float, float, float, float]] = []

    def sample(self) -> None:
        m = 0.0
        for pid in self.members:
            with contextlib.suppress(OSError):
                m += cpu_s(pid)
        self.samples.append((time.monotonic(), m, cpu_s(os.getpid()), family_cpu_s(self.pg_root)))

    def busiest(self, window: float = 2.0) -> dict[str, float]:
        """Cores busy over the busiest ``window`` seconds (members, sandbox, postgres)."""
        best: dict[str, float] = {}
        for i, a in enumerate(self.samples):
            for z in self.samples[i + 1 :]:
                if z[0] - a[0] >= window:
                    dt = z[0] - a[0]
                    cores = [(z[k] - a[k]) / dt for k in (1, 2, 3)]
                    if sum(cores) > best.get("total", -1.0):
                        best = {
                            "total": round(sum(cores), 2),
                            "members": round(cores[0], 2),
                            "sandbox": round(cores[1], 2),
                            "postgres": round(cores[2], 2),
                        }
                    break
        return best


async def kill_round(b: Bench, victim: Member, bound: float) -> dict[str, Any]:
    before = await b.holders()
    lost = sorted(s for s, h in before.items() if h == victim.name)
    chains = {s: chain(int(s[1:])) for s in lost}
    b.reset_subscribes()
    assert victim.proc is not None
    kill_wall, kill_mono = time.time(), time.monotonic()
    victim.proc.send_signal(signal.SIGKILL)
    await wait_exit(victim.proc, 10)
    resumed: dict[str, float] = {}
    last_pg = last_cpu = 0.0
    holders: dict[str, str | None] = {}
    cpu = CpuSampler([m.pid for m in b.members.values() if m.alive()], b.pg.postmaster_pid())
    while len(resumed) < len(lost) and time.monotonic() - kill_mono < bound:
        b.note_subscribes()
        if time.monotonic() - last_cpu >= 0.5:
            cpu.sample()
            last_cpu = time.monotonic()
        if time.monotonic() - last_pg >= 0.25:
            holders = await b.holders()
            last_pg = time.monotonic()
        for s in lost:
            c = chains[s]
            h = holders.get(s)
            if (
                s not in resumed
                and c in b.subscribed_at
                and b.active(c)
                and h is not None
                and h != victim.name
            ):
                resumed[s] = b.subscribed_at[c] - kill_mono
        await asyncio.sleep(0.02)
    leases = await b.acquired_at(lost)
    taken = {
        st: at - kill_wall
        for st, (h, at) in leases.items()
        if h not in (None, victim.name) and at > 0
    }
    # From the lease taken to the subscription at the sandbox: the new holder's own start
    # (token, connect, connection status query, takeover jitter, subscribe).
    start = [resumed[st] - t for st, t in taken.items() if st in resumed]
    missing = [s for s in lost if s not in resumed]
    return {
        "victim": victim.name,
        "streams": len(lost),
        "resumed": len(resumed),
        "not_resumed_within_s": {"bound": round(bound), "streams": missing[:10]}
        if missing
        else None,
        "resume_s": sorted(resumed.values()),
        "lease_takeover_s": sorted(taken.values()),
        "start_after_lease_s": sorted(start),
        "killed_at": time.strftime("%H:%M:%S", time.gmtime(kill_wall)) + "Z",
        "busiest_2s_cores": cpu.busiest(),
    }


def log_summary(members: dict[str, Member]) -> dict[str, Any]:
    """Warning and error records of the members' logs, counted by event, with examples."""
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    other = 0
    for m in members.values():
        if not m.log.exists():
            continue
        for raw in m.log.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(raw)
            except ValueError:
                other += 1
                examples.setdefault("(not json)", raw[:400])
                continue
            if not isinstance(rec, dict) or rec.get("level") in ("debug", "info"):
                continue
            key = f"{rec.get('level', '?')}: {rec.get('event', '?')}"
            counts[key] += 1
            examples.setdefault(key, f"{m.name}: {raw[:400]}")
    return {
        "records": dict(counts.most_common()),
        "non_json_lines": other,
        "examples": examples,
    }


def utc() -> str:
    now = time.time()
    return time.strftime("%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 10)}Z"


def postgres_errors(logfile: Path, limit: int = 5) -> dict[str, Any]:
    """ERROR records of the PostgreSQL server's log, counted by message, and the first few
    with their DETAIL/STATEMENT lines."""
    try:
        lines = logfile.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    counts: Counter[str] = Counter()
    first: list[str] = []
    for i, line in enumerate(lines):
        if "ERROR:" not in line:
            continue
        counts[line.split("ERROR:", 1)[1].strip()[:120]] += 1
        if len(first) < limit:
            block = [line]
            for more in lines[i + 1 : i + 12]:
                if "ERROR:" in more or "LOG:" in more:
                    break
                block.append(more)
            first.append("\n".join(block)[:3000])
    return {"errors": dict(counts.most_common()), "first": first}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run(
    args: argparse.Namespace, pg: BenchPostgres, dsn: str, work: Path, report: dict[str, Any]
) -> None:
    """Fills ``report`` as it goes (a failure leaves what was measured, and the logs)."""
    n = args.streams
    gw = SandboxGateway(
        SandboxOptions(
            **sandbox_options(n),
            backlog=args.backlog,
            rate=0.0,  # the trickle below spreads the events over time instead
            ping_interval_s=PING_S,
            client_timeout_s=4 * PING_S,  # the gateway drops a silent client
        )
    )
    with listen_backlog(args.listen_backlog):
        await gw.start()
    overflows = listen_overflows()
    b = Bench(gw, dsn, work, n, pg, args.log_level)
    b.conn = await asyncpg.connect(dsn)
    await b.conn.execute(create_table_sql(TABLE))  # before any member: no CREATE race
    feeder = asyncio.create_task(trickle(gw, n, args.rate))
    try:
        names = [f"m{i + 1}" for i in range(args.members)]
        for name in names:
            b.add(name)
        timeline: list[str] = report.setdefault("timeline", [])
        t0 = time.monotonic()
        timeline.append(f"{utc()} members started")
        for name in names:
            b.members[name].start()
        start_bound = 120 + 0.3 * n
        cpu = CpuSampler([m.pid for m in b.members.values()], pg.postmaster_pid())
        report["startup_s"] = round(await b.wait_settled(set(names), start_bound, cpu), 1)
        report["startup_busiest_2s_cores"] = cpu.busiest()
        timeline.append(f"{utc()} every stream leased and subscribed")
        await asyncio.sleep(args.settle)  # let the start's bursts (tokens, backlog) pass
        timeline.append(f"{utc()} steady state measured from here")
        report["steady"] = await steady(b, args.seconds)
        timeline.append(f"{utc()} steady state measured until here")
        rounds = []
        bound = TTL_S + 2 * RENEW_S + 60 + 0.05 * n
        for k in range(args.kills):
            victim = b.members[names[k % len(names)]]
            r = await kill_round(b, victim, bound)
            timeline.append(f"{r['killed_at']} kill -9 {victim.name}")
            timeline.append(f"{utc()} its streams resumed elsewhere; {victim.name} restarted")
            victim.start()
            r["rebalance_s"] = round(await b.wait_settled(set(names), 120 + 0.2 * n), 1)
            timeline.append(f"{utc()} rebalanced")
            rounds.append(r)
        resume = [x for r in rounds for x in r["resume_s"]]
        takeover = [x for r in rounds for x in r["lease_takeover_s"]]
        start = [x for r in rounds for x in r["start_after_lease_s"]]
        report["failover"] = {
            "rounds": len(rounds),
            "streams_moved": len(resume),
            "not_resumed": sum(r["streams"] - r["resumed"] for r in rounds),
            "resume_median_s": round(statistics.median(resume), 2) if resume else None,
            "resume_p90_s": round(pct(resume, 0.9), 2) if resume else None,
            "resume_max_s": round(max(resume), 2) if resume else None,
            "resume_min_s": round(min(resume), 2) if resume else None,
            "lease_takeover_median_s": round(statistics.median(takeover), 2) if takeover else None,
            "lease_takeover_max_s": round(max(takeover), 2) if takeover else None,
            "start_after_lease_median_s": round(statistics.median(start), 2) if start else None,
            "start_after_lease_max_s": round(max(start), 2) if start else None,
            "per_round": [
                {
                    "victim": r["victim"],
                    "killed_at": r["killed_at"],
                    "streams": r["streams"],
                    "resumed": r["resumed"],
                    "resume_median_s": round(statistics.median(r["resume_s"]), 2)
                    if r["resume_s"]
                    else None,
                    "resume_max_s": round(max(r["resume_s"]), 2) if r["resume_s"] else None,
                    "rebalance_s": r["rebalance_s"],
                    "busiest_2s_cores": r["busiest_2s_cores"],
                    "not_resumed": r["not_resumed_within_s"],
                }
                for r in rounds
            ],
        }
        # Graceful stop: every member hands over and exits 0.
        timeline.append(f"{utc()} SIGTERM to every member")
        for m in b.members.values():
            if m.alive():
                m.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        codes = {name: await wait_exit(m.proc, 60) for name, m in b.members.items() if m.proc}
        report["exit_codes"] = codes
        report["subscriber_conflicts"] = gw.stats.subscriber_conflicts
        report["stale_refusals"] = gw.stats.stale_refusals
        report["sandbox_connections"] = gw.stats.connections
        report["token_requests"] = gw.stats.token_requests
        report["run_s"] = round(time.monotonic() - t0, 1)
        report["tcp_listen_overflows"] = listen_overflows() - overflows
    finally:
        feeder.cancel()
        for m in b.members.values():
            if m.alive():
                assert m.proc is not None
                m.proc.send_signal(signal.SIGTERM)
        for m in b.members.values():
            if m.proc is not None and await wait_exit(m.proc, 30) is None:
                m.proc.kill()
                await wait_exit(m.proc, 10)
        report["logs"] = log_summary(b.members)
        with contextlib.suppress(Exception):
            await b.conn.close()
        await gw.close()


def table(report: dict[str, Any]) -> str:
    s, f, st = report["settings"], report.get("failover") or {}, report.get("steady") or {}
    rows = [
        ("streams / members", f"{s['streams']} / {s['members']}"),
        ("startup until all subscribed", f"{report.get('startup_s')} s"),
        ("members' CPU total", f"{st.get('members_cpu_ms_per_s')} ms/s"),
        ("CPU per stream", f"{st.get('cpu_ms_per_s_per_stream')} ms/s"),
        ("RSS per process", f"{st.get('rss_mb_per_process')} MB"),
        ("RSS per stream", f"{st.get('rss_mb_per_stream')} MB"),
        (
            "sandbox / PostgreSQL CPU",
            f"{st.get('sandbox_cpu_ms_per_s')} / {st.get('postgres_cpu_ms_per_s')} ms/s",
        ),
        ("events into the sink", f"{st.get('events_per_s_into_sink')} /s"),
        (
            "failover median / max",
            f"{f.get('resume_median_s')} / {f.get('resume_max_s')} s "
            f"({f.get('streams_moved')} streams, {f.get('rounds')} kills)",
        ),
        (
            "start after the lease median / max",
            f"{f.get('start_after_lease_median_s')} / {f.get('start_after_lease_max_s')} s",
        ),
        (
            "lease takeover median / max",
            f"{f.get('lease_takeover_median_s')} / {f.get('lease_takeover_max_s')} s",
        ),
        ("subscriber conflicts", str(report.get("subscriber_conflicts"))),
        ("exit codes", str(report.get("exit_codes"))),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--rate", type=float, default=0.05, help="events/s per chain")
    parser.add_argument("--backlog", type=int, default=5, help="events per chain at start")
    parser.add_argument("--settle", type=float, default=10.0, help="s before measuring")
    parser.add_argument(
        "--listen-backlog", type=int, default=4096, help="the sandbox's accept queue"
    )
    parser.add_argument("--log-level", default="warning", help="the members' log level")
    parser.add_argument("--keep", action="store_true", help="keep the configs and logs")
    args = parser.parse_args()
    bindir = find_bindir()
    if bindir is None:
        parser.error("PostgreSQL server binaries not found (apt-get install postgresql)")
    pg = BenchPostgres(bindir)
    pg.max_connections = 30 + 12 * (args.members + 1)  # pools of 4 + 4, the fleet's own, ...
    report: dict[str, Any] = {
        "settings": {
            "streams": args.streams,
            "members": args.members,
            "seconds": args.seconds,
            "kills": args.kills,
            "rate_per_chain": args.rate,
            "backlog_per_chain": args.backlog,
            "lease_ttl_s": TTL_S,
            "renew_interval_s": RENEW_S,
            "server_ping_interval_s": PING_S,
            "connection": CONNECTION,
            "pipeline_workers": 1,
            "pipeline_drain_timeout_s": DRAIN_S,
            "sink": "postgres (state database)",
            "log_level": args.log_level,
            "sandbox_listen_backlog": args.listen_backlog,
            "cpus": os.cpu_count(),
        }
    }
    try:
        pg.init()
        pg.start()
        pg.execute(f'CREATE DATABASE "{DATABASE}"')
        if args.keep:  # the members' configs and logs stay, for a look afterwards
            work = Path(tempfile.mkdtemp(prefix="opera-fleet-"))
            report["work_dir"] = str(work)
            asyncio.run(run(args, pg, pg.dsn(DATABASE), work, report))
        else:
            with tempfile.TemporaryDirectory(prefix="opera-fleet-") as tmp:
                asyncio.run(run(args, pg, pg.dsn(DATABASE), Path(tmp), report))
    except (Exception, KeyboardInterrupt) as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        report["postgres_log"] = postgres_errors(pg.logfile)
        if args.keep and "work_dir" in report:
            with contextlib.suppress(OSError):
                shutil.copy(pg.logfile, Path(report["work_dir"]) / "postgres.log")
        pg.remove()
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print()
    print(table(report))
    f = report.get("failover") or {}
    ok = "error" not in report and report.get("subscriber_conflicts") == 0
    ok = ok and not f.get("not_resumed")
    ok = ok and all(c == 0 for c in (report.get("exit_codes") or {}).values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
