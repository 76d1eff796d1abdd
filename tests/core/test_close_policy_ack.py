"""ClosePolicy: the 4401 limit counts refusals in a row; a connection the gateway acknowledged
(connection_ack: the token and the key accepted) between two of them ends the row. Without
that, 4401, an acknowledged session closed with 1001, 4401 ... stopped the stream as "3 times
in a row: check app_key" (exit 78) although the credentials worked in between."""

from __future__ import annotations

import random

from consumer.core.close_policy import Action, ClosePolicy, PolicyConfig

CFG = PolicyConfig(backoff_initial_s=1.0, backoff_max_s=16.0, max_auth_failures=3)


def policy() -> ClosePolicy:
    return ClosePolicy(CFG, random.Random(1))


def test_an_acknowledged_connection_between_refusals_ends_the_row() -> None:
    p = policy()
    for _ in range(10):
        assert p.on_close(4401, "Invalid Auth Token").action is Action.REFRESH_TOKEN
        p.acknowledged()  # the next connection, with a new token, is accepted
        assert p.on_close(1001).action is Action.RECONNECT  # and ends after a few seconds
    assert p.on_handshake_status(401).action is Action.REFRESH_TOKEN  # counted with 4401
    p.acknowledged()
    assert p.on_close(4401).action is Action.REFRESH_TOKEN  # a 4401 after an ack, mid-session


def test_refusals_without_an_acknowledged_connection_between_still_stop() -> None:
    p = policy()
    p.acknowledged()  # a good session earlier: the refusals after it are in a row
    assert p.on_close(4401).action is Action.REFRESH_TOKEN
    assert p.on_close(1006).action is Action.RECONNECT  # no ack: the row goes on
    assert p.on_handshake_status(401).action is Action.REFRESH_TOKEN
    stop = p.on_close(4401)
    assert stop.action is Action.STOP and "3 times in a row" in stop.reason


def test_an_ack_keeps_the_backoff() -> None:
    """Only the 4401 count: a gateway that accepts and then drops each connection at once
    still gets the growing backoff (a session's length or events reset that, not its ack)."""
    p = policy()
    for _ in range(6):
        p.on_close(4401)
        p.acknowledged()
    assert p.on_close(1001).delay_s >= CFG.backoff_max_s / 2
