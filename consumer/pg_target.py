"""What may be said about a PostgreSQL DSN (``host:port/database``), and what must never be
(the DSN itself, its password in any form): shared by the PostgreSQL sink and state store.

A password holding a raw ``#``, ``/``, ``?`` or ``@`` is read one way here (the user information
ends at the last ``@``) and another by asyncpg (as urllib, it ends the authority at the first
``/``, ``?`` or ``#``, and the user information at the first ``@``): a piece of the password
becomes its port, host, database or query, and its error text (``invalid literal for int()
with base 10: '<piece>'``) quotes it. So such a DSN never reaches the driver
(:meth:`Target.dsn`), and a driver's parse error is never shown (:meth:`Target.unparsable`).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, unquote

DEFAULT_PORT = 5432
_MAX_MESSAGE = 300  # of a server's error text in our messages (it may quote event data)
_SCHEMES = ("postgresql", "postgres")
UNKNOWN_SERVER = "(server not shown: the DSN does not parse)"
# Startup settings of every pool that writes what we count as done (the state store's, the
# sink's): an acknowledged commit is on the server's disk. A database or role set to
# synchronous_commit = off acknowledges before its WAL is flushed, and a crash of the server
# loses rows whose ids are recorded as processed. "on" never weakens a stricter setting's
# durability (remote_apply also waits for a synchronous standby's flush, as "on" does).
DURABLE_COMMITS = {"synchronous_commit": "on"}
# What :meth:`Target.unparsable` says, in two parts (the settings name the key themselves).
UNPARSABLE = (
    "it cannot be parsed as postgresql://user:password@host:port/database (the driver's "
    "message is not shown: it may quote the password)"
)
UNPARSABLE_FIX = (
    "percent-encode any # / ? @ : in the user name and password (%23 %2F %3F %40 %3A), and "
    "check the port and query parameters"
)


class UnparsableDsn(ValueError):
    """A DSN the driver would misread: refused before it gets it (as the driver's ValueError)."""


class Target:
    """What may be said about a DSN (``host:port/database``), and what must never be."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self.secrets = {dsn}
        scheme, sep, rest = dsn.partition("://")
        # The last '@' ends the user info even if a password holds '/', '?' or '#'.
        userinfo, at, hostpart = rest.rpartition("@")
        if not at:
            hostpart = rest
        # Where the driver ends the authority: it must hold every '@' there is (at most one).
        authority = re.split("[/?#]", rest, maxsplit=1)[0]
        self.parsable = (
            bool(sep)
            and scheme.lower() in _SCHEMES
            and rest.count("@") == authority.count("@") <= 1
        )
        password = userinfo.partition(":")[2]
        hostpart, _, query = hostpart.partition("?")
        hostpart = hostpart.partition("#")[0]
        netloc, _, database = hostpart.partition("/")
        params = dict(parse_qsl(query, keep_blank_values=True))
        # The query as the driver reads it (from the first '?') may hold an '@' of a password.
        drivers = dict(parse_qsl(rest.partition("?")[2], keep_blank_values=True))
        for pw in (password, params.get("password", ""), drivers.get("password", "")):
            if pw:
                self.secrets |= {pw, unquote(pw)}
        server = netloc or params.get("host", "") or "localhost"
        if "," not in server and not server.startswith("/"):  # one host, not a socket dir
            if not server.rpartition("]")[2].partition(":")[1]:  # no port written
                server += f":{params.get('port') or DEFAULT_PORT}"
        elif params.get("port"):
            server += f":{params['port']}"
        self.where = f"{server}/{unquote(database) or '?'}"
        # What follows the last '@' is never the user information's, but it may be the tail of
        # a query's password (``?password=a@b``): unknown when a query may come before it.
        if not self.parsable and "=" in userinfo:
            self.where = UNKNOWN_SERVER

    def dsn(self) -> str:
        """The DSN, for the driver: :class:`UnparsableDsn` if the driver would misread it."""
        if not self.parsable:
            raise UnparsableDsn("unparsable DSN")
        return self._dsn

    @staticmethod
    def unparsable(key: str) -> str:
        """What to say of a DSN the driver cannot parse (never the driver's own words: they
        may quote a piece of the password)."""
        return f"invalid {key}: {UNPARSABLE}: {UNPARSABLE_FIX}"

    def scrub(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            if len(secret) >= 3:
                text = text.replace(secret, "***")
        return text

    def describe(self, exc: BaseException) -> str:
        # Masked before the cut: a secret cut in two would escape the mask.
        text = self.scrub(str(exc).strip()[: _MAX_MESSAGE * 8]) or type(exc).__name__
        if len(text) > _MAX_MESSAGE:
            text = text[:_MAX_MESSAGE] + "…"
        return f"{text} ({type(exc).__name__})"
