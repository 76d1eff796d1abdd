"""The two state-store backends as the shared suite (test_store.py) sees them: where a fresh
store lives, how to open (another) store on it, and raw access to its tables for what the
store's interface does not show (row counts, the schema version, a sink's own table).

SQLite: a file in tmp_path. PostgreSQL: a fresh schema on the throwaway server of tests/pg.py,
dropped afterwards.
"""

from __future__ import annotations

import sqlite3
import uuid
from contextlib import closing
from pathlib import Path
from types import ModuleType
from typing import Any

from pg import sql

import consumer.state.postgres as postgres_module
import consumer.state.sqlite as sqlite_module
from consumer.state import PostgresStore, SqliteStore, StateStore


class SqliteBackend:
    name = "sqlite"
    module: ModuleType = sqlite_module
    bind_error = "binding"  # what sqlite3 says of a value it cannot bind

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)

    async def open(self, *, create: bool = True) -> StateStore:
        return await SqliteStore.open(self.path, create=create)

    def _query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with closing(sqlite3.connect(self.path)) as con:
            rows = con.execute(sql, args).fetchall()
            con.commit()
            return rows

    async def count(self, table: str) -> int:
        return int(self._query(f"SELECT COUNT(*) FROM {table}")[0][0])

    async def version(self) -> int:
        return int(self._query("PRAGMA user_version")[0][0])

    async def set_version(self, version: int) -> None:
        self._query(f"PRAGMA user_version = {version}")

    async def create_at(self, version: int) -> None:
        """The schema as this version of the migrations left it, as an older release did."""
        scripts = "".join(f"{m};" for m in self.module.MIGRATIONS[:version])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path)) as con:
            con.executescript(f"{scripts} PRAGMA user_version = {version};")

    def table(self, name: str) -> str:
        """A table of the store as a statement names it."""
        return name

    async def raw(self, statement: str) -> None:
        self._query(statement)

    # A table of a sink's own in the store (what Staged rows are written to).
    async def create_table(self, table: str) -> None:
        self._query(f"CREATE TABLE {table} (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")

    def upsert(self, table: str) -> str:
        return (
            f"INSERT INTO {table} (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v"
        )

    async def table_rows(self, table: str) -> list[tuple[Any, ...]]:
        return self._query(f"SELECT k, v FROM {table} ORDER BY k")

    async def drop(self) -> None:
        return None


class PostgresBackend:
    name = "postgres"
    module: ModuleType = postgres_module
    bind_error = "invalid data"  # what asyncpg says of a value it cannot encode

    def __init__(self, dsn: str, server: str, schema: str | None = None) -> None:
        self.dsn = dsn
        self.schema = schema or f"t_{uuid.uuid4().hex[:16]}"
        self.where = server  # host:port/database, as messages name it
        self.q = f'"{self.schema}"'

    async def open(self, *, create: bool = True, **kwargs: Any) -> StateStore:
        return await PostgresStore.open(
            self.dsn, schema=self.schema, create=create, timeout_s=10.0, **kwargs
        )

    async def fetch(self, statement: str, *args: Any) -> list[Any]:
        return list(await sql(self.dsn, "fetch", statement, *args))

    async def execute(self, statement: str, *args: Any) -> None:
        await sql(self.dsn, "execute", statement, *args)

    async def count(self, table: str) -> int:
        return int((await self.fetch(f"SELECT COUNT(*) FROM {self.q}.{table}"))[0][0])

    async def version(self) -> int:
        rows = await self.fetch(f"SELECT COALESCE(MAX(version), 0) FROM {self.q}.schema_version")
        return int(rows[0][0])

    async def set_version(self, version: int) -> None:
        await self.execute(
            f"INSERT INTO {self.q}.schema_version (version, applied_at) VALUES ($1, 0)", version
        )

    async def create_at(self, version: int) -> None:
        """The schema as this version of the migrations left it, as an older release did."""
        await self.execute(f"CREATE SCHEMA {self.q}")
        await self.execute(
            f"CREATE TABLE {self.q}.schema_version (version INTEGER PRIMARY KEY, "
            "applied_at DOUBLE PRECISION NOT NULL)"
        )
        for v, script in enumerate(self.module.MIGRATIONS[:version], start=1):
            await self.execute(script.format(s=self.q))
            await self.set_version(v)

    def table(self, name: str) -> str:
        """A table of the store as a statement names it."""
        return f"{self.q}.{name}"

    async def raw(self, statement: str) -> None:
        await self.execute(statement)

    async def create_table(self, table: str) -> None:
        await self.execute(
            f"CREATE TABLE {self.q}.{table} (k TEXT PRIMARY KEY, v INTEGER NOT NULL)"
        )

    def upsert(self, table: str) -> str:
        return (
            f"INSERT INTO {self.q}.{table} (k, v) VALUES ($1, $2) "
            "ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
        )

    async def table_rows(self, table: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await self.fetch(f"SELECT k, v FROM {self.q}.{table} ORDER BY k")]

    async def drop(self) -> None:
        await self.execute(f"DROP SCHEMA IF EXISTS {self.q} CASCADE")


Backend = SqliteBackend | PostgresBackend
