"""``preflight`` on a state path that is a link to the store in another directory (e.g.
/etc/opera-consumer/state.db to the data disk): SQLite keeps its -wal and -shm beside the file
the link resolves to, and the lease its ``.lock``; preflight looked for them, and at the
directory's permissions, beside the link, and said PASS of a store ``run`` cannot use.

The permission cases as in test_store_permissions: the store root's, preflight as another user
(``setpriv``), a process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_store_permissions import (  # noqa: F401  # public_dir: a fixture
    as_nobody,
    make_store,
    public_dir,
    write_config,
)

from consumer.commands import preflight
from consumer.errors import ExitCode
from consumer.state import SqliteStore
from consumer.state.lease import Lease


def linked_store(base: Path) -> tuple[Path, Path]:
    """(the link, the store it names): base/etc/state.db to base/data/state.db, made by root;
    the link's directory writable by anyone, the store readable and writable by anyone."""
    data, etc = base / "data", base / "etc"
    state, link = data / "state.db", etc / "state.db"
    asyncio.run(make_store(state))
    state.chmod(0o666)
    etc.mkdir()
    etc.chmod(0o777)
    link.symlink_to(Path("..", "data", "state.db"))
    return link, state


@pytest.mark.parametrize("fault", [".lock", "-wal", "directory"])
def test_preflight_looks_beside_the_file_a_linked_state_path_names(
    public_dir: Path,  # noqa: F811  # the fixture
    fault: str,
) -> None:
    link, state = linked_store(public_dir)
    data = state.parent
    if fault == ".lock":  # a command run as root through the link: 0600, root's
        Lease.acquire(link, ()).release()
        says = f"{data / 'state.db.lock'} is not readable and writable by the daemon's user"
    elif fault == "-wal":
        (data / "state.db-wal").touch(0o600)
        says = f"{data / 'state.db-wal'} is not readable and writable by the daemon's user"
    else:  # the -wal and -shm cannot be made where SQLite makes them
        data.chmod(0o755)
        says = f"cannot create files in directory {data} (SQLite keeps its -wal and -shm"
    if fault != "directory":
        data.chmod(0o777)
    config = write_config(public_dir, link)
    checked = as_nobody(public_dir, "preflight", "--config", str(config))
    assert "Traceback" not in checked.stderr, checked.stderr
    line = next(x for x in checked.stdout.splitlines() if " state store " in x)
    assert line.startswith("FAIL") and f"{link}: {says}" in line, checked.stdout
    assert checked.returncode == ExitCode.RUNTIME
    assert [p.name for p in link.parent.iterdir()] == ["state.db"]  # nothing beside the link


async def test_preflight_reads_the_commits_in_the_wal_beside_a_linked_store(
    tmp_path: Path,
) -> None:
    """A running daemon's commits may be in the -wal alone: read as immutable (the main file
    only) when the -wal was looked for beside the link, the sink's committed position was
    missed, and the jsonl sink's check judged the file against none."""
    (tmp_path / "data").mkdir()
    (tmp_path / "etc").mkdir()
    state, link = tmp_path / "data" / "state.db", tmp_path / "etc" / "state.db"
    link.symlink_to(state)
    store = await SqliteStore.open(state)  # open: its commits stay in the -wal
    try:
        await store.set_sink_state("jsonl", '{"size": 42}')
        assert (tmp_path / "data" / "state.db-wal").stat().st_size > 0
        assert preflight._sqlite_sink_state(link, "jsonl") == '{"size": 42}'
    finally:
        await store.close()
