"""A state path that is no regular file is refused before anything is made beside it.

Was: ``run`` and ``sink adopt --execute`` took the file lease first, which created
``<state>.lock`` beside the path (``/dev/null.lock`` in /dev, as root), and only then did the
store's open refuse the path (exit 78). Each command a process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from support import cli
from test_state_path_not_a_file import fifo, null_device, write_config

from consumer.errors import ExitCode, StoreError
from consumer.state.lease import REPLAY, Lease

# The daemon, and the operator's command that takes the lease before it opens the store.
COMMANDS = (("run",), ("sink", "adopt", "--execute"))
MAKERS = pytest.mark.parametrize(
    ("make", "kind"),
    [(fifo, "a FIFO"), (null_device, "a character device")],
    ids=["fifo", "dev-null"],
)


@MAKERS
def test_no_lock_file_is_made_beside_a_state_path_that_is_not_a_file(
    tmp_path: Path, make: Callable[[Path], None], kind: str
) -> None:
    state = tmp_path / "state.db"
    make(state)
    config = write_config(tmp_path, state)
    says = f"state store {state}: it is {kind}, not a regular file: set [state] path to a file"
    for args in COMMANDS:
        done = cli(*args, "--config", str(config))
        assert done.returncode == ExitCode.CONFIG, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], (args, done.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "state.db"], args


@MAKERS
def test_the_file_lease_refuses_a_state_path_that_is_not_a_file(
    tmp_path: Path, make: Callable[[Path], None], kind: str
) -> None:
    """Whatever takes it (the daemon's lease, `dlq replay`'s lock of its own)."""
    state = tmp_path / "state.db"
    make(state)
    for purpose in ("", REPLAY):
        with pytest.raises(StoreError) as refused:
            Lease.acquire(state, ["main"], purpose=purpose)
        assert f"state store {state}: it is {kind}, not a regular file" in str(refused.value)
        assert not refused.value.retriable  # exit 78: an operator's to fix
    assert [p.name for p in tmp_path.iterdir()] == ["state.db"]
