"""The client side of one graphql-transport-ws session, sans I/O: frames in, outcomes out.

``connection_init`` → ``connection_ack`` → (``query { connection { id status } }``)* →
``subscribe`` → ``next``… → ``complete``. The session keeps the state and the ids and decides
what each received frame means; the caller moves the bytes and owns the clocks. Nothing here
raises on what the server sends: every frame becomes exactly one outcome.

Outcomes of :meth:`ClientSession.receive`:

* :class:`~consumer.core.protocol.Next`: an event of our subscription, to deliver;
* :class:`~consumer.core.protocol.DecodeError`: a frame that is no usable message, to
  dead-letter (a bounded copy);
* :class:`Reply`: send ``text`` now (the answer to a server ``ping``);
* :class:`Acknowledged`, :class:`PongReceived`;
* :class:`ConnectionStatus`: the answer to :meth:`ClientSession.query_connection`;
* :class:`QueryDone`: the server's ``complete`` after a query's answer (nothing to do);
* :class:`Ended`: the server ended our subscription (``error`` or ``complete`` for our id);
* :class:`Ignored`: a frame for another subscription id, or one that means nothing in this
  state (count it, do not act on it).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from ..errors import SessionError
from . import protocol
from .evidence import Scrub, masked, shown
from .protocol import (
    Complete,
    ConnectionAck,
    DecodeError,
    ErrorMessage,
    Next,
    Ping,
    Pong,
    SubscribeInput,
)

CONNECTION_QUERY: Final = "query { connection { id status } }"


class SessionState(enum.Enum):
    NEW = "new"
    INITIALIZING = "initializing"  # connection_init sent, connection_ack awaited
    READY = "ready"  # acknowledged, not subscribed (queries may run)
    SUBSCRIBED = "subscribed"
    COMPLETING = "completing"  # complete sent; what is in flight is still read
    ENDED = "ended"  # the server ended our subscription


@dataclass(frozen=True, slots=True)
class Reply:
    text: str


@dataclass(frozen=True, slots=True)
class Acknowledged:
    pass


@dataclass(frozen=True, slots=True)
class PongReceived:
    pass


@dataclass(frozen=True, slots=True)
class ConnectionStatus:
    """``status`` as the gateway says it ("Active", "Inactive"), or None with ``problem``."""

    status: str | None
    connection_id: str | None = None
    problem: str = ""


@dataclass(frozen=True, slots=True)
class QueryDone:
    pass


@dataclass(frozen=True, slots=True)
class Ended:
    reason: str  # bounded: the start of the frame, never the payload whole


@dataclass(frozen=True, slots=True)
class Ignored:
    kind: str  # "next", "error", "complete", "connection_ack"...
    id: str  # bounded


Outcome = (
    Next
    | DecodeError
    | Reply
    | Acknowledged
    | PongReceived
    | ConnectionStatus
    | QueryDone
    | Ended
    | Ignored
)

_PONG_REPLY: Final = Reply(protocol.PONG)
_PONG: Final = PongReceived()
_ACK: Final = Acknowledged()
_QUERY_DONE: Final = QueryDone()


class ClientSession:
    """``scrub`` (the log redactor's) masks whatever an outcome keeps of a frame's text (a
    dead letter's copy, an id, an error) before it is cut: a gateway may echo a secret."""

    def __init__(
        self,
        *,
        max_frame_bytes: int,
        new_id: Callable[[], str] | None = None,
        scrub: Scrub | None = None,
    ) -> None:
        self._limit = max_frame_bytes
        self._new_id = new_id or (lambda: str(uuid.uuid4()))
        self._scrub = scrub
        self.state = SessionState.NEW
        self.subscription_id: str | None = None
        self.completed = False  # we sent `complete` (whatever came back)
        self._queries: set[str] = set()
        self._answered: set[str] = set()  # queries answered, whose complete may follow

    # --- what to send --------------------------------------------------------------------------

    def connection_init(self, token: str, app_key: str, enterprise_id: str | None = None) -> str:
        self._expect(SessionState.NEW, "connection_init")
        self.state = SessionState.INITIALIZING
        return protocol.connection_init(token, app_key, enterprise_id)

    def subscribe(self, sub: SubscribeInput) -> str:
        """Raises :class:`~consumer.core.protocol.InvalidInput` for arguments the schema
        refuses (nothing is sent then)."""
        self._expect(SessionState.READY, "subscribe")
        sub_id = self._new_id()
        text = protocol.subscribe(sub_id, sub)
        self.subscription_id = sub_id
        self.state = SessionState.SUBSCRIBED
        return text

    def query_connection(self) -> str:
        """Oracle's ``query { connection { id status } }``: is another consumer Active?"""
        self._expect(SessionState.READY, "a query")
        query_id = self._new_id()
        self._queries.add(query_id)
        return orjson.dumps(
            {"id": query_id, "type": "subscribe", "payload": {"query": CONNECTION_QUERY}}
        ).decode()

    def complete(self) -> str | None:
        """End our subscription gracefully; None when there is none to end."""
        if self.state is not SessionState.SUBSCRIBED or self.subscription_id is None:
            return None
        self.state = SessionState.COMPLETING
        self.completed = True
        return protocol.complete(self.subscription_id)

    @staticmethod
    def ping() -> str:
        return protocol.PING

    def _expect(self, state: SessionState, what: str) -> None:
        if self.state is not state:
            raise SessionError(f"{what} in state {self.state.value}")

    # --- what was received -----------------------------------------------------------------------

    def receive(self, frame: bytes | str) -> Outcome:
        msg = protocol.decode(frame, self._limit, self._scrub)
        kind = type(msg)
        if kind is Next:
            assert isinstance(msg, Next)
            if msg.id == self.subscription_id:
                return msg
            return Ignored("next", masked(msg.id, 64, self._scrub))
        if kind is Ping:
            return _PONG_REPLY
        if kind is Pong:
            return _PONG
        if kind is ConnectionAck:
            if self.state is SessionState.INITIALIZING:
                self.state = SessionState.READY
                return _ACK
            return Ignored("connection_ack", "")
        if isinstance(msg, DecodeError):
            return self._maybe_query_answer(frame, msg)
        if isinstance(msg, ErrorMessage | Complete):
            return self._end(msg)
        raise AssertionError(f"unhandled message {kind.__name__}")  # pragma: no cover

    def _end(self, msg: ErrorMessage | Complete) -> Outcome:
        name = "error" if isinstance(msg, ErrorMessage) else "complete"
        if isinstance(msg, Complete) and msg.id in self._answered:
            self._answered.discard(msg.id)
            return _QUERY_DONE
        if msg.id in self._queries:
            self._queries.discard(msg.id)
            what = msg.text if isinstance(msg, ErrorMessage) else "complete without an answer"
            return ConnectionStatus(None, problem=what[:200])  # msg.text: masked already
        if msg.id != self.subscription_id or self.state not in (
            SessionState.SUBSCRIBED,
            SessionState.COMPLETING,
        ):
            return Ignored(name, masked(msg.id, 64, self._scrub))
        self.state = SessionState.ENDED
        return Ended(msg.text if isinstance(msg, ErrorMessage) else "complete")

    def _maybe_query_answer(self, frame: bytes | str, error: DecodeError) -> Outcome:
        """A query's answer is a ``next`` without event metadata: decode saw a malformed
        event. Give it to the query if it is one of ours."""
        if not self._queries or error.unread:  # unread: too large or too many values to parse
            return error
        try:
            msg = orjson.loads(frame)
        except ValueError:
            return error
        if not isinstance(msg, dict) or msg.get("type") != "next":
            return error
        query_id = msg.get("id")  # from the wire: a list or an object is not hashable
        if isinstance(query_id, str) and query_id in self._queries:
            payload = msg.get("payload")
            data = payload.get("data") if isinstance(payload, dict) else None
            return self._query_answer(query_id, data)
        return error

    def _query_answer(self, query_id: str, data: Any) -> ConnectionStatus:
        self._queries.discard(query_id)
        if len(self._answered) < 16:  # a server that never completes cannot grow this
            self._answered.add(query_id)
        conn = data.get("connection") if isinstance(data, dict) else None
        status = conn.get("status") if isinstance(conn, dict) else None
        ident = conn.get("id") if isinstance(conn, dict) else None
        scrub = self._scrub
        if not isinstance(status, str):
            return ConnectionStatus(
                None, problem=f"no connection status in {shown(data, scrub=scrub)}"
            )
        return ConnectionStatus(
            masked(status, 40, scrub), masked(ident, 100, scrub) if isinstance(ident, str) else None
        )
