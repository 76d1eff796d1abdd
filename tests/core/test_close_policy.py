"""Unit tests for consumer.core.close_policy.ClosePolicy: the close-code table."""

from __future__ import annotations

import random

import pytest

from consumer.core.close_policy import Action, ClosePolicy, PolicyConfig

CFG = PolicyConfig(
    backoff_initial_s=1.0,
    backoff_max_s=16.0,
    abnormal_min_s=4.0,
    lockout_s=120.0,
    lockout_jitter_s=30.0,
    rate_limited_s=120.0,
    max_auth_failures=3,
    healthy_after_s=60.0,
)


def policy(seed: int = 1, cfg: PolicyConfig = CFG) -> ClosePolicy:
    return ClosePolicy(cfg, random.Random(seed))


@pytest.mark.parametrize("code", [1000, 1001, 4500, 4504, 1011, 4408, 4429])
def test_transient_codes_reconnect_with_first_backoff(code: int) -> None:
    d = policy().on_close(code)
    assert d.action is Action.RECONNECT
    assert CFG.backoff_initial_s / 2 <= d.delay_s <= CFG.backoff_initial_s
    assert str(code) in d.reason


@pytest.mark.parametrize("code", [1006, None])
def test_abnormal_closure_waits_at_least_the_minimum(code: int | None) -> None:
    for seed in range(20):
        p = policy(seed)
        d = p.on_close(code)
        assert d.action is Action.RECONNECT
        assert d.delay_s >= CFG.abnormal_min_s
        assert "1006" in d.reason


def test_abnormal_closure_still_backs_off_beyond_the_minimum() -> None:
    p = policy()
    delays = [p.on_close(None).delay_s for _ in range(8)]
    assert all(d >= 4.0 for d in delays)
    assert all(d <= CFG.backoff_max_s for d in delays)
    assert max(delays) >= CFG.backoff_max_s / 2  # the cap's half is reached eventually


@pytest.mark.parametrize(
    ("code", "hints"),
    [
        (4400, ["4400", "chain_code", "offset", "hotel_codes"]),
        (4403, ["4403", "approved"]),
        (4406, ["4406", "graphql-transport-ws", "gateway_url"]),
    ],
)
def test_permanent_codes_stop_and_say_what_to_check(code: int, hints: list[str]) -> None:
    p = policy()
    d = p.on_close(code, "Value for offset is invalid")
    assert d.action is Action.STOP
    assert d.delay_s == 0.0
    for hint in hints:
        assert hint in d.reason
    assert "Value for offset is invalid" in d.reason  # the server's reason is kept


def test_4401_refreshes_the_token_then_stops_after_max_failures() -> None:
    p = policy()
    first = p.on_close(4401, "Invalid Auth Token")
    assert first.action is Action.REFRESH_TOKEN
    assert first.delay_s > 0
    assert "4401" in first.reason
    assert "Invalid Auth Token" in first.reason
    assert p.on_close(4401).action is Action.REFRESH_TOKEN
    third = p.on_close(4401)
    assert third.action is Action.STOP
    for hint in ("app_key", "client_id", "client_secret", "3 times"):
        assert hint in third.reason


def test_4401_limit_follows_config() -> None:
    cfg = PolicyConfig(max_auth_failures=1)
    assert policy(cfg=cfg).on_close(4401).action is Action.STOP


def test_auth_failures_reset_after_a_healthy_session() -> None:
    p = policy()
    p.on_close(4401)
    p.on_close(4401)
    p.session_ended(CFG.healthy_after_s)
    assert p.on_close(4401).action is Action.REFRESH_TOKEN
    assert p.on_close(4401).action is Action.REFRESH_TOKEN
    assert p.on_close(4401).action is Action.STOP


def test_short_session_does_not_reset_auth_failures() -> None:
    p = policy()
    p.on_close(4401)
    p.on_close(4401)
    p.session_ended(CFG.healthy_after_s - 0.1)
    assert p.on_close(4401).action is Action.STOP


def test_4409_waits_out_the_lockout_with_jitter() -> None:
    delays = []
    for seed in range(50):
        d = policy(seed).on_close(4409)
        assert d.action is Action.RECONNECT
        assert CFG.lockout_s <= d.delay_s <= CFG.lockout_s + CFG.lockout_jitter_s
        assert "4409" in d.reason
        delays.append(d.delay_s)
    assert len(set(delays)) > 1  # jittered


def test_4409_repeated_never_drops_below_the_lockout() -> None:
    p = policy()
    for _ in range(10):
        assert p.on_close(4409).delay_s >= CFG.lockout_s


def test_consecutive_4409s_double_the_wait_up_to_the_cap() -> None:
    # Whether an attempt during the lockout extends it is unconfirmed: a fixed wait shorter
    # than the real lockout would retry inside it for ever.
    p = policy()
    waits = [p.on_close(4409).delay_s for _ in range(6)]
    floors = [120.0, 240.0, 480.0, 480.0, 480.0, 480.0]  # lockout_max_s 480 by default
    for wait, floor in zip(waits, floors, strict=True):
        assert floor <= wait <= floor + CFG.lockout_jitter_s
    assert "7 in a row" in p.on_close(4409).reason


def test_a_productive_session_ends_the_4409_escalation() -> None:
    p = policy()
    p.on_close(4409)
    p.on_close(4409)
    p.session_ended(1.0, delivered=5)
    assert p.on_close(4409).delay_s <= CFG.lockout_s + CFG.lockout_jitter_s
    p.on_close(4409)
    p.session_ended(1.0, delivered=0)  # a short session without events: still locked out
    assert p.on_close(4409).delay_s >= 4 * CFG.lockout_s


@pytest.mark.parametrize("code", [4500, 4504])
def test_server_error_codes_back_off_growing(code: int) -> None:
    p = policy()
    delays = [p.on_close(code).delay_s for _ in range(5)]
    for k, d in enumerate(delays):
        ceiling = min(CFG.backoff_max_s, CFG.backoff_initial_s * 2**k)
        assert ceiling / 2 <= d <= ceiling
    assert all(p.on_close(code).action is Action.RECONNECT for _ in range(3))


def test_http_400_stops_and_says_what_to_check() -> None:
    d = policy().on_handshake_status(400)
    assert d.action is Action.STOP
    assert d.delay_s == 0.0
    for hint in ("400", "app_key", "SHA-256", "gateway_url", "approved", "Streaming Enabled"):
        assert hint in d.reason


def test_http_403_stops() -> None:
    d = policy().on_handshake_status(403)
    assert d.action is Action.STOP
    assert "403" in d.reason
    assert "approved" in d.reason


def test_http_401_refreshes_then_stops() -> None:
    p = policy()
    assert p.on_handshake_status(401).action is Action.REFRESH_TOKEN
    assert p.on_handshake_status(401).action is Action.REFRESH_TOKEN
    stop = p.on_handshake_status(401)
    assert stop.action is Action.STOP
    assert "401" in stop.reason


def test_http_401_and_4401_count_together() -> None:
    p = policy()
    p.on_handshake_status(401)
    p.on_close(4401)
    assert p.on_handshake_status(401).action is Action.STOP


def test_http_429_waits_the_rate_limit() -> None:
    for seed in range(30):
        d = policy(seed).on_handshake_status(429)
        assert d.action is Action.RECONNECT
        assert CFG.rate_limited_s <= d.delay_s <= CFG.rate_limited_s + CFG.backoff_initial_s
        assert "429" in d.reason


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
def test_http_5xx_reconnects_with_backoff(status: int) -> None:
    p = policy()
    d = p.on_handshake_status(status)
    assert d.action is Action.RECONNECT
    assert CFG.backoff_initial_s / 2 <= d.delay_s <= CFG.backoff_initial_s
    assert str(status) in d.reason
    d2 = p.on_handshake_status(status)
    assert CFG.backoff_initial_s <= d2.delay_s <= 2 * CFG.backoff_initial_s


def test_network_error_reconnects_with_backoff() -> None:
    d = policy().on_network_error("connection refused")
    assert d.action is Action.RECONNECT
    assert d.reason == "connection refused"
    assert 0 < d.delay_s <= CFG.backoff_initial_s


def test_backoff_grows_and_is_capped() -> None:
    p = policy(seed=7)
    delays = [p.on_close(1000).delay_s for _ in range(40)]
    for k, d in enumerate(delays):
        ceiling = min(CFG.backoff_max_s, CFG.backoff_initial_s * 2**k)
        assert ceiling / 2 <= d <= ceiling, (k, d)
    assert max(delays) <= CFG.backoff_max_s
    capped = delays[5:]  # 2**4 = 16 reached
    assert all(d >= CFG.backoff_max_s / 2 for d in capped)
    assert len(set(capped)) > 1  # jittered, not a constant


def test_backoff_is_deterministic_for_a_seed_and_differs_across_seeds() -> None:
    def run(seed: int) -> list[float]:
        p = policy(seed)
        return [p.on_close(1001).delay_s for _ in range(6)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_backoff_survives_many_failures_without_overflow() -> None:
    p = policy()
    for _ in range(2000):
        d = p.on_network_error("x")
    assert CFG.backoff_max_s / 2 <= d.delay_s <= CFG.backoff_max_s


def test_long_session_resets_backoff() -> None:
    p = policy()
    for _ in range(6):
        p.on_close(1001)
    assert p.on_close(1001).delay_s >= CFG.backoff_max_s / 2
    p.session_ended(CFG.healthy_after_s + 1)
    d = p.on_close(1001)
    assert CFG.backoff_initial_s / 2 <= d.delay_s <= CFG.backoff_initial_s


def test_short_session_keeps_backoff() -> None:
    p = policy()
    for _ in range(6):
        p.on_close(1001)
    p.session_ended(1.0)
    assert p.on_close(1001).delay_s >= CFG.backoff_max_s / 2


def test_stop_codes_do_not_consume_backoff() -> None:
    p = policy()
    p.on_close(4400)
    p.on_handshake_status(400)
    d = p.on_close(1000)
    assert CFG.backoff_initial_s / 2 <= d.delay_s <= CFG.backoff_initial_s


def test_default_rng_is_used_without_one() -> None:
    p = ClosePolicy(PolicyConfig())
    d = p.on_close(1000)
    assert 0.5 <= d.delay_s <= 1.0


def test_a_frame_too_big_for_us_waits_at_the_slowest_pace_but_never_stops() -> None:
    """Issue #9: no frame stops a stream for good. OHIP's retention drops the frame in the end,
    or the operator raises max_frame_bytes; meanwhile retry at backoff_max_s."""
    p = policy()
    for _ in range(5):
        d = p.on_closed_by_us(1009, 1024)
        assert d is not None and d.action is Action.RECONNECT and "max_frame_bytes" in d.reason
        assert d.delay_s >= CFG.backoff_max_s
    assert policy().on_closed_by_us(1000, 1024) is None


def test_a_session_that_delivered_resets_the_backoff() -> None:
    """Issue #9 item 10: each session of a catch-up over a flaky link delivers thousands of
    events in seconds; the waits between them must not grow to the backoff ceiling."""
    p = policy()
    for _ in range(8):
        p.session_ended(2.0, delivered=8000)
        d = p.on_close(4500)
        assert CFG.backoff_initial_s / 2 <= d.delay_s <= CFG.backoff_initial_s
    # 1006 keeps its floor, and a session that delivered nothing still backs off.
    p.session_ended(2.0, delivered=8000)
    assert p.on_close(None).delay_s >= CFG.abnormal_min_s
    delays = []
    for _ in range(6):
        p.session_ended(2.0, delivered=0)
        delays.append(p.on_close(4500).delay_s)
    assert delays[-1] > CFG.backoff_initial_s


def test_close_actions_override_the_codes_whose_meaning_is_unconfirmed() -> None:
    """Reference 7.2: OHIP's meaning of 4403 (and 4406, 4408, 4429, 4500, 4504) is
    unconfirmed; graphql-ws clients retry 4403. Each may stop or reconnect instead."""
    cfg = PolicyConfig(
        backoff_initial_s=1.0, backoff_max_s=16.0, close_actions={4403: "reconnect", 4504: "stop"}
    )
    p = policy(cfg=cfg)
    delays = []
    for _ in range(6):
        d = p.on_close(4403, "Forbidden")
        assert d.action is Action.RECONNECT and not d.deliberate and d.code == "4403"
        assert "forbidden (4403)" in d.reason and "Forbidden" in d.reason
        assert "close_actions" in d.reason
        delays.append(d.delay_s)
    assert delays[-1] > delays[0] and max(delays) <= 16.0  # the backoff, growing and capped
    stopped = p.on_close(4504)
    assert stopped.action is Action.STOP and "4504" in stopped.reason
    assert policy().on_close(4403).action is Action.STOP  # the default is unchanged
    with pytest.raises(ValueError, match="4401"):
        PolicyConfig(close_actions={4401: "reconnect"})


def test_the_metric_label_of_a_close_is_one_of_a_fixed_set() -> None:
    """The code comes from the server: any of some 4,000 close codes and 500 statuses would
    each make a series of `closes_total`. Known ones keep their name, the rest are bucketed."""
    policy = ClosePolicy(PolicyConfig())
    assert policy.on_close(4409).code == "4409"
    assert policy.on_close(4999).code == policy.on_close(3000).code == "other"
    assert policy.on_handshake_status(429).code == "http_429"
    assert policy.on_handshake_status(418).code == "http_4xx"
    assert policy.on_handshake_status(599).code == "http_5xx"
    assert policy.on_handshake_status(999).code == "http_other"
    labels = {policy.on_close(c).code for c in range(1000, 5000)}
    labels |= {policy.on_handshake_status(s).code for s in range(100, 1000)}
    assert len(labels) < 40


@pytest.mark.parametrize("status", [429, 500, 503, 520])
def test_retry_after_on_a_refused_upgrade_lengthens_the_wait(status: int) -> None:
    """429 and 5xx wait max(the policy's own wait, Retry-After), and say so."""
    own = policy().on_handshake_status(status)
    d = policy().on_handshake_status(status, retry_after_s=own.delay_s + 100.0)
    assert d.action is Action.RECONNECT
    assert d.delay_s == own.delay_s + 100.0
    assert "Retry-After" in d.reason and f"HTTP {status}" in d.reason
    shorter = policy().on_handshake_status(status, retry_after_s=0.5)
    assert shorter.delay_s == own.delay_s  # never shorter than the policy's wait
    assert "Retry-After" not in shorter.reason


@pytest.mark.parametrize("status", [400, 403, 404, 418])
def test_retry_after_does_not_change_other_refusals(status: int) -> None:
    own = policy().on_handshake_status(status)
    d = policy().on_handshake_status(status, retry_after_s=250.0)
    assert (d.action, d.delay_s, d.reason) == (own.action, own.delay_s, own.reason)


def test_a_redirect_to_another_origin_stops_naming_the_host() -> None:
    d = policy().on_redirect(302, "gw.example.com:8443", same_origin=False)
    assert d.action is Action.STOP
    assert "another origin (gw.example.com:8443)" in d.reason and "gateway_url" in d.reason
    assert d.code == "http_3xx"


def test_a_redirect_to_the_same_origin_backs_off_and_is_not_followed() -> None:
    p = policy()
    first = p.on_redirect(307, "gw.example.com", same_origin=True)
    second = p.on_redirect(307, "gw.example.com", same_origin=True)
    for d in (first, second):
        assert d.action is Action.RECONNECT and d.code == "http_3xx"
        assert "redirected to gw.example.com (HTTP 307); not followed" in d.reason
    assert CFG.backoff_initial_s / 2 <= first.delay_s <= CFG.backoff_initial_s
    assert CFG.backoff_initial_s <= second.delay_s <= 2 * CFG.backoff_initial_s
