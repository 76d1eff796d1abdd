"""What may be said about a PostgreSQL DSN (``host:port/database``), and what must never be
(the DSN itself, its password in any form): shared by the PostgreSQL sink and state store.

A password holding a raw ``#``, ``/``, ``?`` or ``@`` is read one way here (the user information
ends at the last ``@``) and another by asyncpg (as urllib, it ends the authority at the first
``/``, ``?`` or ``#``, and the user information at the first ``@``): a piece of the password
becomes its port, host, database or query, and its error text (``invalid literal for int()
with base 10: '<piece>'``) quotes it. So such a DSN never reaches the driver
(:meth:`Target.dsn`), and a driver's parse error is never shown (:meth:`Target.unparsable`).

TLS (:meth:`Target.tls`): a DSN without ``sslmode`` would get asyncpg's default, ``prefer``:
TLS without checking the certificate, and plain text after a server answers that it has none,
so the password went to whoever answered. For a server that is not on this machine the
default is therefore verify-full: the system's CAs (or the DSN's ``sslrootcert``), the host
name checked, no plain text. An ``sslmode`` in the DSN (or ``PGSSLMODE``) is the operator's
choice, and loopback (127.0.0.0/8, ::1, ``localhost``) and Unix sockets keep the driver's
default. A server that cannot prove itself is a configuration error naming the key and the
fix (:meth:`Target.tls_refusal`), as is a certificate file the driver cannot load
(:meth:`Target.certificate_problem`: which file, where its path came from, why): the driver's
own error for a missing CA is its ClientConfigurationError, the class of its parse errors,
whose text is never shown.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qsl, unquote, unquote_plus

from .core.evidence import masked

DEFAULT_PORT = 5432
_MAX_MESSAGE = 300  # of a server's error text in our messages (it may quote event data)
SCHEMES = ("postgresql", "postgres")
# libpq's connection parameters that hold a secret (those it shows as "*" in
# PQconninfoOptions; asyncpg reads password and sslpassword, and sends any other unknown one
# as a server setting): in a DSN's query only these are secrets. The others are the driver's
# and the server's settings (sslmode=require, target_session_attrs=any, application_name):
# no value of theirs is refused for its length or masked in the logs.
SECRET_PARAMETERS = frozenset(("password", "sslpassword", "oauth_client_secret"))
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


# libpq's sslmode values in order: the driver loads a client certificate from "allow" on, and
# the CA (and CRL) files from "require" on; it fails without a CA from "verify-ca" on.
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_LOAD_CLIENT, _LOAD_CA, _NEED_CA = 1, 3, 4
# What the driver raises for a certificate file it cannot load (and, for a missing CA at
# verify-ca or verify-full, its ClientConfigurationError: see _driver_configuration).
_FILE_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ssl.SSLError,
)


def _driver_configuration(exc: BaseException) -> bool:
    """Whether ``exc`` is asyncpg's ClientConfigurationError (asyncpg is an extra: not
    imported here). Not any ValueError: a DataError of a query is one too."""
    return any(
        c.__name__ == "ClientConfigurationError" and c.__module__.startswith("asyncpg")
        for c in type(exc).__mro__
    )


def _dot_postgresql(name: str) -> str | None:
    """Where the driver looks for ``~/.postgresql/<name>`` (None: no home directory)."""
    try:
        return str((Path.home() / ".postgresql" / name).resolve())
    except (RuntimeError, KeyError, OSError):
        return None


def _unloadable(path: str, ca: bool) -> str | None:
    """Why the driver cannot load this file (``ca``: as a CA or CRL, PEM), or None."""
    try:
        if ca:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
        else:
            with open(path, "rb"):
                pass
    except FileNotFoundError:
        return "it does not exist"
    except PermissionError:
        return f"this user (uid {os.geteuid()}) may not read it"
    except IsADirectoryError:
        return "it is a directory"
    except NotADirectoryError:
        return "a part of its path is not a directory"
    except ssl.SSLError:
        return "it holds no PEM certificate"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


class UnparsableDsn(ValueError):
    """A DSN the driver would misread: refused before it gets it (as the driver's ValueError)."""


class TlsUnusable(OSError):
    """The CA file for the default verification cannot be loaded (an OSError, as the
    driver's connection errors are; :meth:`Target.tls_refusal` names the key and fix)."""


def is_local(host: str) -> bool:
    """Whether a DSN's host is this machine: a Unix socket directory, ``localhost`` or a
    loopback address. A name is not resolved: only ``localhost`` is taken on its word."""
    host = host.strip()
    if not host or host.startswith("/"):
        return True
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def verifies_by_default(hosts: Sequence[str], sslmode: str | None) -> bool:
    """Whether the server must prove who it is although the operator chose nothing: no
    ``sslmode`` (DSN or ``PGSSLMODE``) and a host that is not this machine. No host at all is
    the driver's default, a local socket or ``localhost``."""
    return sslmode is None and not all(is_local(h) for h in hosts)


def _hosts(netloc: str, params: dict[str, str]) -> list[str]:
    """The hosts the driver connects to (as asyncpg reads them): the DSN's, its ``host``
    parameter, ``PGHOST``; none for its local default."""
    spec = unquote(netloc) or params.get("host", "") or os.environ.get("PGHOST", "")
    hosts = []
    for part in spec.split(","):
        if part.startswith("["):  # [v6]:port
            hosts.append(part[1:].partition("]")[0])
        elif part.startswith("/"):
            hosts.append(part)
        else:
            hosts.append(part.partition(":")[0])
    return [h for h in hosts if h]


def _configured_certificates(params: dict[str, str]) -> bool:
    """Whether a CA or a client certificate is configured where the driver looks: the DSN,
    the PG* variables, ~/.postgresql (libpq's places, which asyncpg reads)."""
    if any(params.get(k) for k in ("sslrootcert", "sslcert", "sslkey", "sslcrl")):
        return True
    if any(os.environ.get(k) for k in ("PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSSLCRL")):
        return True
    home = os.path.expanduser("~/.postgresql")
    return any(os.path.exists(os.path.join(home, f)) for f in ("root.crt", "postgresql.crt"))


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
            bool(sep) and scheme.lower() in SCHEMES and rest.count("@") == authority.count("@") <= 1
        )
        password = userinfo.partition(":")[2]
        hostpart, _, query = hostpart.partition("?")
        hostpart = hostpart.partition("#")[0]
        netloc, _, database = hostpart.partition("/")
        params = dict(parse_qsl(query, keep_blank_values=True))
        # Each secret parameter's value as written and as decoded (an error may quote either),
        # of the query after the host and of the query as the driver reads it (from the first
        # '?': it may hold an '@' of a password).
        given = [
            value
            for raw in (query, rest.partition("?")[2])
            for part in raw.split("&")
            for name, _, value in [part.partition("=")]
            if unquote_plus(name).lower() in SECRET_PARAMETERS
        ]
        for pw in (password, *given):
            if pw:
                self.secrets |= {pw, unquote(pw), unquote_plus(pw)}
        server = netloc or params.get("host", "") or "localhost"
        if "," not in server and not server.startswith("/"):  # one host, not a socket dir
            if not server.rpartition("]")[2].partition(":")[1]:  # no port written
                server += f":{params.get('port') or DEFAULT_PORT}"
        elif params.get("port"):
            server += f":{params['port']}"
        self.where = f"{server}/{unquote(database) or '?'}"
        sslmode = params.get("sslmode", os.environ.get("PGSSLMODE"))
        # A service file (?service=, PGSERVICE) names hosts we do not read: taken as remote.
        service = bool(params.get("service") or os.environ.get("PGSERVICE"))
        self.verifies = verifies_by_default(_hosts(netloc, params), sslmode) or (
            service and sslmode is None
        )
        self._sslmode = sslmode
        self._params = {
            k: v for k, v in params.items() if k in ("sslrootcert", "sslcrl", "sslcert", "sslkey")
        }
        self._rootcert = params.get("sslrootcert") or None
        # Certificates the driver finds itself (a CA, a client certificate: the DSN's, PG*
        # variables, ~/.postgresql, a service file's): then it verifies with them
        # (sslmode=verify-full added for it); else our context, with the system's CAs.
        self._driver_verifies = self.verifies and (service or _configured_certificates(params))
        self._context: ssl.SSLContext | None = None
        # What follows the last '@' is never the user information's, but it may be the tail of
        # a query's password (``?password=a@b``): unknown when a query may come before it.
        if not self.parsable and "=" in userinfo:
            self.where = UNKNOWN_SERVER

    def dsn(self) -> str:
        """The DSN, for the driver: :class:`UnparsableDsn` if the driver would misread it."""
        if not self.parsable:
            raise UnparsableDsn("unparsable DSN")
        if self._driver_verifies:
            return self._dsn + ("&" if "?" in self._dsn else "?") + "sslmode=verify-full"
        return self._dsn

    def tls(self) -> ssl.SSLContext | None:
        """The driver's ``ssl`` argument: a verifying context (the system's CAs, or the DSN's
        ``sslrootcert``; the host name checked) where :attr:`verifies`, else None (the DSN's
        ``sslmode``, or the driver's default for this machine). :class:`TlsUnusable` if the
        CA file cannot be loaded."""
        if not self.verifies or self._driver_verifies:
            return None
        if self._context is None:
            try:
                self._context = ssl.create_default_context(cafile=self._rootcert)
            except (OSError, ssl.SSLError) as exc:
                raise TlsUnusable(
                    f"sslrootcert {self._rootcert}: {getattr(exc, 'strerror', None) or exc}"
                ) from None
        return self._context

    def tls_refusal(self, exc: BaseException, key: str) -> str | None:
        """What to tell the operator when ``exc`` is a server that could not prove who it is
        (its certificate, or no TLS at all where it is required), naming ``key`` and the fix;
        None for any other error."""
        chain: list[BaseException] = [exc]
        while len(chain) < 5 and (nxt := chain[-1].__cause__ or chain[-1].__context__):
            chain.append(nxt)
        if (isinstance(exc, _FILE_ERRORS) or _driver_configuration(exc)) and not isinstance(
            exc, TlsUnusable | ssl.SSLCertVerificationError
        ):
            # The driver loads its certificate files before it connects, and its error for a
            # missing CA (ClientConfigurationError, a ValueError) reads like a parse error.
            problem = self.certificate_problem()
            if problem is not None:
                return f"{key}: PostgreSQL at {self.where}: {problem}"
        if isinstance(exc, TlsUnusable):
            what = f"the CA file cannot be loaded ({self.describe(exc)})"
        elif (
            self._driver_verifies
            and isinstance(
                exc, FileNotFoundError | PermissionError | IsADirectoryError | ssl.SSLError
            )
            and not isinstance(exc, ssl.SSLCertVerificationError)
        ):
            # The driver loads them before it connects (no socket is a file here: remote).
            what = (
                "a certificate file cannot be loaded (sslrootcert, sslcert, sslkey: the DSN's, "
                f"or PGSSLROOTCERT, PGSSLCERT, PGSSLKEY, ~/.postgresql) ({self.describe(exc)})"
            )
        elif any(isinstance(e, ssl.SSLCertVerificationError) for e in chain):
            what = f"its certificate cannot be verified ({self.describe(exc)})"
        elif isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
            what = "it does not offer TLS"
        else:
            return None
        if self.verifies:
            why = (
                "the DSN has no sslmode, so a server not on this machine must prove who it is "
                "(a certificate a CA in the system's store signed, for the DSN's host name)"
            )
        else:
            why = f"sslmode={self._sslmode} requires TLS"
        return (
            f"{key}: PostgreSQL at {self.where}: {what}: {why}; give the server's CA with "
            "sslrootcert=/path/ca.pem in the DSN, or set sslmode=require (encrypted, not "
            "verified) or sslmode=disable (plain text) knowingly"
        )

    def _driver_sslmode(self) -> int | None:
        """The driver's sslmode (its position in :data:`_SSLMODES`), when it loads the
        certificate files itself; None when :meth:`tls` gives it our context."""
        if self._driver_verifies:
            return _SSLMODES.index("verify-full")
        if self.verifies:
            return None
        mode = (self._sslmode or "prefer").lower()
        return _SSLMODES.index(mode) if mode in _SSLMODES else None

    def certificate_problem(self) -> str | None:
        """Which certificate file the driver would fail to load, where its path came from
        (the DSN, a PG* variable, ~/.postgresql), why, and the fix; None if none would fail
        (or its file is one we do not read: a service file's). The driver's own message for a
        missing CA is not shown: it is a parse error's class, and those may quote the DSN."""
        level = self._driver_sslmode()
        if level is None or level < _LOAD_CLIENT:
            return None
        why = (
            "the DSN has no sslmode and the server is not on this machine, so the driver "
            "verifies it, with the certificate files configured where libpq looks"
            if self._driver_verifies
            else f"sslmode={self._sslmode or 'prefer'} (the DSN's, PGSSLMODE or the default)"
        )
        uid = os.geteuid()
        ca_fix = (
            "give the server's CA with sslrootcert=/path/ca.pem in the DSN, or set "
            "sslmode=require (encrypted, not verified) knowingly"
        )
        files: list[tuple[str, str, str, bool]] = []  # (what, path, where it came from, a CA)
        if level >= _LOAD_CA:
            for what, param, env, name in (
                ("CA file", "sslrootcert", "PGSSLROOTCERT", "root.crt"),
                ("certificate revocation list", "sslcrl", "PGSSLCRL", "root.crl"),
            ):
                needed = name == "root.crt" and level >= _NEED_CA
                if self._params.get(param):
                    files.append((what, self._params[param], f"the DSN's {param}", True))
                elif os.environ.get(env):
                    files.append((what, os.environ[env], env, True))
                elif (path := _dot_postgresql(name)) is None:
                    if needed:
                        return (
                            f"no CA file to verify the server with: neither the DSN's "
                            f"sslrootcert nor PGSSLROOTCERT names one, and ~/.postgresql/{name} "
                            f"cannot be looked for (no home directory): {why}; {ca_fix}"
                        )
                elif needed or os.path.lexists(path):
                    files.append((what, path, f"~/.postgresql/{name}", True))
        for what, param, env, name in (
            ("client certificate", "sslcert", "PGSSLCERT", "postgresql.crt"),
            ("client key", "sslkey", "PGSSLKEY", "postgresql.key"),
        ):
            if self._params.get(param):
                files.append((what, self._params[param], f"the DSN's {param}", False))
            elif os.environ.get(env):
                files.append((what, os.environ[env], env, False))
            elif (path := _dot_postgresql(name)) is not None and os.path.lexists(path):
                files.append((what, path, f"~/.postgresql/{name}", False))
        for what, path, origin, ca in files:
            problem = _unloadable(path, ca)
            if problem is None:
                continue
            shown = self.scrub(path)[:_MAX_MESSAGE]
            if origin.startswith("~"):
                named = f"{origin}: the driver's default, neither the DSN nor PG* names one"
                fix = (
                    f"{ca_fix} (or put it at {shown}, readable by uid {uid})"
                    if what == "CA file"
                    else f"make it readable by uid {uid}, or move it away if not for this server"
                )
            elif origin.startswith("the DSN"):
                named = f"named by {origin}"
                fix = (
                    f"set {origin[len('the DSN') + 3 :]} in the DSN to a file readable by uid {uid}"
                )
            else:
                named = f"named by {origin}"
                fix = f"make {origin} name a {what} readable by uid {uid}, or unset it"
            return f"the {what} {shown} ({named}) cannot be loaded: {problem}: {why}; {fix}"
        return None

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

    def describe(self, exc: BaseException, *, detail: bool = True) -> str:
        """``exc`` bounded and masked. ``detail=False``: a server error's message alone, without
        the DETAIL and HINT the driver's str() appends: a violation's DETAIL repeats the row
        (``Failing row contains (…)``: an event's data), a trigger's RAISE may put it there."""
        raw = str(exc.args[0]) if not detail and hasattr(exc, "sqlstate") and exc.args else exc
        # Masked before the cut (as far past it as masking needs: a server may repeat the
        # password): a secret cut in two would escape the mask.
        text = masked(str(raw).strip(), _MAX_MESSAGE + 1, self.scrub) or type(exc).__name__
        if len(text) > _MAX_MESSAGE:
            text = text[:_MAX_MESSAGE] + "…"
        return f"{text} ({type(exc).__name__})"
