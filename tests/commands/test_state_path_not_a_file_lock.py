"""The file lease refuses a state path that is no regular file before it makes anything beside
it: ``run`` and ``sink adopt --execute`` took it first, which created ``<state>.lock`` beside
the path (``/dev/null.lock`` in /dev, as root), and only then did the store's open refuse the
path (exit 78). The commands themselves: test_state_path_not_a_file.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from test_state_path_not_a_file import fifo, null_device

from consumer.errors import StoreError
from consumer.state.lease import REPLAY, Lease

MAKERS = pytest.mark.parametrize(
    ("make", "kind"),
    [(fifo, "a FIFO"), (null_device, "a character device")],
    ids=["fifo", "dev-null"],
)


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
