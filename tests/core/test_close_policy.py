"""The close-code table as a pure decision."""

from __future__ import annotations

import random

import pytest

from consumer.core.close_policy import Action, ClosePolicy, PolicyConfig

CONFIG = PolicyConfig(
    backoff_initial_s=1.0,
    backoff_max_s=60.0,
    abnormal_min_s=4.0,
    lockout_s=120.0,
    lockout_jitter_s=30.0,
    rate_limited_s=120.0,
    max_auth_failures=3,
    healthy_after_s=60.0,
)


def policy(seed: int = 1) -> ClosePolicy:
    return ClosePolicy(CONFIG, random.Random(seed))


@pytest.mark.parametrize("code", [1000, 1001, 1011, 1012, 4500, 4504, 4408, 4429])
def test_transient_codes_reconnect_with_backoff(code: int):
    d = policy().on_close(code, "bye")
    assert d.action is Action.RECONNECT
    assert 0.5 <= d.delay_s <= 1.0
    assert str(code) in d.reason


@pytest.mark.parametrize("code", [None, 1006])
def test_abnormal_closure_waits_at_least_4_seconds(code: int | None):
    d = policy().on_close(code)
    assert d.action is Action.RECONNECT and d.delay_s >= 4.0 and "1006" in d.reason


@pytest.mark.parametrize(
    ("code", "hint"),
    [(4400, "chain_code"), (4403, "approved"), (4406, "graphql-transport-ws")],
)
def test_permanent_codes_stop_and_say_what_to_check(code: int, hint: str):
    d = policy().on_close(code, "Cannot query field XYZ")
    assert d.action is Action.STOP
    assert hint in d.reason and str(code) in d.reason and "Cannot query field XYZ" in d.reason


def test_4401_refreshes_the_token_then_stops_when_it_repeats():
    p = policy()
    assert p.on_close(4401).action is Action.REFRESH_TOKEN
    assert p.on_close(4401).action is Action.REFRESH_TOKEN
    final = p.on_close(4401)
    assert final.action is Action.STOP
    assert "app_key" in final.reason and "client_id/client_secret" in final.reason


def test_4409_waits_out_the_lockout_with_jitter():
    delays = [policy(seed).on_close(4409).delay_s for seed in range(50)]
    assert all(120.0 <= d <= 150.0 for d in delays)
    assert len(set(delays)) > 10  # jittered, so two consumers do not come back together


def test_handshake_statuses():
    assert policy().on_handshake_status(400).action is Action.STOP
    assert "SHA-256" in policy().on_handshake_status(400).reason
    assert policy().on_handshake_status(403).action is Action.STOP
    assert policy().on_handshake_status(401).action is Action.REFRESH_TOKEN
    limited = policy().on_handshake_status(429)
    assert limited.action is Action.RECONNECT and limited.delay_s >= 120.0
    assert policy().on_handshake_status(503).action is Action.RECONNECT


def test_backoff_grows_is_capped_and_resets_after_a_healthy_session():
    p = policy()
    delays = [p.on_network_error("down").delay_s for _ in range(12)]
    assert delays[0] <= 1.0 < delays[2]
    assert all(b <= 60.0 for b in delays) and delays[-1] >= 30.0
    p.session_ended(5.0)  # short: no reset
    assert p.on_network_error("down").delay_s >= 30.0
    p.session_ended(61.0)
    assert p.on_network_error("down").delay_s <= 1.0
    assert p.auth_failures == 0


def test_a_frame_too_big_for_us_stops_instead_of_looping():
    d = policy().on_closed_by_us(1009, 1024)
    assert d is not None and d.action is Action.STOP and "max_frame_bytes" in d.reason
    assert policy().on_closed_by_us(1000, 1024) is None
