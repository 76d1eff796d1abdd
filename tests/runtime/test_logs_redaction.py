"""The log redactor and the console renderer, against what reviewers made them leak: the
101st access token of a process, a secret as a JSON encoder escapes it, a secret inside
another, and wire text with terminal escapes written raw to a terminal."""

from __future__ import annotations

import json
import logging
import os
import re

import aiohttp
import structlog
from log_capture import captured_logs

from consumer.config import StreamSettings
from consumer.core.evidence import describe
from consumer.logs import (
    MASK,
    MAX_TOKENS,
    REDACTOR,
    TOKEN_GRACE_S,
    Redactor,
    configure,
    json_escaped_forms,
)
from consumer.runtime.auth import TokenProvider
from consumer.sandbox import SandboxOptions

# What a hostile frame id or close reason carries: set the terminal's title (OSC ... BEL),
# clear the screen (CSI 2J), the one-byte C1 CSI, and a right-to-left override.
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202eevil"
FORBIDDEN = ("\x1b", "\x07", "\x9b", "\u202e")


def stream(url: str) -> StreamSettings:
    o = SandboxOptions()
    return StreamSettings.model_validate(
        {
            "gateway_url": url,
            "chain_code": "DEMO",
            "app_key": o.app_key,
            "auth": {"client_id": o.client_id, "client_secret": o.client_secret},
        }
    )


async def test_the_tokens_of_a_hundred_streams_are_all_masked(sandbox_factory) -> None:
    """The redactor kept the last 32 tokens: with 33 streams, a live token dropped out and
    the next line with it showed it. Tokens are now kept for their lifetime (plus a grace)."""
    gw = await sandbox_factory()
    async with aiohttp.ClientSession() as http:
        providers = [TokenProvider(http, stream(gw.url)) for _ in range(100)]
        values = [(await p.token()).value for p in providers]
    assert len(set(values)) == 100 and set(values) <= set(gw.issued_tokens)
    with captured_logs("json") as out:
        structlog.get_logger("t").warning("tokens", first=values[0], all=" ".join(values))
    text = out.getvalue()
    assert text.count(MASK) == 101, text[:300]
    for value in values:
        assert value not in text


def test_a_token_is_forgotten_after_its_lifetime_and_the_grace() -> None:
    now = [0.0]
    r = Redactor(clock=lambda: now[0])
    r.add_token("short-lived-token", 60.0)
    r.add_token("day-long-token-1", 86400.0)
    now[0] = 60.0 + TOKEN_GRACE_S - 1
    r.add_token("another-token-2", 60.0)  # (expired ones are dropped when one is added)
    assert r.scrub("short-lived-token day-long-token-1") == f"{MASK} {MASK}"
    now[0] = 60.0 + TOKEN_GRACE_S + 1
    r.add_token("another-token-3", 60.0)
    assert r.scrub("short-lived-token day-long-token-1") == f"short-lived-token {MASK}"


def test_the_token_memory_is_bounded_and_drops_the_soonest_to_expire() -> None:
    assert MAX_TOKENS >= 100  # far more than the live tokens (one or two a stream) of a daemon
    r = Redactor(clock=lambda: 0.0, max_tokens=50)
    r.add_token("long-lived-token", 86400.0)
    for i in range(60):
        r.add_token(f"token-{i:05d}", 60.0)
    assert r.scrub("long-lived-token") == MASK
    assert r.scrub("token-00000") == "token-00000"  # one of the soonest to expire, dropped
    assert r.scrub("token-00059") == MASK
    assert len(r._tokens) == 50


def test_a_short_token_never_masks_ordinary_words() -> None:
    r = Redactor()
    r.add_token("e", 3600.0)
    r.add("abc")
    assert r.scrub("state=streaming, abc") == "state=streaming, abc"


def test_a_secret_inside_another_leaves_nothing_of_the_longer_one() -> None:
    r = Redactor()
    r.add("abcd")
    r.add_token("xx-abcd-token-yy", 3600.0)
    assert r.scrub("[xx-abcd-token-yy] [abcd]") == f"[{MASK}] [{MASK}]"


def test_secrets_are_masked_as_json_encoders_escape_them() -> None:
    secret = 'pä"ss\\w/rd<&>'
    forms = json_escaped_forms(secret)
    php = json.dumps(secret)[1:-1].replace("/", "\\/")  # PHP: \u00e4, \/
    go = json.dumps(secret, ensure_ascii=False)[1:-1]
    go = go.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    assert {secret, php, go} <= set(forms)
    r = Redactor()
    r.add(secret)
    r.add_token("tok/en/with/slashes", 3600.0)
    for form in (secret, php, go, "tok\\/en\\/with\\/slashes"):
        assert r.scrub(f'{{"echo": "{form}"}}') == f'{{"echo": "{MASK}"}}', form


def test_secrets_are_masked_as_dotnet_and_gson_escape_them() -> None:
    """System.Text.Json writes + ' < > & ` and all non-ASCII as upper-case \\uXXXX, Gson
    < > & = ' in lower case: a receiver echoing a Basic header (its base64's + and =
    padding) or a non-ASCII password showed it (found by a review)."""

    def dotnet(text: str) -> str:
        return "".join(
            f"\\u{ord(c):04X}" if c in "+'<>&`" or ord(c) > 0x7E else "\\" + c if c in '"\\' else c
            for c in text
        )

    def gson(text: str) -> str:
        body = json.dumps(text)[1:-1]
        for c in "<>&='":
            body = body.replace(c, f"\\u{ord(c):04x}")
        return body

    basic = "b3BlcmE6UGFzcz4+d29yZDE="  # base64 of opera:Pass>>word1
    r = Redactor()
    r.add("Kennwört-Geheim", basic)
    for secret in ("Kennwört-Geheim", basic):
        for form in (dotnet(secret), gson(secret)):
            assert r.scrub(f'{{"echo": "{form}"}}') == f'{{"echo": "{MASK}"}}', form


def test_the_console_shows_wire_text_escaped() -> None:
    """On a terminal (console format) a frame id with terminal escapes was written raw: the
    terminal obeyed it (retitled, cleared). Now every value is escaped, the traceback too."""
    with captured_logs("console") as out:
        log = structlog.get_logger("t")
        log.warning("frame for an unknown subscription id ignored", id=HOSTILE, n=3)
        log.warning(HOSTILE, detail=[HOSTILE], **{HOSTILE: "key"})
        try:
            raise ValueError(HOSTILE)
        except ValueError:
            log.exception("failed")
    # The renderer's own colours are its SGR sequences (ESC [ ... m): nothing else may remain.
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())
    for c in FORBIDDEN:
        assert c not in text, (c, text)
    assert "id=\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202eevil" in text, text
    assert "ValueError: \\x1b]0;pwned" in text
    assert "Traceback (most recent call last):\n" in text  # still on its lines


def test_json_lines_escape_wire_text() -> None:
    with captured_logs("json") as out:
        structlog.get_logger("t").warning("ignored", id=HOSTILE)
    text = out.getvalue()
    for c in FORBIDDEN:
        assert c not in text, (c, text)
    assert json.loads(text)["id"] == HOSTILE


def test_the_process_redactor_is_the_one_configured() -> None:
    REDACTOR.add("process-wide-secret-7")
    with captured_logs("console") as out:
        structlog.get_logger("t").warning("x", value="process-wide-secret-7")
    assert "process-wide-secret-7" not in out.getvalue() and MASK in out.getvalue()


def test_an_error_cut_for_a_log_line_is_masked_before_the_cut() -> None:
    """describe() bounds an error at 1,000 characters; a registered secret the cut would split
    is masked first wherever describe() is called (the log's own redaction, after the cut,
    finds no whole secret to mask)."""
    secret = "cut-straddling-secret-0123456789abcdef"
    REDACTOR.add(secret)
    error = RuntimeError("x" * 980 + secret)
    with captured_logs("json") as out:
        structlog.get_logger("t").warning("failed", error=describe(error))
    said = json.loads(out.getvalue())["error"]
    assert secret[:6] not in said and MASK in said


def test_console_lines_have_colours_on_a_terminal_only() -> None:
    """The demo logs `format = "console"` to a file: it was full of colour escapes. A file
    (here a buffer) gets none; a terminal (a real pseudo-terminal) still gets them."""
    with captured_logs("console") as out:
        structlog.get_logger("t").warning("to a file", n=3)
    assert "to a file" in out.getvalue() and "\x1b" not in out.getvalue(), out.getvalue()

    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    reader, writer = os.openpty()
    try:
        with os.fdopen(writer, "w", closefd=False) as tty:
            configure("debug", "console", stream=tty)
            structlog.configure(cache_logger_on_first_use=False)
            structlog.get_logger("t").warning("to a terminal", n=3)
            tty.flush()
        shown = os.read(reader, 65536).decode(errors="replace")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**saved)
        os.close(reader)
        os.close(writer)
    assert "to a terminal" in shown and re.search(r"\x1b\[[0-9;]*m", shown), shown


class _Holder:
    def __init__(self, held: str) -> None:
        self.held = held

    def __repr__(self) -> str:
        return f"_Holder({self.held!r})"


def test_a_value_that_is_not_text_is_masked_as_it_is_written() -> None:
    """The renderers write a value that is neither text nor a number as its repr (JSON's
    fallback, the console's): an exception, bytes or an object holding a secret were written
    unmasked (the redactor looked into str, dict, list and tuple only). Each is now masked,
    and bounded: a megabyte of bytes is not written whole."""
    secret = "non-text-secret-Qz81xv"
    REDACTOR.add(secret)
    values = {
        "error": RuntimeError(f"refused {secret}"),
        "frame": f'{{"token": "{secret}"}}'.encode() + b"x" * 1_000_000,
        "held": _Holder(secret),
        "nested": {"in": [bytearray(secret.encode()), (ValueError(secret),)]},
    }
    for fmt in ("json", "console"):
        with captured_logs(fmt) as out:
            structlog.get_logger("t").warning("values", count=3, flag=True, **values)
        text = out.getvalue()
        assert secret not in text and secret[:8] not in text, text[:500]
        assert text.count(MASK) >= 5, text[:500]
        assert "refused" in text and "_Holder" in text and len(text) < 20_000
    with captured_logs("json") as out:
        structlog.get_logger("t").warning("values", count=3, flag=True, ratio=0.5, none=None)
    line = json.loads(out.getvalue())
    assert (line["count"], line["flag"], line["ratio"], line["none"]) == (3, True, 0.5, None)


def test_a_token_inside_text_echoed_as_base64_is_masked() -> None:
    """A receiver echoing the request as base64 (a debugging endpoint, a gateway's
    isBase64Encoded body) holds the token's bytes after ``Authorization: Bearer ``: at an offset
    that is not a multiple of three, so not the token's own base64. Every alignment, standard
    and URL-safe, is masked; what is left either side cannot spell the token."""
    import base64

    token = "eyJhbGciOiJSUzI1NiJ9.b64-echoed-token_Wq7"
    redactor = Redactor()
    redactor.add_token(token, 60.0)
    for before in ("", "a", "ab", "Authorization: Bearer "):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            echoed = encode(f"{before}{token}\r\nHost: x".encode()).decode()
            shown = redactor.scrub(f"echo: {echoed}")
            assert MASK in shown, shown
            for kept in shown.removeprefix("echo: ").split(MASK):
                for start in range(4):  # each place a group of four may start at
                    whole = kept[start:][: (len(kept) - start) // 4 * 4].replace("=", "A")
                    decoded = base64.b64decode(whole.replace("-", "+").replace("_", "/"))
                    assert token[:4].encode() not in decoded, (shown, decoded)
                    assert token[-4:].encode() not in decoded, (shown, decoded)
