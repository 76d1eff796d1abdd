"""consumer.http_client: the URL as written goes on the request line; URL credentials become
Basic auth the caller places."""

from __future__ import annotations

import base64

from consumer.http_client import ERROR_BODY_BYTES, basic_auth, error_excerpt, wire_url
from consumer.logs import Redactor


def test_escapes_and_reserved_characters_stay_as_written() -> None:
    """yarl alone would turn %2F in a query into "/" and %7e into "~": a signed URL breaks."""
    url, auth = wire_url("https://h.example.com/a%2Fb/c?sig=s1g%2Bv4l%2Fue%3D9&x=%7e&y=a+b")
    assert url.raw_path_qs == "/a%2Fb/c?sig=s1g%2Bv4l%2Fue%3D9&x=%7e&y=a+b"
    assert auth is None


def test_what_cannot_travel_is_percent_encoded() -> None:
    url, _ = wire_url("http://127.0.0.1:8080/zoë/?q=«1»&p=50%&r=%zz#frag")
    assert url.raw_path_qs == "/zo%C3%AB/?q=%C2%AB1%C2%BB&p=50%25&r=%25zz"
    assert url.raw_fragment == ""  # a fragment is not sent
    assert url.port == 8080


def test_the_host_is_idna_encoded_and_the_default_port_implied() -> None:
    url, _ = wire_url("https://Bücher.example/x")
    assert str(url) == "https://xn--bcher-kva.example/x"
    assert url.port == 443


def test_user_information_leaves_the_url_as_basic_auth() -> None:
    url, auth = wire_url("https://op%40era:p%3Ass%20w@h.example.com/hook?k=v")
    assert str(url) == "https://h.example.com/hook?k=v"
    assert auth == basic_auth("op@era", "p:ss w")
    assert auth == "Basic " + base64.b64encode(b"op@era:p:ss w").decode()


def test_basic_auth_is_utf8_and_takes_any_user_name() -> None:
    """aiohttp's encode_basic_auth refuses a colon in the user name (httpx sent it)."""
    assert basic_auth("a:b", "pé") == "Basic " + base64.b64encode("a:b:pé".encode()).decode()


TOKEN = "eyJhbGciOiJIUzI1NiJ9." + "eyJzY29wZSI6IndlYmhvb2sifQ" * 56 + ".c2lnbmF0dXJlLWhtYWM"


def test_an_error_body_the_read_cut_shows_no_piece_of_a_secret_at_its_end() -> None:
    """An answer echoing the token over and over, read up to ERROR_BODY_BYTES: scrubbed, its
    whole copies shrink to "***", and the copy the read cut in two, left at its end, was within
    the excerpt. The end of a body the read cut is never shown; a shorter body's is."""
    redactor = Redactor()
    redactor.add(f"Bearer {TOKEN}", TOKEN)
    body = (f"Bearer {TOKEN}\n" * 80).encode()[:ERROR_BODY_BYTES]  # as read_at_most reads it
    assert not body.endswith(TOKEN.encode() + b"\n")  # the read cut a copy in two
    excerpt = error_excerpt(body, redactor.scrub, 300)
    leaked = [TOKEN[i : i + 12] for i in range(len(TOKEN) - 11) if TOKEN[i : i + 12] in excerpt]
    assert not leaked, excerpt
    whole = (f"Bearer {TOKEN}\n" * 3 + "tail").encode()  # read to its end
    assert error_excerpt(whole, redactor.scrub, 300) == "***\n***\n***\ntail"
    page = ("<html>" + "x" * ERROR_BODY_BYTES).encode()[:ERROR_BODY_BYTES]  # no secret in it
    assert error_excerpt(page, redactor.scrub, 300) == "<html>" + "x" * 294
