"""A real HTTP/1.1 receiver on loopback for webhook-style tests.

A :class:`Receiver` is a standard-library ``ThreadingHTTPServer`` (keep-alive: HTTP/1.1) in a
background thread on ``127.0.0.1`` and a free port. It records every request (method, path,
headers, body) and counts the TCP connections it accepted, so a test can prove connection
reuse. Replies are scriptable: queue some with :meth:`Receiver.script` (used first, in order),
and/or set a :attr:`Receiver.responder` that picks the reply from the request; the default is
``200`` with an empty body.

    with Receiver() as rx:
        rx.script(Reply(503, {"Retry-After": "2"}))
        ...  # POST to rx.url
        assert rx.connections == 1
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay_s: float = 0.0  # wait this long before answering (cut short when the receiver stops)


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    connection: int  # which accepted TCP connection (1-based) carried it
    received_at: float = 0.0  # time.monotonic() when its body was read

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        return json.loads(self.body)


Responder = Callable[[Received], Reply]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() ends the handler threads itself
    receiver: Receiver

    def process_request(self, request: Any, client_address: Any) -> None:
        self.receiver._accepted(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.receiver._closed(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up (e.g. after its timeout) is not an error here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: _Server
    timeout = 30  # an idle keep-alive connection is dropped after this

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        rx = self.server.receiver
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = Received(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            connection=rx._connection_of(self.connection),
            received_at=time.monotonic(),
        )
        reply = rx._record(request)
        if reply.delay_s and rx._stopping.wait(reply.delay_s):
            return  # stopping: no answer
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Receiver:
    def __init__(self, responder: Responder | None = None) -> None:
        self.responder = responder
        self._lock = threading.Lock()
        self._exchanges: list[tuple[Received, Reply]] = []
        self._script: deque[Reply] = deque()
        self._sockets: dict[socket.socket, int] = {}
        self._connections = 0
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> Receiver:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.receiver = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:  # wake handler threads blocked on a keep-alive connection
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what the tests use -------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "receiver not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    @property
    def requests(self) -> list[Received]:
        """Every request so far, in arrival order."""
        with self._lock:
            return [request for request, _ in self._exchanges]

    @property
    def exchanges(self) -> list[tuple[Received, Reply]]:
        """Every request so far with the reply it was given."""
        with self._lock:
            return list(self._exchanges)

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        with self._lock:
            return self._connections

    def script(self, *replies: Reply) -> None:
        """The next requests get these replies, in order (before the responder is asked)."""
        with self._lock:
            self._script.extend(replies)

    def clear(self) -> None:
        with self._lock:
            self._exchanges.clear()

    # --- called from the server's threads -----------------------------------------------------

    def _accepted(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections += 1
            self._sockets[sock] = self._connections

    def _closed(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.pop(sock, None)

    def _connection_of(self, sock: socket.socket) -> int:
        with self._lock:
            return self._sockets.get(sock, 0)

    def _record(self, request: Received) -> Reply:
        with self._lock:
            reply = self._script.popleft() if self._script else None
            responder = self.responder
        if reply is None:
            reply = responder(request) if responder is not None else Reply()
        with self._lock:
            self._exchanges.append((request, reply))
        return reply


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port where a connection is refused: bound, never listening, held meanwhile
    (so that nothing else can take it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()
