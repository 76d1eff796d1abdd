"""OAuth tokens for OHIP: ``POST {gateway}/oauth/v1/tokens``, cached until shortly before expiry.

Both grants: ``client_credentials`` (scope, ``enterpriseId`` header) and ``password`` (the
integration user). Transient failures (transport errors, 5xx, 429) are retried with backoff
honouring ``Retry-After``; 400/401/403 fail at once with what to check, as do 404s in a row
for ``retry_max_s`` before the endpoint ever issued a token (a wrong URL). Every message names
the endpoint (its URL masked) and the reason (connection refused, TLS error, DNS failure,
timeout); while a failing endpoint is retried, :meth:`TokenProvider.waiting` says so, for
status lines.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from ..config import StreamSettings, mask_url, url_secret_values
from ..core.evidence import SCRUB_MARGIN, describe
from ..core.printable import printable
from ..core.retry_after import RETRY_STATUSES, WaitRetryAfter, retry_after_seconds
from ..core.unreachable import reason
from ..errors import AuthError
from ..http_client import TRANSPORT_ERRORS, basic_auth, read_at_most, wire_url, with_deadline
from ..logs import MASK, MIN_SECRET_CHARS, REDACTOR, secret_forms

log = structlog.get_logger(__name__)

MAX_TOKEN_RESPONSE = 1024 * 1024  # a token answer (a JWT or two) is a few KB

_MAX_LIFETIME_S = 86400.0
_DEFAULT_LIFETIME_S = 3600.0  # an answer without expires_in (RFC 6749 makes it optional)
# Shorter is no lifetime (1e-300 passed "> 0"): each caller would fetch a token of its own.
_MIN_LIFETIME_S = 1.0
# What an access token may be: it goes in an Authorization header (no CR/LF, no controls) and
# is masked in every log line (a token of "e" would mask every "e"). RFC 6750's b64token is
# narrower; this refuses only what cannot work.
TOKEN_CHARS = (8, 16384)


@dataclass(frozen=True, slots=True)
class Token:
    value: str = field(repr=False)
    expires_at: float  # monotonic
    lifetime_s: float

    def __repr__(self) -> str:
        return f"Token(value='***', lifetime_s={self.lifetime_s})"

    def refresh_at(self, margin_s: float) -> float:
        """When to replace it: ``margin_s`` before expiry, or half-way for short-lived tokens."""
        return self.expires_at - min(margin_s, self.lifetime_s / 2)


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


_RETRIED: tuple[type[BaseException], ...] = (_Retryable, *TRANSPORT_ERRORS)


class TokenProvider:
    """One per stream; shares the process's pooled ``aiohttp.ClientSession``."""

    def __init__(
        self,
        client: aiohttp.ClientSession,
        settings: StreamSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._settings = settings
        self._clock = clock
        self._token: Token | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0
        self.failures = 0  # requests refused, unanswered or answered with no usable token
        self.url = mask_url(settings.token_url)
        # aiohttp's error texts carry the request's URL: its query values, user information.
        self._url_secrets = sorted(
            {v for v in url_secret_values(settings.token_url) if len(v) >= MIN_SECRET_CHARS},
            key=len,
            reverse=True,
        )
        self._wait: tuple[str, float] | None = None  # last failure, next attempt (monotonic)
        self._answered = False  # the endpoint has issued a token: it exists
        self._not_found_since: float | None = None  # first of the 404s in a row (clock)

    def invalidate(self, rejected: str | None = None) -> None:
        """Drop the current token: the next caller fetches a new one. ``rejected``: the token
        a server refused; a newer one, fetched meanwhile for another caller, is kept (each
        slow 401 of the old token would otherwise fetch one more)."""
        if rejected is None or (self._token is not None and self._token.value == rejected):
            self._token = None

    def expires_in(self) -> float | None:
        return None if self._token is None else self._token.expires_at - self._clock()

    async def access_token(self) -> str:
        """The current token's value (orchestration's view of this provider)."""
        return (await self.token()).value

    def waiting(self) -> str | None:
        """While a failing endpoint is retried: what for, and when the next attempt is."""
        if self._wait is None:
            return None
        why, at = self._wait
        line = f"waiting for token ({why}), retry in {max(0.0, at - self._clock()):.0f} s"
        return printable(line, len(line))  # one line: it goes to systemd's STATUS= as well

    async def token(self, *, retry: bool = True) -> Token:
        """A token valid for at least ``refresh_margin_s`` more, fetched only when needed.
        ``retry=False``: one attempt (preflight answers at once, it does not wait it out)."""
        async with self._lock:
            margin = self._settings.auth.refresh_margin_s
            tok = self._token
            if tok is None or self._clock() >= tok.refresh_at(margin):
                self._token = tok = await self._fetch(retry)
            return tok

    def _failed(self, rs: RetryCallState) -> None:
        exc = rs.outcome.exception() if rs.outcome else None
        why = self._why(exc)
        delay = rs.next_action.sleep if rs.next_action else 0.0
        self._wait = (why, self._clock() + delay)
        log.warning("token request failed; retrying", error=why, attempt=rs.attempt_number)

    def _why(self, exc: BaseException | None) -> str:
        if isinstance(exc, TRANSPORT_ERRORS):
            return f"{self.url}: {reason(exc, self._scrub)}"
        return f"{self.url}: {exc}"  # _Retryable: our own words

    def _scrub(self, text: str) -> str:
        for secret in self._url_secrets:
            text = text.replace(secret, MASK)
        scrubbed: str = REDACTOR.scrub(text)  # the other secrets of the process too
        return scrubbed

    async def _fetch(self, retry: bool) -> Token:
        auth = self._settings.auth
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(lambda e: isinstance(e, _RETRIED)),
                wait=WaitRetryAfter(wait_exponential_jitter(multiplier=0.5, max=30.0, jitter=0.5)),
                stop=stop_before_delay(auth.retry_max_s) if retry else stop_after_attempt(1),
                before_sleep=self._failed,
                reraise=True,
            ):
                with attempt:
                    try:
                        return await self._request()
                    except Exception:
                        self.failures += 1
                        raise
        except _RETRIED as exc:
            raise AuthError(f"token endpoint {self._why(exc)}", retriable=True) from exc
        finally:
            self._wait = None
        raise AssertionError("unreachable: AsyncRetrying either returns or raises")

    async def _request(self) -> Token:
        s = self._settings
        auth = s.auth
        form: dict[str, str] = {"grant_type": auth.grant}
        if auth.grant == "client_credentials":
            form["scope"] = auth.scope
        else:
            assert auth.username is not None and auth.password is not None
            form["username"] = auth.username
            form["password"] = auth.password.get_secret_value()
        headers = {"x-app-key": s.app_key.get_secret_value(), "Accept": "application/json"}
        if auth.enterprise_id:
            headers["enterpriseId"] = auth.enterprise_id
        # The client's credentials authenticate, not user information in the URL.
        headers["Authorization"] = basic_auth(auth.client_id, auth.client_secret.get_secret_value())
        self.fetches += 1
        started = self._clock()
        # Only 404s in a row make a wrong URL: any other outcome of this request (an answer, a
        # transport error) ends their run, or 404, an outage of 5xx, 404 added up to one.
        not_found_since, self._not_found_since = self._not_found_since, None
        # The client's connect timeout still applies: a dead address fails in seconds.
        connect = min(self._client.timeout.sock_connect or math.inf, auth.timeout_s)
        # sock_read bounds each silence only: an endpoint trickling its answer a byte at a
        # time would hold the stream for ever. The whole request gets a deadline too.
        timeout = with_deadline(
            aiohttp.ClientTimeout(
                total=None, connect=auth.timeout_s, sock_connect=connect, sock_read=auth.timeout_s
            )
        )
        async with self._client.post(
            wire_url(s.token_url)[0],
            data=form,
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
        ) as resp:
            status = resp.status
            # The far end's body: only a 200's is used, and a token answer is small.
            content = await read_at_most(resp, MAX_TOKEN_RESPONSE) if status == 200 else b""
            retry_after = resp.headers.get("Retry-After")
        if status in RETRY_STATUSES:
            raise _Retryable(f"answered HTTP {status}", retry_after_seconds(retry_after))
        if status in (400, 401, 403):
            grant_fields = (
                "scope/enterprise_id" if auth.grant == "client_credentials" else "username/password"
            )
            unset = (
                " (enterprise_id is not set: OCIM environments require it with this grant)"
                if auth.grant == "client_credentials" and not auth.enterprise_id
                else ""
            )
            raise AuthError(
                f"token endpoint {self.url} refused the credentials (HTTP {status}): "
                f"check client_id/client_secret, app_key, the grant ({auth.grant}) and its "
                f"{grant_fields}{unset}"
            )
        if status == 404 and not self._answered:
            # No token endpoint at that URL: a wrong URL, retried for ever otherwise. Only once
            # 404s have lasted the token request's retries (retry_max_s) in a row: a gateway's
            # passing 404 just after a restart must not stop the daemon for good (exit 78).
            # Once it has issued a token, a 404 is passing trouble, retried as the rest.
            now = self._clock()
            since = self._not_found_since = now if not_found_since is None else not_found_since
            if auth.token_url:  # a URL with a path of its own: the gateway advice misleads
                advice = (
                    "check auth.token_url (the full URL of the token endpoint, path and all; "
                    "unset it to use {gateway_url}/oauth/v1/tokens)"
                )
            else:
                advice = (
                    "check gateway_url (the gateway URL of the portal's environment card, "
                    "nothing after the host; the token endpoint is "
                    "{gateway_url}/oauth/v1/tokens)"
                )
            raise AuthError(
                f"token endpoint {self.url} answered HTTP 404 (no such endpoint): {advice}",
                retriable=now - since < auth.retry_max_s,
            )
        if status != 200:
            raise AuthError(f"token endpoint {self.url} answered HTTP {status}", retriable=True)
        try:
            body = json.loads(content)
            value = body["access_token"]
            expires_in = body.get("expires_in")
            if expires_in is None:  # null says no more than no expires_in at all
                expires_in = _DEFAULT_LIFETIME_S
            if isinstance(expires_in, bool):  # float(True) is a 1 s token: rotated twice a second
                raise TypeError("expires_in is a boolean, not a number of seconds")
            lifetime = float(expires_in)
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            raise AuthError(
                f"token endpoint {self.url} sent an unusable response: {describe(exc)}",
                retriable=True,
            ) from None
        if not isinstance(value, str) or not value:
            raise AuthError(f"token endpoint {self.url} sent no access_token", retriable=True)
        if unusable := _unusable(value):
            # Never quoted: it may be a real token with one bad character.
            raise AuthError(
                f"token endpoint {self.url} sent an unusable access_token ({unusable})",
                retriable=True,
            )
        if not math.isfinite(lifetime) or lifetime < _MIN_LIFETIME_S:
            raise AuthError(
                f"token endpoint {self.url} sent an unusable expires_in", retriable=True
            )
        lifetime = min(lifetime, _MAX_LIFETIME_S)  # refreshed at least daily, whatever it says
        REDACTOR.add_token(value, lifetime)
        self._answered = True
        log.info("token obtained", lifetime_s=lifetime)
        return Token(value, started + lifetime, lifetime)


def _unusable(token: str) -> str | None:
    """Why ``token`` cannot be used (without quoting it), or None."""
    low, high = TOKEN_CHARS
    if not low <= len(token) <= high:
        return f"length {len(token)}, not {low} to {high}"
    if not (token.isascii() and token.isprintable()) or " " in token:
        return "a space, control or non-ASCII character in it"
    if max(map(len, secret_forms(token))) > SCRUB_MARGIN:
        # An error text cut for a log line is masked SCRUB_MARGIN past the cut: a token longer
        # than that (as an encoder may escape it, or inside a base64) across the cut would
        # show its start.
        return f"longer than the {SCRUB_MARGIN} characters a log line's masking reaches"
    return None
