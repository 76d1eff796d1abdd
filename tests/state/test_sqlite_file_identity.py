"""The SQLite state store's file removed or replaced while the daemon runs: SQLite in WAL mode
would go on committing checkpoints into the deleted inode, lost with it at the close. Each
commit checks before its COMMIT that the path still names the file opened; and a full disk, a
quota or a failing device is one classification (:mod:`consumer.files`) for the store and the
sinks alike (found by a review)."""

from __future__ import annotations

import errno
import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from consumer.core.records import CommitBatch
from consumer.core.watermark import Position
from consumer.errors import StoreError
from consumer.state.sqlite import SqliteStore, store_error


def batch(i: int) -> CommitBatch:
    return CommitBatch(
        checkpoints={"main": Position(f"{i:04d}", f"u{i}")}, processed={"main": [f"u{i}"]}
    )


@pytest.mark.parametrize("how", ["removed", "replaced"])
async def test_a_commit_into_a_store_no_longer_at_the_path_is_rolled_back(
    tmp_path: Path, how: str
) -> None:
    path = tmp_path / "state.db"
    store = await SqliteStore.open(path)
    try:
        await store.commit(batch(1))
        if how == "removed":
            path.unlink()
        else:
            aside = tmp_path / "other.db"
            with closing(sqlite3.connect(aside)) as other:
                other.execute("CREATE TABLE t (x)")
            os.replace(aside, path)
        for i in (2, 3):
            with pytest.raises(StoreError, match="removed or replaced") as caught:
                await store.commit(batch(i))
            assert not caught.value.retriable  # the daemon stops (78): an operator's
        cp = await store.checkpoint("main")  # the file it had open: not moved past u1
        assert cp is not None and cp.unique_event_id == "u1"
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("code", "retriable"),
    [
        (errno.ENOSPC, True),
        (errno.EDQUOT, True),
        (errno.EIO, True),
        (errno.EAGAIN, True),
        (errno.EACCES, False),
        (errno.EROFS, False),
        (errno.EISDIR, False),
    ],
)
def test_a_full_disk_or_quota_may_clear_by_itself(
    tmp_path: Path, code: int, retriable: bool
) -> None:
    err = store_error(tmp_path / "state.db", OSError(code, os.strerror(code)))
    assert err.retriable is retriable
    if retriable:
        assert "free disk space or fix the device" in str(err)
