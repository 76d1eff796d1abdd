"""The sandbox's options (:class:`SandboxOptions`: credentials, the event logs, timings, the
chaos knobs) and the counters its parts keep for the tests (:class:`SandboxStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class SandboxOptions:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    app_key: str = "sandbox-app-key"
    app_keys: tuple[str, ...] = ()  # more application keys accepted besides app_key
    client_id: str = "sandbox-client"
    client_secret: str = "sandbox-secret"
    username: str = "sandbox-user"
    password: str = "sandbox-password"
    # Set: a client_credentials token request must carry this enterpriseId header, as OCIM
    # environments require (else 400); None: the header is not checked.
    enterprise_id: str | None = None
    # What the bundled configs send as enterprise_id (any is taken while enterprise_id is
    # None): a client_credentials stream without one draws the OCIM warning of check-config,
    # preflight and the stream's start, which a newcomer's first try should not.
    demo_enterprise_id: str = "SANDBOX"
    # True: the /subscriptions upgrade must carry `Authorization: Bearer <valid token>` (else
    # HTTP 401). Whether OHIP asks for it is unconfirmed; the token in connection_init is.
    require_upgrade_authorization: bool = False
    chains: tuple[str, ...] = ("DEMO",)
    backlog: int = 1000  # events generated per chain at start
    rate: float = 0.0  # new events per second per chain
    seed: int = 1
    # Benchmarks. fast_backlog: every event made from templates (a few microseconds each, see
    # templated.py) and the backlog sent as WebSocket frames built once, in large chunks, so
    # a client reading it is the bottleneck, not the sandbox; its events have no REST
    # resources and no malformed frames (malformed_every is refused). live_timestamps: the
    # backlog ends at the start (its events evenly spaced before it) and events generated
    # after the start (the rate's, append()'s) carry the wall clock's time (UTC, to the
    # microsecond): a consumer's event-time lag is true. False: every timestamp comes from a
    # clock that starts on a day of 2024 (the same events at every start).
    fast_backlog: bool = False
    live_timestamps: bool = True
    token_ttl_s: float = 3600.0
    ping_interval_s: float = 15.0  # server pings; 0 disables
    init_timeout_s: float = 10.0  # connection_init deadline (4408)
    stale_hold_s: float = 0.0  # 4409 for this long after a subscriber drops without complete
    # > 0: 4409 for a subscribe this soon after the chain's previous subscription was
    # completed and closed (OHIP's gap, 0.5 to 10 s: unconfirmed).
    resubscribe_gap_s: float = 0.0
    # > 0: a session that has not subscribed this long after its connection_init is closed
    # with 4408 (OHIP: "within 10 seconds"; its close code is unknown, this is graphql-ws's).
    subscribe_deadline_s: float = 0.0
    complete_close_delay_s: float = 0.0  # after a client's complete, wait before closing
    defer_pongs: bool = False  # as OHIP in burst mode: no pong until the backlog is sent
    # Set: every answer to `query { connection { id status } }` says this (an unexpected one,
    # "", or "Active" for ever); None: Active iff a session of the same key is subscribed.
    connection_status: str | None = None
    # The query counted and never answered (reference 2.7: how a query travels is unconfirmed).
    connection_query_silent: bool = False
    # As graphql-ws servers (whether OHIP does is unconfirmed): an `error` for the operation
    # before a close refusing a subscribe, and `complete` in answer to a client's complete.
    end_frames: bool = False
    # > 0: a session from which no frame at all arrived for this long is dropped (TCP aborted,
    # no close handshake; its subscription released as a drop, so stale_hold_s applies).
    client_timeout_s: float = 0.0
    # Chaos (deterministic for a given chaos_seed); 0 / False disables each.
    chaos_seed: int = 0
    drop_every: int = 0  # drop the TCP connection (no close frame) after about N events
    close_every: int = 0  # close with one of close_codes after about N events
    close_codes: tuple[int, ...] = (1001, 1000, 4500, 4504)
    malformed_every: int = 0  # a malformed frame in the log after every N events
    oversized_bytes: int = 0  # > 0: every 6th malformed frame is a `next` frame this large
    redeliver: int = 0  # a resume from an offset starts this many entries earlier
    # > 0: only the newest this many log entries are retained (OHIP keeps 7 days): a resume
    # from an older offset, or from the gateway's position, starts at the oldest one retained,
    # without an error, as OHIP's does.
    retention_events: int = 0
    ignore_pings: bool = False
    ack_delay_s: float = 0.0
    send_batch: int = 256
    rest_rate: float = 0.0  # REST requests per second, all routes together; 0: unlimited
    rest_burst: int = 5  # token-bucket size for rest_rate

    def accepts_app_key(self, key: object) -> bool:
        """Whether ``key`` is the raw ``app_key`` or one of ``app_keys``."""
        return isinstance(key, str) and (key == self.app_key or key in self.app_keys)

    @property
    def all_app_keys(self) -> tuple[str, ...]:
        """``app_key`` first, then ``app_keys``."""
        return (self.app_key, *self.app_keys)


@dataclass
class SandboxStats:
    token_requests: int = 0
    inits: int = 0  # connection_init messages received (credentials presented)
    # Per connection_init: the enterpriseId of its payload (None: not there).
    init_enterprise_ids: list[object] = field(default_factory=list)
    connections: int = 0
    events_sent: int = 0
    pings_received: int = 0
    # Per session that pinged: seconds from its connection_init to its first ping.
    first_ping_after_init_s: list[float] = field(default_factory=list)
    pongs_received: int = 0
    pongs_sent: int = 0
    max_deferred_pongs: int = 0
    completes_received: int = 0
    completes_at: list[float] = field(default_factory=list)  # monotonic times of those
    subscribes: list[dict[str, Any]] = field(default_factory=list)  # parsed inputs, in order
    subscription_ids: list[str] = field(default_factory=list)  # of those subscribes, in order
    query_ids: list[str] = field(default_factory=list)  # of the connection queries, in order
    # The log index each subscribe without an offset (nor highest) started at: the gateway's
    # own position, where the chain's last stream stopped sending.
    position_starts: list[int] = field(default_factory=list)
    close_codes_sent: list[int] = field(default_factory=list)
    # Why 4409s were sent: another live session holds the chain's subscription; the hold after
    # a subscriber dropped without complete (stale_hold_s); a second subscribe on a session.
    subscriber_conflicts: int = 0
    stale_refusals: int = 0
    gap_refusals: int = 0  # a subscribe within resubscribe_gap_s of a completed one's close
    subscribe_timeouts: int = 0  # no subscribe within subscribe_deadline_s of connection_init
    duplicate_subscribe_ids: int = 0
    client_timeouts: int = 0  # sessions dropped after client_timeout_s without a frame
    chaos_drops: int = 0
    upgrades: list[float] = field(default_factory=list)  # monotonic times of upgrade requests
    # Per upgrade request (with a key accepted): its bearer token, "" without one.
    upgrade_tokens: list[str] = field(default_factory=list)
    active_subscriptions: dict[str, int] = field(default_factory=dict)
    rest_requests: int = 0  # every REST GET, throttled and failed ones included
    rest_throttled: int = 0  # 429s of the rate limit (not injected ones)
    rest_paths: dict[str, int] = field(default_factory=dict)  # 200 responses per request path
