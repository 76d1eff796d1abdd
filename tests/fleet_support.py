"""A fleet member's config for the fleet test and bench/fleet.py: ``n`` streams of the sandbox,
one chain and one application key each (the sandbox answers the connection-status query per
key), the state and the postgres sink on one PostgreSQL database."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from consumer.sandbox import SandboxGateway


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


def sandbox_options(streams: int) -> dict[str, Any]:
    """The chains and application keys of ``streams`` streams."""
    return {
        "chains": tuple(chain(i) for i in range(streams)),
        "app_keys": tuple(app_key(i) for i in range(streams)),
    }
