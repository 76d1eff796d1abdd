"""What may be said about a PostgreSQL DSN (``host:port/database``), and what must never be
(the DSN itself, its password in any form): shared by the PostgreSQL sink and state store."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote

DEFAULT_PORT = 5432
_MAX_MESSAGE = 300  # of a server's error text in our messages (it may quote event data)


class Target:
    """What may be said about a DSN (``host:port/database``), and what must never be."""

    def __init__(self, dsn: str) -> None:
        self.secrets = {dsn}
        rest = dsn.partition("://")[2]
        # The last '@' ends the user info even if a password holds '/', '?' or '#'.
        userinfo, at, hostpart = rest.rpartition("@")
        if not at:
            hostpart = rest
        password = userinfo.partition(":")[2]
        hostpart, _, query = hostpart.partition("?")
        netloc, _, database = hostpart.partition("/")
        params = dict(parse_qsl(query, keep_blank_values=True))
        for pw in (password, params.get("password", "")):
            if pw:
                self.secrets |= {pw, unquote(pw)}
        server = netloc or params.get("host", "") or "localhost"
        if "," not in server and not server.startswith("/"):  # one host, not a socket dir
            if not server.rpartition("]")[2].partition(":")[1]:  # no port written
                server += f":{params.get('port') or DEFAULT_PORT}"
        elif params.get("port"):
            server += f":{params['port']}"
        self.where = f"{server}/{unquote(database) or '?'}"

    def scrub(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            if len(secret) >= 3:
                text = text.replace(secret, "***")
        return text

    def describe(self, exc: BaseException) -> str:
        text = str(exc).strip() or type(exc).__name__
        if len(text) > _MAX_MESSAGE:
            text = text[:_MAX_MESSAGE] + "…"
        return self.scrub(f"{text} ({type(exc).__name__})")
