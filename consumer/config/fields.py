"""Values of the configuration treated as hostile: URLs and HTTP headers are checked (no
whitespace or control characters, a parseable URL with a host, header names that are tokens)
and masked wherever they are shown (``repr``, ``check-config``): URL passwords and query
values, and the values of secret-looking headers, may be secrets. ``str()`` of a URL is the
URL itself, for the code that uses it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import unicodedata
from pathlib import PurePath
from typing import Annotated, Any
from urllib.parse import SplitResult, unquote, unquote_plus, urlsplit

from pydantic import AfterValidator, PlainSerializer, SecretStr

from ..core.printable import printable
from ..logs import MASK, MIN_SECRET_CHARS
from ..pg_target import SCHEMES as DSN_SCHEMES
from ..pg_target import SECRET_PARAMETERS as DSN_SECRET_PARAMETERS

# Whether a header or query parameter name looks like it carries a credential
# (:func:`is_secret_name`): then its value is masked in repr, check-config and logs (an
# orchestration template's), may not be 1-3 characters, and counts as credentials for the
# plain-http rule. A name is read as words, never as a substring ("assigned" holds "sig",
# "keyword" "key", "author" "auth"): see :func:`name_words`. A word is a credential word when,
# lowercased (and without a plural "s"), it:
# - is, starts with or ends with one of CREDENTIAL_WORDS: access_token, accessToken,
#   accesstoken, tokenId, client_secret, Set-Cookie, sessionid, X-Hub-Signature-256,
#   Proxy-Authorization, credentials;
# - is or ends with one of SHORT_CREDENTIAL_WORDS, which also start ordinary words (keyword,
#   keyboard, author, authority, signal, passenger, passport): key, apiKey, apikey, X-Api-Key,
#   Ocp-Apim-Subscription-Key, auth, oauth, sig (Azure SAS), pass, dbpass;
# and is not one of ORDINARY_WORDS, which end with one of them (bypass, monkey...).
# A credential written inside one lowercase run ("xapikeyid") is not seen: write it as words.
CREDENTIAL_WORDS = (
    "token",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "passcode",
    "pwd",
    "signature",
    "authorization",
    "authentication",
    "cookie",
    "session",
    "credential",
    "bearer",
    "hmac",
    "jwt",
)
SHORT_CREDENTIAL_WORDS = ("key", "auth", "sig", "pass")
ORDINARY_WORDS = frozenset(
    (
        "bypass",
        "compass",
        "encompass",
        "overpass",
        "surpass",
        "trespass",
        "underpass",
        "donkey",
        "hockey",
        "hotkey",
        "jockey",
        "monkey",
        "turkey",
        "turnkey",
        "whiskey",
        "possession",
        "obsession",
    )
)
# A name's words: runs of letters, split after an acronym (XMLHttp: XML, Http) and before a
# capital after a lower-case letter (roomAssignedOnly: room, Assigned, Only), and runs of
# digits; anything else (_ - . space) separates them.
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
# RFC 9110 section 5.6.2: a field name is a token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HTTP_SCHEMES = ("http", "https")
ABSOLUTE = ("http://", "https://")  # an orchestration template that is a URL of its own
# What the stream's WebSocket (aiohttp) and the HTTP client take: an HTTP CONNECT proxy. SOCKS
# would need aiohttp-socks.
_PROXY_SCHEMES = ("http", "https")
_CHAR_NAMES = {"\r": "CR", "\n": "LF", "\t": "TAB", "\0": "NUL", " ": "a space", "\x7f": "DEL"}
INSECURE_FIX = (
    "use https://, or (for a trusted test network only) set allow_insecure_http = true "
    "at the top level of the config"
)


class Problem(ValueError):
    """A configuration error naming its key and its fix.

    ``items``: (key, problem, fix); the key is relative to where pydantic reports the error
    ("" for that place itself, e.g. a field). :func:`explain` prints one line per item. No
    message ever holds the offending value: it may be a secret.
    """

    def __init__(self, *items: tuple[str, str, str]) -> None:
        self.items = items
        super().__init__("; ".join(f"{(k + ': ') if k else ''}{m} -> {f}" for k, m, f in items))


def _char_name(c: str) -> str:
    return _CHAR_NAMES.get(c) or f"U+{ord(c):04X}"


def bad_url_char(text: str) -> str | None:
    """Where the first whitespace or control (or format) character is, if any."""
    for i, c in enumerate(text):
        if c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
            return f"{_char_name(c)} at position {i}"
    return None


def unprintable_char(text: str) -> str | None:
    """Where the first character :meth:`str.isprintable` refuses (controls, line separators,
    format characters) is, if any."""
    for i, c in enumerate(text):
        if not c.isprintable():
            return f"{_char_name(c)} at position {i}"
    return None


def _bad_field_char(text: str) -> str | None:
    """Where the first character not allowed in an HTTP field value is (visible ASCII and
    space only: CR/LF would inject headers, and HTTP clients cannot encode the rest), if any."""
    for i, c in enumerate(text):
        if not " " <= c <= "~":
            return f"{_char_name(c)} at position {i}"
    return None


def name_words(name: str) -> list[str]:
    """``name``'s words, lowercased: ``X-Api-Key`` and ``XApiKey`` -> x, api, key;
    ``roomAssignedOnly`` -> room, assigned, only; ``sha256sig`` -> sha, 256, sig."""
    return [w.lower() for w in _WORD.findall(name)]


def _credential_word(word: str) -> bool:
    for w in (word, word[:-1]) if word.endswith("s") else (word,):
        if w in ORDINARY_WORDS:
            return False
        if any(w.startswith(c) or w.endswith(c) for c in CREDENTIAL_WORDS) or w.endswith(
            SHORT_CREDENTIAL_WORDS
        ):
            return True
    return False


def is_secret_name(name: str) -> bool:
    """A header or query parameter name that looks like it carries a credential: one of its
    words (:func:`name_words`) is a credential word (see CREDENTIAL_WORDS)."""
    return any(_credential_word(word) for word in name_words(name))


def is_dsn(url: str) -> bool:
    """A PostgreSQL DSN (postgresql://, postgres://): its query parameters are libpq's."""
    scheme, sep, _ = str(url).partition("://")
    return bool(sep) and scheme.lower() in DSN_SCHEMES


def is_secret_parameter(name: str, *, dsn: bool) -> bool:
    """A query parameter of a URL (``dsn``: of a PostgreSQL DSN) whose value is a secret: in a
    DSN libpq's secret parameters (pg_target.SECRET_PARAMETERS), elsewhere a secret-looking name
    (:func:`is_secret_name`). ``name`` is percent-decoded."""
    return name.lower() in DSN_SECRET_PARAMETERS if dsn else is_secret_name(name)


def is_loopback(host: str | None) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1."""
    if not host:
        return False
    host = host.lower().rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class MaskedUrl(str):
    """A URL from the configuration. ``str()`` is the URL itself, for the code that uses it;
    ``repr()`` (and ``check-config``, through the serializer below) masks the password of its
    user information and every query value: either may be a secret."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(mask_url(self))


class MaskedValue(str):
    """A secret-looking header value: ``str()`` is the value, ``repr()`` is ``'***'``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(MASK)


def _mask_params(part: str) -> str:
    pieces = []
    for piece in part.split("&"):
        name, eq, _ = piece.partition("=")
        pieces.append(f"{name}={MASK}" if eq else (MASK if piece else ""))
    return "&".join(pieces)


def user_information(url: str) -> str | None:
    """The user information of ``url`` as written: from ``//`` to the last ``@`` (the DSN rule
    of :mod:`consumer.pg_target`), or None without an ``@``. urlsplit ends the authority at the
    first ``/``, ``?`` or ``#``, so a raw one in a password ends its user information early, or
    hides it (no ``@`` left in its netloc) and shows the password as a path or query."""
    info, at, _ = str(url).partition("//")[2].rpartition("@")
    return info if at else None


def misread_user_information(url: str) -> bool:
    """urlsplit (and so every client) reads another user information than
    :func:`user_information`: a raw ``/``, ``?``, ``#`` (or ``@``) in the user name or
    password, or an ``@`` after the authority."""
    netloc = urlsplit(str(url)).netloc
    return user_information(url) != (netloc.rpartition("@")[0] if "@" in netloc else None)


def misread_problem(fix: str) -> Problem:
    return Problem(
        (
            "",
            "has an '@' after a '/', '?' or '#': read as user information, a raw '/', '?' or "
            "'#' in the user name or password would end it early and send a piece of it as the "
            "host, path or query",
            fix,
        )
    )


PERCENT_ENCODE_FIX = (
    "percent-encode '/', '?', '#' and '@' in the user name and password (%2F %3F %23 %40), "
    "and write any other '@' as %40"
)


# The log redactor masks secrets of MIN_SECRET_CHARS characters or more only (masking a
# shorter one would mask half the log): a shorter secret would appear in log lines as it is.
SHORT_SECRET = (
    f"is shorter than {MIN_SECRET_CHARS} characters: the logs mask secrets of "
    f"{MIN_SECRET_CHARS} characters or more only (a shorter one would mask half the log), so "
    "this one could appear in log lines as it is (its value is not shown here)"
)


def short_secret(value: str) -> bool:
    return len(value) < MIN_SECRET_CHARS


def basic_credentials(value: str) -> tuple[str, str] | None:
    """The ``(user, password)`` a ``Basic <base64>`` header value encodes (UTF-8
    ``user:password``), as a receiver may echo them decoded; None for any other value."""
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


def short_url_secrets(url: str, *, lone_user: bool) -> list[str]:
    """What of ``url``'s secrets the redactor would not mask (:data:`SHORT_SECRET`), as the
    redactor registers them (consumer.config.secrets.url_secret_values): the password of its
    user information (``lone_user``: a user name without one, which may be a token, as in
    ``https://TOKEN@host``), percent-decoded, and the values of its secret query and fragment
    parameters (:func:`is_secret_parameter`: a DSN's libpq secrets, another URL's
    secret-looking names; a value with a ``{placeholder}`` is filled per request). Each is
    said by where it is, never by its value."""
    found: list[str] = []
    dsn = is_dsn(url)
    infos = {user_information(url)}
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return found
    if "@" in parts.netloc:
        infos.add(parts.netloc.rpartition("@")[0])
    for info in sorted(i for i in infos if i is not None):
        user, colon, password = info.partition(":")
        credential = password if colon else (user if lone_user else "")
        if credential and short_secret(unquote(credential)):
            found.append("the password of its user information" if colon else "its user name")
    for part in (parts.query, parts.fragment):
        for piece in part.split("&"):
            name, eq, value = piece.partition("=")
            if not (eq and value) or "{" in value:
                continue
            if not is_secret_parameter(unquote_plus(name), dsn=dsn):
                continue
            if short_secret(unquote_plus(value)):
                found.append(f"the value of its parameter {printable(unquote_plus(name), 40)}")
    return list(dict.fromkeys(found))


def short_url_problem(found: list[str]) -> Problem:
    return Problem(
        *(
            (
                "",
                f"{what} {SHORT_SECRET}",
                f"use the real secret (at least {MIN_SECRET_CHARS} characters) there",
            )
            for what in found
        )
    )


def mask_url(url: str) -> str:
    """``url`` with the password of its user information (a lone user name, which may be a
    token, too) and every query and fragment value replaced by ``***``. User information that
    urlsplit would misread (:func:`misread_user_information`) is masked whole."""
    try:
        parts = urlsplit(str(url))
        misread = misread_user_information(url)
    except ValueError:
        return MASK
    if misread:
        head, _, rest = str(url).partition("//")
        return mask_url(f"{head}//{rest.rpartition('@')[2]}").replace("//", f"//{MASK}@", 1)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if colon else f"{MASK}@{hostport}"
    return SplitResult(
        parts.scheme,
        netloc,
        parts.path,
        _mask_params(parts.query),
        _mask_params(parts.fragment),
    ).geturl()


def _dump_url(url: str) -> str:
    return mask_url(url)


def mask_path(url: str) -> str:
    """``url`` masked (:func:`mask_url`) and its path too, beyond "/": a webhook's path may be
    its credential (Slack, Discord, Teams: ``/services/T…/B…/<secret>``)."""
    masked = mask_url(url)
    try:
        parts = urlsplit(masked)
    except ValueError:
        return MASK
    if parts.path in ("", "/"):
        return masked
    return SplitResult(parts.scheme, parts.netloc, f"/{MASK}", parts.query, parts.fragment).geturl()


class PathMaskedUrl(str):
    """A webhook URL: as :class:`MaskedUrl`, its path masked too in ``repr()``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(mask_path(self))


def _webhook_url(v: str) -> str:
    return PathMaskedUrl(http_url(v))


def _dump_headers(headers: dict[str, str]) -> dict[str, str]:
    return {k: MASK if is_secret_name(k) else str(v) for k, v in headers.items()}


def _parse_url(v: str, schemes: tuple[str, ...], wrong_scheme: str) -> SplitResult:
    bad = bad_url_char(v)
    if bad:
        raise Problem(
            (
                "",
                f"contains {bad}: no whitespace or control characters are allowed in a URL",
                "remove it (percent-encode it if it is really part of the URL)",
            )
        )
    try:
        parts = urlsplit(v)
        parts.port  # noqa: B018  # raises ValueError for a bad port
    except ValueError:
        raise Problem(("", "is not a valid URL", "use scheme://host[:port][/path]")) from None
    if misread_user_information(v):
        raise misread_problem(PERCENT_ENCODE_FIX)
    if parts.scheme not in schemes or not v.lower().startswith(parts.scheme + "://"):
        raise ValueError(wrong_scheme)
    if not parts.hostname:
        raise Problem(("", "has no host", "use scheme://host[:port][/path]"))
    return parts


def http_url(v: str) -> str:
    _parse_url(v, _HTTP_SCHEMES, "must be an http:// or https:// URL")
    return MaskedUrl(v)


def _base_url(v: str) -> str:
    return MaskedUrl(http_url(v).rstrip("/"))


# The WebSocket URL (wss://host/subscriptions, as the portal and Oracle's GraphiQL tool show it)
# names the same gateway: taken as its https:// form (ws:// as http://, which the plain-http
# rules then judge as any http:// gateway_url).
_WEBSOCKET_SCHEMES = {"wss": "https", "ws": "http"}


def _gateway_url(v: str) -> str:
    scheme, sep, rest = v.partition("://")
    if sep and scheme.lower() in _WEBSOCKET_SCHEMES:
        v = f"{_WEBSOCKET_SCHEMES[scheme.lower()]}://{rest}"
    _parse_url(
        v,
        _HTTP_SCHEMES,
        "must start with https:// (the gateway URL of the portal's environment card; its "
        "wss:// WebSocket URL works too)",
    )
    return MaskedUrl(v.rstrip("/"))


def _proxy_url(v: str) -> str:
    parts = _parse_url(
        v,
        _PROXY_SCHEMES,
        "must be an HTTP proxy URL: http:// or https:// (a SOCKS proxy is not supported)",
    )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise Problem(("", "a proxy URL has no path, query or fragment", "use scheme://host:port"))
    if parts.username is not None and parts.password is None:
        raise Problem(
            ("", "a user name without a password", "use scheme://user:password@host:port")
        )
    return MaskedUrl(v)


# Headers that frame the request or the connection: the HTTP client's to set. Given by hand,
# aiohttp keeps a Content-Length and cuts every body to it (a receiver answering 200 to a
# cut body: every event lost), and a Transfer-Encoding beside its own length makes every
# request a 400 (every event dead-lettered).
_FRAMING_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "host", "connection", "expect", "te", "upgrade"}
    | {"trailer", "keep-alive", "proxy-connection"}
)


def _check_headers(headers: dict[str, str]) -> dict[str, str]:
    checked: dict[str, str] = {}
    for name, value in headers.items():
        if name.lower() in _FRAMING_HEADERS:
            raise Problem(
                (
                    "",
                    f"header {name!a} frames the request: the HTTP client sets it",
                    "remove it",
                )
            )
        if not _TOKEN.fullmatch(name):
            raise Problem(
                (
                    "",
                    f"header name {name!a} is not an HTTP field name",
                    "use letters, digits and !#$%&'*+-.^_`|~ only (RFC 9110 token)",
                )
            )
        bad = _bad_field_char(value)
        if bad:
            raise Problem(
                (
                    "",
                    f"the value of header {name!r} contains {bad}",
                    "remove it: a header value is visible ASCII and spaces only, "
                    "never CR, LF, NUL or other control characters",
                )
            )
        checked[name] = MaskedValue(value) if is_secret_name(name) else value
    return checked


def no_controls(v: SecretStr | str | None) -> Any:
    """For values sent in an HTTP header (app key, bearer token, enterpriseId)."""
    if v is None:
        return v
    text = v.get_secret_value() if isinstance(v, SecretStr) else v
    bad = _bad_field_char(text)
    if bad:
        raise Problem(
            (
                "",
                f"contains {bad}",
                "remove it: it travels in an HTTP header (visible ASCII and spaces only)",
            )
        )
    return v


def _any_url(v: str) -> str:
    try:
        misread = misread_user_information(v)
    except ValueError:
        misread = False  # the user's checks name it (e.g. the nats sink's servers)
    if misread:
        # nats-py does not percent-decode a URL's credentials: they go in the sink's fields.
        raise misread_problem(
            "move the user name and password out of the URL into the sink's user and password "
            "settings, and write any other '@' as %40"
        )
    return MaskedUrl(v)


def _mask_secret_params(part: str) -> str:
    pieces = []
    for piece in part.split("&"):
        name, eq, _ = piece.partition("=")
        pieces.append(f"{name}={MASK}" if eq and is_secret_name(unquote_plus(name)) else piece)
    return "&".join(pieces)


def mask_template(template: str) -> str:
    """An orchestration URL template with the values of its secret-looking query (and
    fragment) parameters masked (:func:`is_secret_name`: ``apikey``, ``token``...); the others
    are the API's parameters, shown as they are."""
    rest, hash_, fragment = str(template).partition("#")
    path, question, query = rest.partition("?")
    return path + question + _mask_secret_params(query) + hash_ + _mask_secret_params(fragment)


class MaskedTemplate(str):
    """An orchestration URL template: ``str()`` is the template, ``repr()`` masks the values
    of its secret-looking query parameters."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(mask_template(self))


def _templates(templates: dict[str, str]) -> dict[str, str]:
    return {name: MaskedTemplate(t) for name, t in templates.items()}


def _dump_templates(templates: dict[str, str]) -> dict[str, str]:
    return {name: mask_template(t) for name, t in templates.items()}


def _undecodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: bytes os.environ could not decode
        return True
    return False


def undecodable(data: Any, key: str = "") -> list[tuple[str, str, str]]:
    """Problems naming each string in ``data`` (settings as loaded: dicts, lists, strings) that
    holds a lone surrogate: Python's form of bytes that are not UTF-8 in an environment
    variable. Such a value cannot be encoded again (a header, a log line, the redactor)."""
    fix = "set it again as UTF-8 text (check the encoding of what sets it)"
    if isinstance(data, SecretStr):
        data = data.get_secret_value()
    elif isinstance(data, PurePath):
        data = str(data)
    if isinstance(data, str):
        return [(key, "holds bytes that are not UTF-8 text", fix)] if _undecodable(data) else []
    problems: list[tuple[str, str, str]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(k, str) and _undecodable(k):
                problems.append((key, "a key in it holds bytes that are not UTF-8 text", fix))
                continue
            problems += undecodable(v, f"{key}.{k}" if key else str(k))
    elif isinstance(data, list | tuple | set | frozenset):
        for item in data:
            found = undecodable(item, key)
            if found:  # the list's key: an index would not name the variable
                return found[:1]
    return problems


_URL_DUMP = PlainSerializer(_dump_url, return_type=str, when_used="json")
# str() of these is the URL; repr() and check-config mask passwords and query values.
HttpUrl = Annotated[str, AfterValidator(http_url), _URL_DUMP]
# A webhook's URL: its path, which may be the credential, masked as well.
WebhookUrl = Annotated[
    str,
    AfterValidator(_webhook_url),
    PlainSerializer(mask_path, return_type=str, when_used="json"),
]
BaseUrl = Annotated[str, AfterValidator(_base_url), _URL_DUMP]  # trailing "/" dropped
GatewayUrl = Annotated[str, AfterValidator(_gateway_url), _URL_DUMP]  # trailing "/" dropped
ProxyUrl = Annotated[str, AfterValidator(_proxy_url), _URL_DUMP]
# A URL whose checks are its user's (e.g. the nats sink's servers): only masked here.
AnyUrl = Annotated[str, AfterValidator(_any_url), _URL_DUMP]
# Orchestration URL templates: secret-looking query values masked in repr and check-config.
UrlTemplates = Annotated[
    dict[str, str],
    AfterValidator(_templates),
    PlainSerializer(_dump_templates, return_type=dict[str, str], when_used="json"),
]
# Configured HTTP headers: checked names and values; secret-looking values masked.
Headers = Annotated[
    dict[str, str],
    AfterValidator(_check_headers),
    PlainSerializer(_dump_headers, return_type=dict[str, str], when_used="json"),
]
