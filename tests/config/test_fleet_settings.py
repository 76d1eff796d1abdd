"""[fleet] settings: a stream handed over must be able to stop within what a lease surely
lasts after a renewal (lease_ttl_s - renew_interval_s), and the defaults allow it."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.config import load_settings
from consumer.config.settings import fleet_handover_s
from consumer.errors import ConfigError
from consumer.runtime.pipeline import CANCEL_GRACE_S

FLEET = """
[streams.main]
gateway_url = "https://gw.example.com/"
chain_code = "CHAIN1"
app_key = "app-key-fleet-0001"
[streams.main.auth]
client_id = "cid"
client_secret = "secret"
[state]
backend = "postgres"
dsn = "postgresql://u:pass@h/d"
[sink]
type = "webhook"
url = "https://example.com/x"
[fleet]
enabled = true
"""


def test_the_defaults_leave_a_handover_room_in_the_lease(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, FLEET))
    f = settings.fleet
    stop = fleet_handover_s(settings.streams["main"].connection, settings.pipeline)
    assert stop == 44.0  # 2 x (10 + 2) + 20: close, drain, last commit
    assert stop <= f.lease_ttl_s - f.renew_interval_s


def test_a_lease_too_short_for_a_handover_is_refused_naming_the_keys(tmp_path: Path) -> None:
    text = FLEET + "lease_ttl_s = 30\nrenew_interval_s = 5\n"
    with pytest.raises(ConfigError) as refused:
        load_settings(_write(tmp_path, text))
    message = str(refused.value)
    for key in (
        "fleet.lease_ttl_s",
        "streams.main.connection.complete_timeout_s",
        "pipeline.drain_timeout_s",
        "at least 49",
    ):
        assert key in message, message


def test_a_short_lease_passes_with_short_stops(tmp_path: Path) -> None:
    text = FLEET.replace("[fleet]", "[pipeline]\ndrain_timeout_s = 1\n[fleet]") + (
        "lease_ttl_s = 8\nrenew_interval_s = 1\n"
    )
    text = text.replace(
        'client_secret = "secret"',
        'client_secret = "secret"\n[streams.main.connection]\ncomplete_timeout_s = 1',
    )
    settings = load_settings(_write(tmp_path, text))
    assert settings.fleet.lease_ttl_s == 8.0  # 2 x (1 + 2) + 1 = 7 <= 8 - 1


def short_stops(text: str) -> str:
    """``text`` with the shortest stops the settings allow (a handover of 2 x (0 + 2) + 0 s)."""
    text = FLEET.replace("[fleet]", "[pipeline]\ndrain_timeout_s = 0\n[fleet]") + text
    return text.replace(
        'client_secret = "secret"',
        'client_secret = "secret"\n[streams.main.connection]\ncomplete_timeout_s = 0',
    )


@pytest.mark.parametrize(("ttl", "tick"), [("60", "5"), ("8", "1"), ("4.3", "0.25")])
def test_the_self_fence_leaves_a_stuck_sink_write_its_grace_before_the_lease_expires(
    tmp_path: Path, ttl: str, tick: str
) -> None:
    """A self-fenced stream's stop gives a worker stuck in a sink write CANCEL_GRACE_S to end
    (consumer.runtime.pipeline), and that write may still complete then. The fence comes at
    least that grace and a tick (a lease lasts lease_ttl_s from the renewal's start) before
    the lease can expire, and still at least two ticks after the last renewal. With ticks
    under a second it came 2 ticks before the expiry: a stuck write could end after another
    member took the stream."""
    f = load_settings(
        _write(tmp_path, short_stops(f"lease_ttl_s = {ttl}\nrenew_interval_s = {tick}\n"))
    ).fleet
    assert f.lease_ttl_s - f.self_fence_after_s >= f.renew_interval_s + CANCEL_GRACE_S
    assert f.lease_ttl_s - f.self_fence_after_s >= 2 * f.renew_interval_s
    assert f.self_fence_after_s >= 2 * f.renew_interval_s


def test_a_lease_leaving_the_self_fence_less_than_two_ticks_is_refused(tmp_path: Path) -> None:
    """With the grace, a 6 s lease and 1.5 s ticks (a quarter, and room for the handover)
    self-fence 2.5 s after a renewal: one renewal late by a second would stop every stream of
    a healthy member. Refused, naming the key and the lease that would do."""
    text = short_stops("lease_ttl_s = 6\nrenew_interval_s = 1.5\n")
    with pytest.raises(ConfigError) as refused:
        load_settings(_write(tmp_path, text))
    message = str(refused.value)
    for part in ("fleet.lease_ttl_s", "two ticks", "at least 6.5", "renew_interval_s"):
        assert part in message, message
    ok = short_stops("lease_ttl_s = 6.5\nrenew_interval_s = 1.5\n")
    assert load_settings(_write(tmp_path, ok)).fleet.self_fence_after_s == 3.0


def test_without_fleet_mode_nothing_is_checked(tmp_path: Path) -> None:
    text = FLEET.replace("enabled = true", "enabled = false") + "lease_ttl_s = 20\n"
    assert not load_settings(_write(tmp_path, text)).fleet.enabled


def test_release_unreachable_after_s_defaults_to_three_leases(tmp_path: Path) -> None:
    f = load_settings(_write(tmp_path, FLEET)).fleet
    assert f.release_unreachable_after_s is None and f.release_after_s == 3 * f.lease_ttl_s
    text = FLEET + "lease_ttl_s = 120\n"
    assert load_settings(_write(tmp_path, text)).fleet.release_after_s == 360.0
    text = FLEET + "release_unreachable_after_s = 0\n"
    assert load_settings(_write(tmp_path, text)).fleet.release_after_s == 0.0  # never
    text = FLEET + "release_unreachable_after_s = 120\n"
    assert load_settings(_write(tmp_path, text)).fleet.release_after_s == 120.0


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("119", "at least 120"),  # below twice lease_ttl_s (60)
        ("-1", "greater than or equal to 0"),
        ("1e9", "0 to 86400"),
        ("inf", "finite"),
        ("nan", "finite"),
    ],
)
def test_release_unreachable_after_s_out_of_range_is_refused_naming_the_key(
    tmp_path: Path, value: str, says: str
) -> None:
    text = FLEET + f"release_unreachable_after_s = {value}\n"
    with pytest.raises(ConfigError) as refused:
        load_settings(_write(tmp_path, text))
    message = str(refused.value)
    assert "fleet.release_unreachable_after_s" in message and says in message, message


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


# As TOML escapes: NUL (PostgreSQL refuses it in the startup packet: every tick failed, for
# ever), LF, ESC (a terminal's escape sequences in `fleet status`), a line separator.
@pytest.mark.parametrize("bad", ["\\u0000", "\\n", "\\u001b", "\\u2028"])
def test_a_control_character_in_the_member_name_is_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(_write(tmp_path, FLEET + f'member = "zqx{bad}1"\n'))
    message = str(refused.value)
    assert "fleet.member" in message and "at position 3" in message, message
    assert "printable characters only" in message  # the fix
    assert "zqx" not in message  # never the value


def test_a_printable_member_name_is_kept(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, FLEET + 'member = "web-1 (rack 2) ü"\n'))
    assert settings.fleet.member == "web-1 (rack 2) ü"


@pytest.mark.parametrize("weight", ["1000.5", "1e308"])
def test_a_weight_above_the_bound_is_refused(tmp_path: Path, weight: str) -> None:
    """1e308 overflowed the shares to infinity (every tick failed, `fleet status` crashed);
    two such weights made every share 0."""
    with pytest.raises(ConfigError) as refused:
        load_settings(_write(tmp_path, FLEET + f"weight = {weight}\n"))
    message = str(refused.value)
    assert "fleet.weight: is above 1000" in message, message
    assert "scale them down" in message


def test_the_largest_weight_is_kept(tmp_path: Path) -> None:
    assert load_settings(_write(tmp_path, FLEET + "weight = 1000\n")).fleet.weight == 1000.0
