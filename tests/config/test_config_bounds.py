"""Values the settings' types accepted and the daemon then acted on badly are refused at load,
naming the key, the sane range and the fix (check-config and run exit 78 before connecting):
intervals with no floor (a ping flood at OHIP's gateway), a liveness floor below the pings'
period (a quiet stream reconnecting for ever), a retention shorter than OHIP's (ids needed for
deduplication pruned), timeouts of the stop without a ceiling (a 300-digit request to
systemd), a reconnect backoff of 0 (a loop of upgrades at the gateway) or beyond an hour, the
waits after a 1006, a 4409 or a 429 of 0 or beyond an hour, an upgrade budget beyond OHIP's, a
retention beyond a year and a lease beyond an hour, a jsonl sink in the state store's file, two
streams that are one OHIP subscription, a metrics address that is no address, and a Redis guard
under a minute; pings under a second to a gateway off this host draw a warning, as does a Redis
guard shorter than OHIP's 7 days."""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path
from typing import Any

import pytest
from config_files import config_error, run_refused, write
from log_capture import captured_logs, records
from redis_server import RedisServer
from support import FAST_CONNECTION, cli, make_settings, running, stream_config, wait_until

from consumer.config import load_settings
from consumer.config.settings import STOP_SLACK_S, Settings, stop_budget
from consumer.errors import ExitCode

pytestmark = pytest.mark.usefixtures("hermetic_config")

WORKTREE = Path(__file__).resolve().parents[2]
APP_KEY = "app-key-B0unds-0001"
HOUR_S = 3600.0  # the ceiling of the stop's timeouts


def stream(
    name: str = "main", *, chain: str = "CHAIN1", key: str = APP_KEY, extra: str = ""
) -> str:
    return f"""
[streams.{name}]
gateway_url = "https://gw.example.com"
chain_code = "{chain}"
app_key = "{key}"
{extra}
[streams.{name}.auth]
client_id = "cid"
client_secret = "client-secret-B0unds-0002"
enterprise_id = "ENT1"
"""


def with_key(table: str, key: str, value: object) -> str:
    """The one stream, with ``key = value`` in ``table`` (relative to the stream for
    "connection")."""
    head = "[streams.main.connection]" if table == "connection" else f"[{table}]"
    return stream() + f"\n{head}\n{key} = {value}\n"


def env() -> dict[str, str]:
    """For ``python -m consumer``: this tree's code, no OPERA_CONSUMER_ variable."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("OPERA_CONSUMER_")}
    return {**kept, "PYTHONPATH": str(WORKTREE)}


# --- intervals with a floor ----------------------------------------------------------------------

# (table, key, refused, smallest accepted, what the message says of the range)
FLOORS = [
    ("connection", "ping_interval_s", 0.0001, 0.01, "0.01 to 15 s"),
    ("connection", "status_poll_s", 0.001, 0.05, "at least 0.05 s"),
    ("connection", "upgrade_window_s", 0.001, 0.5, "at least 0.5 s"),
    ("pipeline", "sink_retry_max_s", 0.001, 0.05, "at least 0.05 s"),
    ("pipeline", "sink_retry_initial_s", 0.0001, 0.01, "at least 0.01 s"),
    ("log", "progress_interval_s", 0.001, 0.1, "at least 0.1 s (or 0: no lines)"),
    ("state", "prune_interval_s", 0.1, 1, "at least 1 s"),
    ("state", "processed_retention_days", 0.00001, 7, "7 to 365 days"),
]


@pytest.mark.parametrize("case", FLOORS, ids=[case[1] for case in FLOORS])
def test_an_interval_below_its_floor_is_refused_naming_the_range(
    tmp_path: Path, case: tuple[str, str, float, float, str]
) -> None:
    table, key, bad, low, span = case
    message = config_error(write(tmp_path, with_key(table, key, bad)))
    dotted = f"streams.main.connection.{key}" if table == "connection" else f"{table}.{key}"
    assert f"{dotted}: is below " in message, message
    assert f"-> set it to {span}" in message, message
    load_settings(write(tmp_path, with_key(table, key, low)))  # the floor itself is valid


def test_the_retention_says_why_it_is_ohips() -> None:
    with pytest.raises(ValueError, match="OHIP retains events for 7 days"):
        Settings(
            streams={"main": _stream_dict()},
            state={"processed_retention_days": 6.99},  # type: ignore[arg-type]
        )


def test_progress_lines_may_be_off() -> None:
    settings = Settings(
        streams={"main": _stream_dict()},
        log={"progress_interval_s": 0},  # type: ignore[arg-type]
    )
    assert settings.log.progress_interval_s == 0


def test_the_ping_interval_keeps_its_ceiling(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, with_key("connection", "ping_interval_s", 20)))
    assert "ping_interval_s: is above 15 s: Oracle wants a ping at least every 15 s" in message


def test_the_tests_scaled_timers_stay_valid() -> None:
    """The smallest values the suite scales its timers to (grep tests/ for each key)."""
    Settings(
        streams={
            "main": _stream_dict(
                connection={
                    **FAST_CONNECTION,
                    "ping_interval_s": 0.02,  # tests/chaos
                    "liveness_floor_s": 1.0,
                    "status_poll_s": 0.05,
                    "upgrade_window_s": 0.5,
                    "complete_timeout_s": 0.1,
                    "backoff_initial_s": 0.01,  # tests/runtime/test_close_codes.py
                    "backoff_max_s": 0.05,
                    "abnormal_min_s": 0.05,  # tests/e2e/test_poison.py
                    "lockout_s": 0.4,  # tests/runtime/test_close_codes.py
                    "upgrade_limit": 2,
                }
            )
        },
        pipeline={"sink_retry_initial_s": 0.01, "sink_retry_max_s": 0.05, "drain_timeout_s": 0.1},  # type: ignore[arg-type]
        log={"progress_interval_s": 0.3},  # type: ignore[arg-type]
    )


# --- reconnect backoff ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "bad", "says"),
    [
        ("backoff_initial_s", "0", "is below 0.01 s"),
        ("backoff_initial_s", "1e-9", "is below 0.01 s"),
        ("backoff_max_s", "0.001", "is below 0.05 s"),
        ("backoff_initial_s", "1e308", "is above 3600 s"),
        ("backoff_max_s", "1e308", "is above 3600 s"),
    ],
)
def test_a_reconnect_backoff_out_of_range_is_refused(
    tmp_path: Path, key: str, bad: str, says: str
) -> None:
    """0 or 1e-9 reconnected in a loop at OHIP's gateway (which counts the upgrades); 1e308
    left a stream down for ever after an outage."""
    other = {
        "backoff_initial_s": "backoff_max_s = 3600",
        "backoff_max_s": "backoff_initial_s = 0.01",
    }
    text = stream() + f"\n[streams.main.connection]\n{key} = {bad}\n{other[key]}\n"
    message = config_error(write(tmp_path, text))
    assert f"streams.main.connection.{key}: {says}" in message, message
    assert "a loop of upgrades at OHIP's gateway" in message
    span = "0.01 to 3600 s" if key == "backoff_initial_s" else "0.05 to 3600 s"
    assert f"-> set it to {span}" in message, message


def test_a_backoff_that_starts_above_its_cap_is_refused_naming_both(tmp_path: Path) -> None:
    text = stream() + "\n[streams.main.connection]\nbackoff_max_s = 0.5\n"  # initial: 1
    message = config_error(write(tmp_path, text))
    assert "streams.main.connection.backoff_initial_s: is above backoff_max_s (1 > 0.5)" in message
    assert "lower backoff_initial_s or raise backoff_max_s" in message
    load_settings(write(tmp_path, text + "backoff_initial_s = 0.5\n"))  # equal: valid


async def test_run_refuses_a_zero_backoff_before_connecting(tmp_path: Path) -> None:
    def config(url: str) -> Path:
        text = stream().replace("https://gw.example.com", url)
        return write(tmp_path, text + "\n[streams.main.connection]\nbackoff_initial_s = 0\n")

    out = await run_refused(config, env())
    assert "streams.main.connection.backoff_initial_s: is below 0.01 s" in out


# --- the waits Oracle names and the upgrade budget -----------------------------------------------


@pytest.mark.parametrize(
    ("key", "bad", "says", "span"),
    [
        ("abnormal_min_s", "0", "is below 0.01 s", "0.01 to 3600 s"),
        ("abnormal_min_s", "1e308", "is above 3600 s", "0.01 to 3600 s"),
        ("lockout_s", "0", "is below 0.1 s", "0.1 to 3600 s"),
        ("lockout_s", "1e308", "is above 3600 s", "0.1 to 3600 s"),
        ("lockout_jitter_s", "1e308", "is above 3600 s", "0 to 3600 s"),
        ("lockout_max_s", "0", "is below 0.1 s", "0.1 to 3600 s"),
        ("lockout_max_s", "1e308", "is above 3600 s", "0.1 to 3600 s"),
        ("rate_limited_s", "0", "is below 0.1 s", "0.1 to 3600 s"),
        ("rate_limited_s", "0.001", "is below 0.1 s", "0.1 to 3600 s"),
        ("rate_limited_s", "1e308", "is above 3600 s", "0.1 to 3600 s"),
        ("open_timeout_s", "1e308", "is above 3600 s", "0.1 to 3600 s"),
        ("open_timeout_s", "0.001", "is below 0.1 s", "0.1 to 3600 s"),
        ("ack_timeout_s", "1e308", "is above 3600 s", "0.1 to 3600 s"),
        ("liveness_max_s", "1e308", "is above 3600 s", "0.1 to 3600 s"),
        ("resubscribe_gap_s", "1e308", "is above 3600 s", "0 to 3600 s"),
        ("healthy_after_s", "1e308", "is above 3600 s", "0 to 3600 s"),
        ("takeover_jitter_s", "1e308", "is above 3600 s", "0 to 3600 s"),
    ],
)
def test_a_wait_after_a_close_or_a_refusal_out_of_range_is_refused(
    tmp_path: Path, key: str, bad: str, says: str, span: str
) -> None:
    """0 went straight back into the 1006, the 4409 lockout or the 429 the gateway had just
    answered; 1e308 left the stream down (a gap, a jitter, a deadline) for ever."""
    # lockout_s and lockout_max_s at their floor, so the order check does not answer first.
    other = {"lockout_s": "lockout_max_s = 3600", "lockout_max_s": "lockout_s = 0.1"}
    text = stream() + f"\n[streams.main.connection]\n{key} = {bad}\n{other.get(key, '')}\n"
    message = config_error(write(tmp_path, text))
    assert f"streams.main.connection.{key}: {says}" in message, message
    assert f"-> set it to {span}" in message, message
    low = span.split(" to ", maxsplit=1)[0]
    load_settings(write(tmp_path, text.replace(f"{key} = {bad}", f"{key} = {low}")))
    load_settings(write(tmp_path, text.replace(f"{key} = {bad}", f"{key} = 3600")))


def test_the_waits_say_what_oracle_asks() -> None:
    for key, said in [
        ("abnormal_min_s", "Oracle: wait 4 s"),
        ("rate_limited_s", "Oracle: retry after 2 minutes"),
        ("lockout_s", "subscribes again into the lockout"),
    ]:
        with pytest.raises(ValueError, match=said):
            Settings(streams={"main": _stream_dict(connection={key: 0})})


@pytest.mark.parametrize("bad", ["151", "1000000000", "1e9", "0"])
def test_an_upgrade_limit_beyond_ohips_is_refused(tmp_path: Path, bad: str) -> None:
    """OHIP answers 429 to more than 150 upgrades in 2 minutes from one application key: a
    limit of 1e9 switched the budget off, and a reconnect loop spent OHIP's instead."""
    message = config_error(write(tmp_path, with_key("connection", "upgrade_limit", bad)))
    side = "below 1" if bad == "0" else "above 150"
    assert f"streams.main.connection.upgrade_limit: is {side} upgrades: " in message, message
    assert "HTTP 429 to more than 150 in 2 minutes" in message, message
    assert "-> set it to 1 to 150 upgrades" in message, message
    settings = load_settings(write(tmp_path, with_key("connection", "upgrade_limit", 150)))
    assert settings.streams["main"].connection.upgrade_limit == 150


def test_a_lockout_ceiling_below_the_lockout_is_refused_naming_both(tmp_path: Path) -> None:
    """The doubling starts at lockout_s: a ceiling below it was silently lockout_s, and a
    lockout_s raised alone (600, over the default ceiling of 480) never doubled."""
    text = stream() + "\n[streams.main.connection]\nlockout_s = 600\n"
    message = config_error(write(tmp_path, text))
    assert "streams.main.connection.lockout_max_s: is below lockout_s (480 < 600)" in message
    assert "raise lockout_max_s to at least lockout_s (equal: the wait never doubles)" in message
    settings = load_settings(write(tmp_path, text + "lockout_max_s = 600\n"))  # equal: valid
    assert settings.streams["main"].connection.lockout_max_s == 600


async def test_run_refuses_a_zero_lockout_before_connecting(tmp_path: Path) -> None:
    def config(url: str) -> Path:
        text = stream().replace("https://gw.example.com", url)
        return write(tmp_path, text + "\n[streams.main.connection]\nlockout_s = 0\n")

    out = await run_refused(config, env())
    assert "streams.main.connection.lockout_s: is below 0.1 s" in out


def test_check_config_refuses_an_upgrade_limit_beyond_ohips(tmp_path: Path) -> None:
    config = write(tmp_path, with_key("connection", "upgrade_limit", "1000000"))
    checked = cli("check-config", "--config", str(config), env=env())
    assert checked.returncode == ExitCode.CONFIG, checked.stderr
    assert "streams.main.connection.upgrade_limit: is above 150 upgrades" in checked.stderr


# --- ceilings: the state store's retention, the fleet's lease ------------------------------------


def test_a_retention_beyond_a_year_is_refused(tmp_path: Path) -> None:
    """1e9 days: processed ids never pruned, the state store growing for ever, for ids OHIP
    (7 days of retention) can no longer send."""
    message = config_error(write(tmp_path, with_key("state", "processed_retention_days", "1e9")))
    assert "state.processed_retention_days: is above 365 days: OHIP retains events" in message
    assert "only grow the state store" in message and "-> set it to 7 to 365 days" in message
    settings = load_settings(write(tmp_path, with_key("state", "processed_retention_days", 365)))
    assert settings.state.processed_retention_days == 365


FLEET_SINK = '[sink]\ntype = "webhook"\nurl = "https://hook.example.com/in"\n'
FLEET_STATE = '[state]\nbackend = "postgres"\ndsn = "postgresql://u:pass@127.0.0.1/db"\n'


def test_a_lease_of_more_than_an_hour_is_refused(tmp_path: Path) -> None:
    """A member killed -9 holds its streams' leases until they expire: a year's TTL, and no
    other member ever took them over."""
    fleet = "[fleet]\nenabled = true\nlease_ttl_s = {}\n"
    text = stream() + FLEET_STATE + FLEET_SINK + fleet
    message = config_error(write(tmp_path, text.format("31536000")))
    assert "fleet.lease_ttl_s: is above 3600 s: the streams of a member that died" in message
    assert "-> set it to 0 to 3600 s" in message, message
    assert load_settings(write(tmp_path, text.format(3600))).fleet.lease_ttl_s == 3600


def test_a_handover_longer_than_the_longest_lease_asks_for_shorter_stops(tmp_path: Path) -> None:
    """The fix never asks for a lease above its ceiling."""
    fleet = "[fleet]\nenabled = true\nlease_ttl_s = 3600\n"
    slow = "[pipeline]\ndrain_timeout_s = 3600\n"
    message = config_error(write(tmp_path, stream() + FLEET_STATE + FLEET_SINK + fleet + slow))
    assert "fleet.lease_ttl_s: a stream handed over may take 3624 s to stop" in message, message
    assert "-> lower pipeline.drain_timeout_s or connection.complete_timeout_s (a lease " in message
    assert "raise fleet.lease_ttl_s" not in message


# --- pings more often than every second to a real gateway ---------------------------------------


@pytest.mark.parametrize(
    "gateway", ["https://gw.example.com", "http://10.1.2.3:8080", "https://127.0.0.1.example.com"]
)
def test_pings_under_a_second_to_a_gateway_off_this_host_draw_a_warning(
    tmp_path: Path, gateway: str
) -> None:
    insecure = "allow_insecure_http = true\n" if gateway.startswith("http:") else ""
    text = insecure + stream().replace("https://gw.example.com", gateway)
    text += "\n[streams.main.connection]\nping_interval_s = 0.5\nliveness_floor_s = 2\n"
    warned = load_settings(write(tmp_path, text)).warnings()
    assert [key for key, _, _ in warned] == ["streams.main.connection.ping_interval_s"], warned
    assert "is 0.5 s, under 1 s, to a gateway that is not loopback" in warned[0][1]
    assert "floods it" in warned[0][1] and "set it to 10 (the default)" in warned[0][2]
    one = load_settings(
        write(tmp_path, text.replace("ping_interval_s = 0.5", "ping_interval_s = 1"))
    )
    assert one.warnings() == []


@pytest.mark.parametrize(
    "gateway",
    ["http://127.0.0.1:8080", "http://localhost:8080", "http://[::1]:8080", "ws://127.0.0.2:9"],
)
def test_pings_scaled_down_on_loopback_draw_no_warning(tmp_path: Path, gateway: str) -> None:
    """The tests' sandbox runs on loopback with 0.5 s pings (and less)."""
    text = stream().replace("https://gw.example.com", gateway)
    text += "\n[streams.main.connection]\nping_interval_s = 0.02\nliveness_floor_s = 1\n"
    assert load_settings(write(tmp_path, text)).warnings() == []


def test_check_config_prints_the_ping_warning(tmp_path: Path) -> None:
    text = stream() + "\n[streams.main.connection]\nping_interval_s = 0.5\nliveness_floor_s = 2\n"
    checked = cli("check-config", "--config", str(write(tmp_path, text)), env=env())
    assert checked.returncode == 0, checked.stderr
    assert "warning: streams.main.connection.ping_interval_s: is 0.5 s, under 1 s" in checked.stderr


def test_an_upgrade_window_short_enough_to_pass_ohips_limit_draws_a_warning(
    tmp_path: Path,
) -> None:
    """OHIP answers 429 past 150 upgrades in 2 minutes: upgrade_limit 150 in a 0.5 s window
    allows some 36,000; the budget is off. Loopback (the sandbox's tests) draws none."""
    text = stream() + "\n[streams.main.connection]\nupgrade_window_s = 0.5\nupgrade_limit = 4\n"
    warned = load_settings(write(tmp_path, text)).warnings()
    assert [key for key, _, _ in warned] == ["streams.main.connection.upgrade_window_s"], warned
    assert "up to 960 upgrades in 2 minutes" in warned[0][1], warned
    assert "set upgrade_window_s to 120 (the default)" in warned[0][2]
    wide = text.replace("upgrade_window_s = 0.5", "upgrade_window_s = 120")
    assert load_settings(write(tmp_path, wide)).warnings() == []
    local = text.replace("https://gw.example.com", "http://127.0.0.1:8080")
    assert load_settings(write(tmp_path, local)).warnings() == []


# --- liveness floor and ping interval ------------------------------------------------------------


def test_a_liveness_floor_below_two_pings_is_refused_naming_both_keys(tmp_path: Path) -> None:
    text = stream() + "\n[streams.main.connection]\nping_interval_s = 1.0\nliveness_floor_s = 0.3\n"
    message = config_error(write(tmp_path, text))
    assert "streams.main.connection.liveness_floor_s: is less than 2 x ping_interval_s" in message
    assert "declared dead between its own pings" in message
    assert "raise liveness_floor_s to at least 2 x ping_interval_s" in message
    # Twice the period is enough (the tests' 1.0 s floor with 0.05-0.1 s pings is far more).
    text = text.replace("liveness_floor_s = 0.3", "liveness_floor_s = 2.0")
    assert load_settings(write(tmp_path, text)).streams["main"].connection.liveness_floor_s == 2.0


# --- the stop's timeouts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("connection", "complete_timeout_s"),
        ("pipeline", "drain_timeout_s"),
    ],
)
def test_a_timeout_of_the_stop_has_a_ceiling(tmp_path: Path, table: str, key: str) -> None:
    message = config_error(write(tmp_path, with_key(table, key, "1e308")))
    assert f"{key}: is above 3600 s: it adds to what a stop may take" in message, message
    assert "-> set it to 0 to 3600 s" in message
    load_settings(write(tmp_path, with_key(table, key, 3600)))


def test_the_postgres_and_fleet_timers_of_the_stop_have_a_ceiling() -> None:
    state = {"backend": "postgres", "dsn": "postgresql://u:pass@127.0.0.1/db"}
    with pytest.raises(ValueError, match=r"state.timeout_s\n.*is above 3600 s"):
        Settings(
            streams={"main": _stream_dict()},
            state={**state, "timeout_s": 1e308},  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match=r"fleet.renew_interval_s\n.*is above 3600 s"):
        Settings(
            streams={"main": _stream_dict()},
            state=state,  # type: ignore[arg-type]
            sink={"type": "webhook", "url": "https://hook.example.com"},  # type: ignore[arg-type]
            fleet={"enabled": True, "renew_interval_s": 1e308},  # type: ignore[arg-type]
        )


def test_the_longest_stop_the_settings_allow_is_a_few_hours() -> None:
    most = Settings(
        streams={"main": _stream_dict(connection={"complete_timeout_s": HOUR_S})},
        state={  # type: ignore[arg-type]
            "backend": "postgres",
            "dsn": "postgresql://u:pass@127.0.0.1/db",
            "timeout_s": HOUR_S,
        },
        pipeline={"drain_timeout_s": HOUR_S},  # type: ignore[arg-type]
    )
    total = stop_budget(most).total_s + STOP_SLACK_S
    assert math.isfinite(total) and total < 4 * HOUR_S
    assert len(str(int(total * 1e6))) <= 11  # EXTEND_TIMEOUT_USEC: a few hours, not 300 digits


# --- a jsonl sink in the state store's files -----------------------------------------------------


@pytest.mark.parametrize(
    ("state", "sink", "what"),
    [
        ("opera.db", "opera.db", "database"),
        ("opera.db", "opera.db-wal", "-wal file"),
        ("opera.db", "opera.db-shm", "-shm file"),
        ("opera.db", "opera.db-journal", "-journal file"),
        ("opera.db", "opera.db.lock", ".lock file"),
        ("data/../opera.db", "opera.db", "database"),  # resolved, relative to the file
    ],
)
def test_a_jsonl_sink_in_the_state_store_is_refused(
    tmp_path: Path, state: str, sink: str, what: str
) -> None:
    text = stream() + f'\n[state]\npath = "{state}"\n[sink]\ntype = "jsonl"\npath = "{sink}"\n'
    message = config_error(write(tmp_path, text))
    assert f"sink.path: names the state store's {what} (state.path)" in message, message
    assert "give the sink a file of its own" in message


def test_a_jsonl_sink_through_a_symlink_to_the_state_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "opera.db").write_bytes(b"")
    (tmp_path / "events.jsonl").symlink_to(tmp_path / "opera.db")
    text = stream() + '\n[state]\npath = "opera.db"\n[sink]\npath = "events.jsonl"\n'
    assert "names the state store's database" in config_error(write(tmp_path, text))


def test_with_postgres_state_only_the_lease_file_is_the_stores(tmp_path: Path) -> None:
    pg = 'backend = "postgres"\ndsn = "postgresql://u:pass@127.0.0.1/db"\n'
    text = stream() + f'\n[state]\n{pg}path = "opera.db"\n[sink]\npath = "opera.db.lock"\n'
    assert "names the state store's .lock file" in config_error(write(tmp_path, text))
    load_settings(write(tmp_path, text.replace('path = "opera.db.lock"', 'path = "opera.db"')))


def test_a_rotated_series_that_names_the_state_store_is_refused(tmp_path: Path) -> None:
    text = stream() + (
        '\n[state]\npath = "opera-2024.000001.db"\n'
        '[sink]\npath = "events.jsonl"\nrotate_bytes = 1000\nrotate_name = "opera-%Y.db"\n'
    )
    message = config_error(write(tmp_path, text))
    assert "sink.rotate_name: names the state store's database (state.path) as a rotated" in message
    ok = text.replace('rotate_name = "opera-%Y.db"', 'rotate_name = "events-%Y.jsonl"')
    load_settings(write(tmp_path, ok))


def test_a_sqlite_sink_may_share_the_state_stores_file(tmp_path: Path) -> None:
    text = stream() + '\n[state]\npath = "opera.db"\n[sink]\ntype = "sqlite"\npath = "opera.db"\n'
    load_settings(write(tmp_path, text))  # by design: rows and checkpoint in one transaction


async def test_check_config_and_run_refuse_a_jsonl_sink_in_the_state_store(
    tmp_path: Path,
) -> None:
    def config(url: str) -> Path:
        text = stream().replace("https://gw.example.com", url)
        return write(tmp_path, text + '\n[state]\npath = "opera.db"\n[sink]\npath = "opera.db"\n')

    checked = await asyncio.to_thread(
        cli, "check-config", "--config", str(config("https://gw.example.com")), env=env()
    )
    assert checked.returncode == ExitCode.CONFIG, checked.stderr
    assert "sink.path: names the state store's database" in checked.stderr
    out = await run_refused(config, env())
    assert "sink.path: names the state store's database" in out
    assert "sink adopt --execute" not in out  # what run suggested, for a database


# --- two streams that are one OHIP subscription --------------------------------------------------


def test_two_streams_with_one_key_gateway_and_chain_are_refused_naming_both(
    tmp_path: Path,
) -> None:
    text = stream("a") + stream("b")
    message = config_error(write(tmp_path, text))
    assert (
        "streams.b.app_key: streams a and b have the same gateway_url, chain_code and app_key"
        in (message)
    )
    assert "4409" in message and "remove stream b" in message
    assert APP_KEY not in message


def test_disjoint_hotel_codes_make_no_second_subscription(tmp_path: Path) -> None:
    """OHIP tells a subscription by application key, gateway and chain: hotel_codes filter it."""
    a = stream("a", extra='[streams.a.subscription]\nhotel_codes = ["H1"]\n')
    b = stream("b", extra='[streams.b.subscription]\nhotel_codes = ["H2"]\n')
    assert "streams a and b have the same" in config_error(write(tmp_path, a + b))


def test_the_gateway_is_compared_as_ohip_reads_it(tmp_path: Path) -> None:
    b = stream("b").replace("https://gw.example.com", "wss://GW.example.com:443/subscriptions")
    assert "streams a and b have the same" in config_error(write(tmp_path, stream("a") + b))


def test_streams_of_other_chains_or_gateways_are_valid(tmp_path: Path) -> None:
    other_gw = stream("c").replace("gw.example.com", "gw2.example.com")
    settings = load_settings(write(tmp_path, stream("a") + stream("b", chain="CHAIN2") + other_gw))
    assert list(settings.streams) == ["a", "b", "c"] and settings.warnings() == []


def test_other_keys_on_one_chain_with_shared_hotels_draw_a_warning(tmp_path: Path) -> None:
    """Two application keys may select different events (each its portal template): valid,
    but an event both select would be delivered twice into the one sink."""
    text = stream("a") + stream("b", key="app-key-B0unds-0003")
    warned = load_settings(write(tmp_path, text)).warnings()
    assert [key for key, _, _ in warned] == ["streams.b.subscription.hotel_codes"]
    assert "delivered twice" in warned[0][1] and "4409" not in warned[0][1]
    a = stream("a", extra='[streams.a.subscription]\nhotel_codes = ["H1", "H2"]\n')
    b = stream(
        "b", key="app-key-B0unds-0004", extra='[streams.b.subscription]\nhotel_codes = ["h2"]\n'
    )
    assert len(load_settings(write(tmp_path, a + b)).warnings()) == 1  # codes: any case
    b = b.replace('["h2"]', '["H3"]')
    assert load_settings(write(tmp_path, a + b)).warnings() == []


def test_check_config_prints_the_overlap_warning(tmp_path: Path) -> None:
    config = write(tmp_path, stream("a") + stream("b", key="app-key-B0unds-0003"))
    checked = cli("check-config", "--config", str(config), env=env())
    assert checked.returncode == 0, checked.stderr
    assert "warning: streams.b.subscription.hotel_codes: streams a and b" in checked.stderr


def test_keys_a_command_was_not_given_are_not_taken_for_one(tmp_path: Path) -> None:
    """`status` and the like load without the streams' secrets (systemd gives them to the
    service only): two streams whose keys are not given are not refused as one key."""
    text = (stream("a") + stream("b")).replace(f'app_key = "{APP_KEY}"\n', "")
    settings = load_settings(write(tmp_path, text), stream_secrets=False)
    (warned,) = settings.warnings()
    assert "app_keys this command was not given (if they are one, OHIP refuses" in warned[1]


def test_check_config_refuses_two_streams_with_one_subscription(tmp_path: Path) -> None:
    checked = cli(
        "check-config", "--config", str(write(tmp_path, stream("a") + stream("b"))), env=env()
    )
    assert checked.returncode == ExitCode.CONFIG, checked.stderr
    assert "streams.b.app_key: streams a and b have the same" in checked.stderr


# --- metrics address -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address", ["999.1.1.1", "[::1]", "metrics.internal", " 127.0.0.1", "1.2.3"]
)
def test_a_metrics_address_that_is_no_address_is_refused(tmp_path: Path, address: str) -> None:
    message = config_error(write(tmp_path, with_key("metrics", "address", f'"{address}"')))
    assert "metrics.address: is not an IP address" in message, message
    assert '"0.0.0.0"' in message


@pytest.mark.parametrize("address", ["", "localhost", "127.0.0.1", "0.0.0.0", "::", "::1"])
def test_the_documented_metrics_addresses_are_valid(tmp_path: Path, address: str) -> None:
    settings = load_settings(write(tmp_path, with_key("metrics", "address", f'"{address}"')))
    assert settings.metrics.address == address


def test_check_config_refuses_a_metrics_address_run_cannot_bind(tmp_path: Path) -> None:
    config = write(tmp_path, with_key("metrics", "address", '"999.1.1.1"'))
    checked = cli("check-config", "--config", str(config), env=env())
    assert checked.returncode == ExitCode.CONFIG, checked.stderr
    assert "metrics.address: is not an IP address" in checked.stderr


def test_check_config_refuses_a_tiny_retention_and_ping_interval(tmp_path: Path) -> None:
    text = stream() + (
        "\n[streams.main.connection]\nping_interval_s = 0.0001\n"
        "[state]\nprocessed_retention_days = 0.00001\nprune_interval_s = 0.1\n"
    )
    checked = cli("check-config", "--config", str(write(tmp_path, text)), env=env())
    assert checked.returncode == ExitCode.CONFIG, checked.stderr
    for key in (
        "streams.main.connection.ping_interval_s",
        "state.processed_retention_days",
        "state.prune_interval_s",
    ):
        assert f"{key}: is below" in checked.stderr, checked.stderr


def _stream_dict(**overrides: object) -> Any:  # StreamSettings' input
    return {
        "gateway_url": "https://gw.example.com",
        "chain_code": "CHAIN1",
        "app_key": APP_KEY,
        "auth": {
            "client_id": "cid",
            "client_secret": "client-secret-B0unds-0002",
            "enterprise_id": "E",
        },
        **overrides,
    }


async def test_the_daemon_logs_the_overlap_warning_at_start(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """check-config printed it, but `run` logged only each stream's own warnings: an operator
    who never ran check-config was not told."""
    gw = await sandbox_factory(backlog=1)
    streams = {
        "a": stream_config(gw.url),
        "b": stream_config(gw.url, app_key="another-application-key-0003"),
    }
    with captured_logs() as logs:
        async with running(make_settings(tmp_path, gw.url, streams=streams)) as daemon:
            await wait_until(lambda: daemon.pipelines["a"].delivered >= 1)
    warned = [e for e in records(logs) if e.get("key") == "streams.b.subscription.hotel_codes"]
    assert len(warned) == 1 and "delivered twice" in warned[0]["problem"]


# --- the Redis sink's guard ----------------------------------------------------------------------

REDIS_SINK = '\n[sink]\ntype = "redis"\nurl = "redis://127.0.0.1:9/0"\n'


@pytest.mark.parametrize("bad", ["0.001", "59.9", "0", "-1"])
def test_a_redis_guard_under_a_minute_is_refused_naming_the_fix(tmp_path: Path, bad: str) -> None:
    """The guard is how long a replayed event is still known as written: a millisecond was
    accepted, and every event replayed (a reconnect's, inclusive) was added to the stream
    again."""
    message = config_error(write(tmp_path, stream() + REDIS_SINK + f"guard_ttl_s = {bad}\n"))
    assert "sink.guard_ttl_s: is below 60 s: the guard is how long a replayed event" in message
    assert "OHIP keeps 7 days and replays inclusively" in message, message
    assert "-> set it to at least 60 s" in message, message
    settings = load_settings(write(tmp_path, stream() + REDIS_SINK + "guard_ttl_s = 60\n"))
    assert settings.sink.type == "redis" and settings.sink.guard_ttl_s == 60


async def test_run_refuses_a_millisecond_redis_guard_before_connecting(tmp_path: Path) -> None:
    def config(url: str) -> Path:
        text = stream().replace("https://gw.example.com", url)
        return write(tmp_path, text + REDIS_SINK + "guard_ttl_s = 0.001\n")

    out = await run_refused(config, env())
    assert "sink.guard_ttl_s: is below 60 s" in out


@pytest.mark.parametrize("ttl", ["60", "3600", "604799"])
def test_a_redis_guard_shorter_than_ohips_retention_draws_a_warning(
    tmp_path: Path, ttl: str
) -> None:
    """OHIP keeps 7 days of events and may send any of them again: a guard living less lets
    a replay reaching further back add the event again."""
    warned = load_settings(
        write(tmp_path, stream() + REDIS_SINK + f"guard_ttl_s = {ttl}\n")
    ).warnings()
    assert [key for key, _, _ in warned] == ["sink.guard_ttl_s"], warned
    assert f"is {ttl} s, under 7 days (604800 s)" in warned[0][1], warned
    assert "is added to the stream again" in warned[0][1]
    assert "set it to 691200 (8 days, the default)" in warned[0][2]
    for enough in ("guard_ttl_s = 604800\n", ""):
        text = stream() + REDIS_SINK + enough
        assert load_settings(write(tmp_path, text)).warnings() == []


def test_check_config_prints_the_redis_guard_warning(tmp_path: Path) -> None:
    text = stream() + REDIS_SINK + "guard_ttl_s = 3600\n"
    checked = cli("check-config", "--config", str(write(tmp_path, text)), env=env())
    assert checked.returncode == 0, checked.stderr
    assert "warning: sink.guard_ttl_s: is 3600 s, under 7 days" in checked.stderr


async def test_the_daemon_logs_the_redis_guard_warning_once_at_start(
    sandbox_factory: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    gw = await sandbox_factory(backlog=1)
    sink = {"type": "redis", "url": redis_server.url(), "guard_ttl_s": 3600}
    with captured_logs() as logs:
        async with running(make_settings(tmp_path, gw.url, sink=sink)) as daemon:
            await wait_until(lambda: daemon.pipelines["main"].delivered >= 1)
    warned = [e for e in records(logs) if e.get("key") == "sink.guard_ttl_s"]
    assert len(warned) == 1 and "under 7 days" in warned[0]["problem"], warned
