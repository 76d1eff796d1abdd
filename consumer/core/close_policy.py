"""What to do after a connection ends: the OHIP close-code table as a pure decision.

Section 7.3 of the reference: transient codes reconnect with jittered, capped exponential
backoff (1006 waits at least 4 s); 4401 asks for a new token and stops the stream when it keeps
happening; 4409 waits out the single-consumer lockout; 4400, 4403 and HTTP 400 on the upgrade
need a human, so the stream stops with a message saying what to check. The codes whose OHIP
meaning is unconfirmed (4403 among them) take another action where ``close_actions`` says so.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal


class Action(enum.Enum):
    RECONNECT = "reconnect"
    REFRESH_TOKEN = "refresh_token"  # drop the cached token, then reconnect
    STOP = "stop"  # permanent for this stream


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay_s: float
    reason: str
    code: str = ""  # "4409", "1006", "http_429", "network"...: a metric label
    deliberate: bool = False  # a wait the protocol asks for (lockout, rate limit), not a fault


CloseAction = Literal["stop", "reconnect"]
# Oracle's readable pages do not say what these mean for OHIP (reference 7.2): graphql-ws's
# meanings are a guess. 4400 (an invalid subscription), 4401 (credentials) and 4409 (the single
# consumer) are Oracle's own.
OVERRIDABLE: Final = frozenset({4403, 4406, 4408, 4429, 4500, 4504})


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    abnormal_min_s: float = 4.0  # Oracle: wait 4 s after 1006
    lockout_s: float = 120.0  # 4409: length unconfirmed, so configurable
    lockout_jitter_s: float = 30.0
    # Consecutive 4409s double the wait up to this: whether an attempt during the lockout
    # extends it is unconfirmed, and a fixed wait shorter than the real one never gets out.
    lockout_max_s: float = 480.0
    rate_limited_s: float = 120.0  # HTTP 429 on the upgrade: "retry after 2 minutes"
    max_auth_failures: int = 3
    healthy_after_s: float = 60.0  # a session this long resets the backoff
    # Close codes whose OHIP meaning is unconfirmed (OVERRIDABLE): what to do instead of the
    # table's default ("stop": the stream stops; "reconnect": with backoff).
    close_actions: Mapping[int, CloseAction] = field(default_factory=dict)

    def __post_init__(self) -> None:
        fixed = sorted(set(self.close_actions) - OVERRIDABLE)
        if fixed:
            raise ValueError(f"close_actions: the action of {fixed} is not overridable")


_CHECK_KEY = (
    "check app_key (the URL carries its SHA-256), gateway_url against the Developer Portal "
    "environment card, that the application is subscribed and approved for this chain and the "
    "environment is Streaming Enabled"
)

_STOP_CODES = {
    4400: "subscription rejected (4400): check chain_code, offset and hotel_codes against the "
    "schema",
    4403: "forbidden (4403): check that the application's subscription is approved for this "
    "chain and these hotels",
    4406: "subprotocol not accepted (4406): the gateway did not agree to graphql-transport-ws; "
    "check gateway_url",
}

# Close codes and upgrade statuses a metric label names as they are; any other the server
# (hostile or not) may send is "other" / "http_4xx": the label's values stay a fixed set.
_LABELLED_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011, 1012, 1013, 1014}
    | {4400, 4401, 4403, 4406, 4408, 4409, 4429, 4499, 4500, 4504}
)
_LABELLED_STATUSES = frozenset({400, 401, 403, 404, 408, 429, 500, 502, 503, 504})


def _at_least(delay: float, retry_after_s: float | None) -> tuple[float, str]:
    """``delay``, or the far end's ``Retry-After`` if that is longer, and what to say of it."""
    if retry_after_s is None or retry_after_s <= delay:
        return delay, ""
    return retry_after_s, f"; waiting the {retry_after_s:g} s its Retry-After asks"


def _code_label(code: int) -> str:
    return str(code) if code in _LABELLED_CODES else "other"


def _status_label(status: int) -> str:
    if status in _LABELLED_STATUSES:
        return f"http_{status}"
    return f"http_{status // 100}xx" if 100 <= status <= 599 else "http_other"


NORMAL_CLOSURE = 1000
MESSAGE_TOO_BIG = 1009
# Frames up to max_frame_bytes are processed; up to this many times larger they are read and
# dead-lettered; anything larger closes the connection (1009).
OVERSIZED_FACTOR = 4
ABNORMAL_CLOSURE = 1006
UNAUTHORIZED = 4401
SUBSCRIBER_EXISTS = 4409


class ClosePolicy:
    """Per-stream state: consecutive failures drive the backoff and the 4401 limit."""

    def __init__(self, config: PolicyConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()
        self.failures = 0
        self.auth_failures = 0
        self.lockouts = 0  # consecutive 4409s

    def session_ended(self, duration_s: float, delivered: int = 0) -> None:
        """Call when a subscribed session ends. One that delivered events made progress, and
        a long quiet one was healthy: either resets the backoff (a catch-up over a flaky link
        must not wait longer after every productive session). The floors that the protocol
        asks for (1006, 4409, 429) still apply to the next decision."""
        if delivered > 0 or duration_s >= self.config.healthy_after_s:
            self.failures = 0
            self.auth_failures = 0
            self.lockouts = 0

    def acknowledged(self) -> None:
        """Call on connection_ack: the gateway accepted the token and the key, so the 4401s
        (and HTTP 401s) before it were not "in a row" with those after it (4401, a session
        acknowledged and closed with 1001, 4401 ... stopped the stream as a key to check). The
        backoff stays: a connection acknowledged and dropped at once is no healthy session."""
        self.auth_failures = 0

    def _backoff(self, floor: float = 0.0) -> float:
        c = self.config
        ceiling = min(c.backoff_max_s, c.backoff_initial_s * 2.0 ** min(self.failures, 30))
        self.failures += 1
        # "Equal jitter": never zero, never synchronised with other consumers.
        return max(floor, ceiling / 2 + self._rng.uniform(0, ceiling / 2))

    def on_close(self, code: int | None, reason: str = "") -> Decision:
        """The server closed the WebSocket (``code`` None: no close frame, i.e. 1006)."""
        code = ABNORMAL_CLOSURE if code is None else code
        said = f": {reason}" if reason else ""
        label = _code_label(code)
        override = self.config.close_actions.get(code)
        if override is not None:
            meaning = _STOP_CODES.get(code, f"closed by server ({code})") + said
            if override == "stop":
                return Decision(Action.STOP, 0.0, f"{meaning} (stopped: close_actions)", label)
            return Decision(
                Action.RECONNECT, self._backoff(), f"{meaning} (reconnecting: close_actions)", label
            )
        if code in _STOP_CODES:
            return Decision(Action.STOP, 0.0, _STOP_CODES[code] + said, label)
        if code == UNAUTHORIZED:
            return self._auth_failed(f"credentials rejected (4401){said}", label)
        if code == SUBSCRIBER_EXISTS:
            self.failures += 1
            c = self.config
            wait = min(c.lockout_max_s, c.lockout_s * 2.0 ** min(self.lockouts, 30))
            self.lockouts += 1
            again = f", {self.lockouts} in a row" if self.lockouts > 1 else ""
            return Decision(
                Action.RECONNECT,
                max(wait, c.lockout_s) + self._rng.uniform(0, c.lockout_jitter_s),
                f"another consumer holds this stream or it was not completed (4409){said}; "
                f"waiting out the lockout{again}",
                label,
                deliberate=True,
            )
        if code == ABNORMAL_CLOSURE:
            delay = self._backoff(self.config.abnormal_min_s)
            return Decision(
                Action.RECONNECT,
                delay,
                f"connection lost without a close frame (1006){said}",
                label,
            )
        return Decision(
            Action.RECONNECT, self._backoff(), f"closed by server ({code}){said}", label
        )

    def on_closed_by_us(self, code: int, max_frame_bytes: int, reason: str = "") -> Decision | None:
        """We closed the connection ourselves: the client did, on our limits (1009) or on what
        breaks the WebSocket protocol (1002, 1007, 1011; ``reason``: its words). None for our
        normal closure: the close that follows it decides."""
        if code == MESSAGE_TOO_BIG:
            # The frame comes back on every replay until it is raised or OHIP's retention
            # drops it: keep trying at the slowest pace, never stop the stream for good.
            self.failures += 1
            c = self.config
            return Decision(
                Action.RECONNECT,
                c.backoff_max_s + self._rng.uniform(0, c.backoff_initial_s),
                f"a frame larger than {max_frame_bytes * OVERSIZED_FACTOR} bytes arrived (1009) "
                f"and is replayed at every resume: raise max_frame_bytes (now {max_frame_bytes}) "
                "and restart",
                "1009",
            )
        if code == NORMAL_CLOSURE:
            return None
        # The gateway, or a proxy between, wrote frames no WebSocket client takes: timed as a
        # lost connection (the gateway saw ours end without a complete), said as what it is.
        said = f": {reason}" if reason else ""
        return Decision(
            Action.RECONNECT,
            self._backoff(self.config.abnormal_min_s),
            f"the gateway's frames broke the WebSocket protocol ({code}{said}); closed by us",
            _code_label(code),
        )

    def on_handshake_status(self, status: int, retry_after_s: float | None = None) -> Decision:
        """The HTTP upgrade was refused with ``status``. ``retry_after_s``: its ``Retry-After``,
        parsed and clamped (core/retry_after); a 429 or 5xx waits at least that long."""
        label = _status_label(status)
        if status == 400:
            reason = f"upgrade refused: incorrect key or URL (HTTP 400); {_CHECK_KEY}"
            return Decision(Action.STOP, 0.0, reason, label)
        if status == 401:
            return self._auth_failed("upgrade refused (HTTP 401)", label)
        if status == 403:
            return Decision(Action.STOP, 0.0, f"upgrade forbidden (HTTP 403); {_CHECK_KEY}", label)
        if status == 429:
            self.failures += 1
            delay = self.config.rate_limited_s + self._rng.uniform(0, self.config.backoff_initial_s)
            delay, asked = _at_least(delay, retry_after_s)
            reason = f"too many upgrade requests (HTTP 429){asked}"
            return Decision(Action.RECONNECT, delay, reason, label, deliberate=True)
        delay, asked = self._backoff(), ""
        if status >= 500:
            delay, asked = _at_least(delay, retry_after_s)
        return Decision(Action.RECONNECT, delay, f"upgrade refused (HTTP {status}){asked}", label)

    def on_redirect(self, status: int, host: str, *, same_origin: bool) -> Decision:
        """The upgrade was answered with a redirect to ``host`` (printable, bounded: never
        the path, which may carry the key's hash). Never followed: OHIP's gateway does not
        redirect an upgrade, every hop would be another upgrade request against the key's
        budget (a loop: ten within one attempt), and the credentials go in connection_init,
        wherever the redirect leads. Another origin stops the stream (gateway_url is to be
        checked); the same origin (a loop, a proxy's maintenance) is a refused upgrade."""
        label = _status_label(status)
        if not same_origin:
            return Decision(
                Action.STOP,
                0.0,
                f"the gateway redirected to another origin ({host}) with HTTP {status}; not "
                "followed: the token and the application key are not sent there. If it is the "
                "gateway now, set gateway_url to it",
                label,
            )
        reason = (
            f"upgrade redirected to {host} (HTTP {status}); not followed (OHIP's gateway does "
            "not redirect an upgrade)"
        )
        return Decision(Action.RECONNECT, self._backoff(), reason, label)

    def on_network_error(self, what: str) -> Decision:
        return Decision(Action.RECONNECT, self._backoff(), what, "network")

    def _auth_failed(self, reason: str, label: str) -> Decision:
        self.auth_failures += 1
        if self.auth_failures >= self.config.max_auth_failures:
            return Decision(
                Action.STOP,
                0.0,
                f"{reason}, {self.auth_failures} times in a row: check app_key (raw key, not its "
                f"hash), client_id/client_secret and the grant's user or scope",
                label,
            )
        return Decision(Action.REFRESH_TOKEN, self._backoff(), reason, label)
