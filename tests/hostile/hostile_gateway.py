"""Issue #9: a hostile OHIP gateway that streams a scripted mix of events and bad frames.

Enough graphql-transport-ws for the daemon: ``connection_init`` (any payload) gets
``connection_ack``, ``ping`` gets ``pong``, ``subscribe`` starts the script, the client's
``complete`` gets a close with 1000. Bound to 127.0.0.1 on a free port; it ignores the URL's
``key`` (tokens come from the sandbox, see the tests).

Replay as OHIP does it: a ``subscribe`` with ``offset: "<digits>"`` resumes inclusively at the
first script position of a usable event with that offset; without one, from the start;
``offsetType: "highest"`` at the last usable event. Frames that end a session (an ``error`` or
``complete`` for the client's current subscription id) are not part of the replayable log:
each is sent once over the whole run, after which the gateway sends nothing more on that
connection and waits for the client to close it. Everything else is replayed on every
resubscribe. After the script the connection stays open and pings are still answered.

Every session records what it sent (script position and the sha256 of the exact bytes of each
frame that is not an event) and how it ended, which is the ground truth the tests check the DLQ,
the sink and the metrics against.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from hostile_frames import ENDER, EVENT, Frame
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

_OFFSET_ARG = re.compile(r'\boffset\s*:\s*("(?:[^"\\]|\\.)*")')
_HIGHEST_ARG = re.compile(r'\boffsetType\s*:\s*"highest"')


@dataclass(frozen=True)
class Sent:
    pos: int  # script position
    sub_id: str  # the subscription id it was rendered with
    size: int  # bytes


@dataclass
class Session:
    number: int
    sub_id: str | None = None
    offset_arg: str | None = None
    highest: bool = False
    start: int | None = None  # script position the subscription started at
    # (position, sha256 of the bytes sent or None for an event, their length)
    sent: list[tuple[int, str | None, int]] = field(default_factory=list)
    ender: int | None = None  # position of the ender sent in this session
    finished: bool = False  # the whole script was sent
    client_complete: bool = False  # the client sent `complete` (graceful shutdown)
    closed: bool = False
    close_code: int | None = None  # the client's close code, when it closed first

    @property
    def certain(self) -> bool:
        """Did the client read everything this session sent? It did when the session ended on
        our ender (the client reads in order up to it) or ran to the end of the script."""
        return self.ender is not None or self.finished

    @property
    def unexpected_end(self) -> bool:
        """Closed by the client without our ender and without its own ``complete``."""
        return self.closed and self.ender is None and not self.client_complete


class HostileGateway:
    def __init__(
        self, script: Sequence[Frame], *, ender_grace_s: float = 20.0, pong: bool = True
    ) -> None:
        self.script = list(script)
        self.sessions: list[Session] = []
        self.anomalies: list[str] = []  # what the client did that the contract rules out
        self.enders_sent: set[int] = set()
        self.pings = 0
        self._ender_grace_s = ender_grace_s
        self._pong = pong
        self._resume: dict[str, int] = {}
        for pos, f in enumerate(self.script):
            if f.usable and f.offset is not None:
                self._resume.setdefault(f.offset, pos)
        self._last_usable = max((p for p, f in enumerate(self.script) if f.usable), default=0)
        self._server: Server | None = None

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self) -> HostileGateway:
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            subprotocols=[Subprotocol("graphql-transport-ws")],
            compression=None,
            ping_interval=None,  # graphql-ws pings only, as OHIP
            max_size=2**20,
            close_timeout=2,
        )
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()
            self._server = None

    @property
    def url(self) -> str:
        """The gateway URL for the daemon's config (it appends /subscriptions?key=...)."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    # --- what the tests read ------------------------------------------------------------------

    @property
    def current(self) -> Session | None:
        return self.sessions[-1] if self.sessions else None

    @property
    def script_done(self) -> bool:
        """The newest session has sent the whole script (and is still open)."""
        s = self.current
        return s is not None and s.finished and not s.closed

    def sent_frames(self, *, certain_only: bool, expect: str | None = None) -> dict[str, Sent]:
        """sha256 -> what was sent, for the non-event frames sent by every session (or only by
        those whose frames the client certainly read)."""
        out: dict[str, Sent] = {}
        for s in self.sessions:
            if certain_only and not s.certain:
                continue
            for pos, sha, size in s.sent:
                if sha is not None and (expect is None or self.script[pos].expect == expect):
                    out[sha] = Sent(pos, s.sub_id or "", size)
        return out

    def sent_count(self, expect: str, *, certain_only: bool) -> int:
        return sum(
            1
            for s in self.sessions
            if s.certain or not certain_only
            for pos, _, _ in s.sent
            if self.script[pos].expect == expect
        )

    def sent_bytes(self, *, exclude: str = EVENT) -> int:
        return sum(
            size for s in self.sessions for pos, _, size in s.sent
            if self.script[pos].expect != exclude
        )  # fmt: skip

    def render(self, sent: Sent) -> bytes:
        return self.script[sent.pos].render(sent.sub_id)

    def runaway(self, limit: int) -> bool:
        """More sessions ended unexpectedly than a healthy run could explain."""
        return sum(s.unexpected_end for s in self.sessions) >= limit

    # --- the connection -----------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        session = Session(len(self.sessions) + 1)
        self.sessions.append(session)
        streamer: asyncio.Task[None] | None = None
        try:
            async for message in ws:
                try:
                    msg = json.loads(message)
                except ValueError:
                    self.anomalies.append(f"session {session.number}: client sent non-JSON")
                    continue
                kind = msg.get("type") if isinstance(msg, dict) else None
                if kind == "connection_init":
                    await ws.send('{"type":"connection_ack","payload":{}}')
                elif kind == "ping":
                    self.pings += 1
                    if self._pong:
                        await ws.send('{"type":"pong"}')
                elif kind == "subscribe":
                    if streamer is not None:
                        self.anomalies.append(f"session {session.number}: a second subscribe")
                        continue
                    streamer = asyncio.create_task(self._subscribe(ws, session, msg))
                elif kind == "complete":
                    session.client_complete = True
                    await ws.close(1000, "Normal Closure")
                    break
        except ConnectionClosed:
            pass
        finally:
            session.closed = True
            rcvd = ws.protocol.close_rcvd
            if rcvd is not None:
                session.close_code = rcvd.code
            if streamer is not None:
                streamer.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await streamer

    async def _subscribe(
        self, ws: ServerConnection, session: Session, msg: dict[str, object]
    ) -> None:
        session.sub_id = str(msg.get("id"))
        payload = msg.get("payload")
        query = str(payload.get("query", "")) if isinstance(payload, dict) else ""
        m = _OFFSET_ARG.search(query)
        session.offset_arg = json.loads(m.group(1)) if m else None
        session.highest = _HIGHEST_ARG.search(query) is not None
        if session.highest:
            start = self._last_usable
        elif session.offset_arg is not None:
            found = self._resume.get(session.offset_arg)
            if found is None:
                self.anomalies.append(
                    f"session {session.number}: resume offset {session.offset_arg[:40]!r} is "
                    "not the offset of any usable event sent"
                )
            start = found or 0
        else:
            start = 0
        session.start = start
        await self._stream(ws, session, start)

    async def _stream(self, ws: ServerConnection, session: Session, start: int) -> None:
        assert session.sub_id is not None
        for pos in range(start, len(self.script)):
            frame = self.script[pos]
            if frame.expect == ENDER and pos in self.enders_sent:
                continue  # not part of the replayable log
            data = frame.render(session.sub_id)
            await ws.send(
                data if frame.pieces == 1 else frame.fragments(data), text=not frame.binary
            )
            sha = None if frame.expect == EVENT else hashlib.sha256(data).hexdigest()
            session.sent.append((pos, sha, len(data)))
            if frame.expect == ENDER:
                self.enders_sent.add(pos)
                session.ender = pos
                # The session is over: nothing more on this connection. A client that does not
                # close it has ignored the ender; say so and carry on with the script.
                try:
                    async with asyncio.timeout(self._ender_grace_s):
                        await ws.wait_closed()
                    return
                except TimeoutError:
                    self.anomalies.append(
                        f"session {session.number}: {frame.label} (the current subscription "
                        f"ended) did not end the session within {self._ender_grace_s} s"
                    )
                    session.ender = None
        session.finished = True
