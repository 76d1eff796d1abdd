"""A fleet member's config for the fleet test and bench/fleet.py: ``n`` streams of the sandbox,
one chain and one application key each (the sandbox answers the connection-status query per
key), the state and the postgres sink on one PostgreSQL database."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from consumer.config import Settings
from consumer.sandbox import SandboxGateway

# In-process fleet tests: short leases, with the shortest stop the settings allow for them.
TTL_S = 5.0
TICK_S = 0.25


def chain(i: int) -> str:
    return f"C{i:04d}"


def stream(i: int) -> str:
    return f"s{i:04d}"


def app_key(i: int) -> str:
    return f"fleet-key-{i:04d}"


def _table(name: str, values: Mapping[str, Any]) -> str:
    def toml(v: Any) -> str:
        return f'"{v}"' if isinstance(v, str) else ("true" if v is True else str(v))

    return f"[{name}]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in values.items())


def member_config(
    gw: SandboxGateway,
    *,
    member: str,
    streams: int,
    dsn: str,
    schema: str,
    table: str,
    connection: Mapping[str, Any],
    fleet: Mapping[str, Any],
    state: Mapping[str, Any] | None = None,
    pipeline: Mapping[str, Any] | None = None,
    log_level: str = "info",
) -> str:
    o = gw.options
    parts = []
    for i in range(streams):
        s = stream(i)
        parts += [
            _table(
                f"streams.{s}",
                {"gateway_url": gw.url, "chain_code": chain(i), "app_key": app_key(i)},
            ),
            _table(
                f"streams.{s}.auth", {"client_id": o.client_id, "client_secret": o.client_secret}
            ),
            _table(f"streams.{s}.connection", connection),
        ]
    parts += [
        _table("state", {"backend": "postgres", "dsn": dsn, "schema": schema, **(state or {})}),
        _table("sink", {"type": "postgres", "dsn": dsn, "table": table}),
        _table("fleet", {"enabled": True, "member": member, **fleet}),
        _table("pipeline", pipeline or {}),
        _table("metrics", {"port": 0}),
        _table("log", {"format": "json", "level": log_level}),
    ]
    return "\n".join(parts)


def fleet_settings(
    dsn: str,
    schema: str,
    member: str,
    *,
    streams: tuple[str, ...] = ("a", "b"),
    lease_ttl_s: float = TTL_S,
    stop_step_s: float = 0.1,
    release_unreachable_after_s: float | None = None,
) -> Settings:
    """A member of a fleet of ``streams`` whose gateway and webhook are nowhere (127.0.0.1:9):
    for tests of the fleet's own work, with the daemon's or their own streams.
    ``stop_step_s``: complete_timeout_s and drain_timeout_s; a handover, 2 x (stop_step_s + 2)
    + stop_step_s, must fit in ``lease_ttl_s`` minus a tick (TICK_S)."""
    from support import stream_config  # the daemon: not for bench/fleet.py

    fast_stop = {"connection": {"complete_timeout_s": stop_step_s}}
    return Settings(
        # A chain each: two streams of one key, gateway and chain are one OHIP subscription.
        streams={
            s: stream_config("http://127.0.0.1:9", chain_code=f"CH{s.upper()}", **fast_stop)  # type: ignore[misc]
            for s in streams
        },
        state={"backend": "postgres", "dsn": dsn, "schema": schema},  # type: ignore[arg-type]
        sink={"type": "webhook", "url": "http://127.0.0.1:9/hook"},  # type: ignore[arg-type]
        pipeline={"drain_timeout_s": stop_step_s},  # type: ignore[arg-type]
        metrics={"enabled": False},  # type: ignore[arg-type]
        fleet={  # type: ignore[arg-type]
            "enabled": True,
            "member": member,
            "lease_ttl_s": lease_ttl_s,
            "renew_interval_s": TICK_S,
            "release_unreachable_after_s": release_unreachable_after_s,
        },
    )


def sandbox_options(streams: int) -> dict[str, Any]:
    """The chains and application keys of ``streams`` streams."""
    return {
        "chains": tuple(chain(i) for i in range(streams)),
        "app_keys": tuple(app_key(i) for i in range(streams)),
    }
