"""consumer.core.templates: parsing, the shape rules of each destination, token values."""

from __future__ import annotations

import pytest

from consumer.core.templates import (
    KEY_UNSAFE,
    SUBJECT_UNSAFE,
    TOKEN_MAX_CHARS,
    TOKENS,
    Template,
    TemplateError,
    UnsafeChars,
    check_key,
    check_stream_name,
    check_subject,
    cut,
    hash_tag,
    replace_unsafe,
    sanitise,
)


def test_a_template_is_parsed_into_literals_and_tokens() -> None:
    t = Template("opera:{{{chainCode}}}:{hotelId}.x")
    assert [field for _, field in t.parts if field] == ["chainCode", "hotelId"]
    assert t.tokens == {"chainCode", "hotelId"}
    assert t.render({"chainCode": "DEMO", "hotelId": "H1"}) == "opera:{DEMO}:H1.x"
    assert t.sample() == "opera:{x}:x.x"
    assert Template("").parts == () and Template("").render({}) == ""
    every = Template(".".join("{" + token + "}" for token in TOKENS))
    assert every.tokens == set(TOKENS)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("opera.{unknown}", "unknown token {unknown}"),
        ("opera.{}", "unknown token {}"),
        ("opera.{0}", "unknown token {0}"),
        ("opera.{hotelId!r}", "unknown token {hotelId!r}"),
        ("opera.{hotelId:>5}", "unknown token {hotelId:>5}"),
        ("opera.{", "'{'"),
        ("opera.}", "'}'"),
        ("opera.{{x", None),  # a literal brace: fine
    ],
)  # fmt: skip
def test_unknown_tokens_and_lone_braces_are_refused(text: str, says: str | None) -> None:
    if says is None:
        assert Template(text).render({}) == "opera.{x"
        return
    with pytest.raises(TemplateError) as info:
        Template(text)
    assert says in info.value.what
    assert "{{ or }}" in info.value.fix
    message = info.value.at("sink.subject", text)
    assert message.startswith(f"sink.subject {text!r}: ") and " -> " in message


def test_the_shape_of_a_subject() -> None:
    check_subject(Template("opera.{chainCode}.{hotelId}.{eventName}"))
    check_subject(Template("x.{chainCode}-{stream}.{{y}}"))  # a brace is a subject character
    for bad in ("", "opera..{hotelId}", "opera.{hotelId}.", ".opera", "opera.*.{hotelId}",
                "opera.>", "opera {hotelId}", "opera.\x7f"):  # fmt: skip
        with pytest.raises(TemplateError):
            check_subject(Template(bad))
    check_stream_name("OPERA-1_x")
    for bad in ("", "A.B", "A*", "A>", "A B", "A/B", "A\\B", "A\tB"):
        with pytest.raises(TemplateError, match="JetStream stream name"):
            check_stream_name(bad)


def test_the_braces_of_a_stream_key() -> None:
    assert hash_tag("opera:{DEMO}:x") == "DEMO"
    assert hash_tag("opera:{}:{DEMO}") is None  # the first brace decides: the whole key
    assert hash_tag("opera:DEMO") is None
    check_key(Template("opera:{chainCode}"))
    check_key(Template("opera:{{{chainCode}}}:{hotelId}"))
    check_key(Template("opera:guard:{hotelId}"))  # no hash tag: its guards hold braces
    check_key(Template("opera:{{{chainCode}}}:{hotelId}:guard"))
    for bad in ("", "opera:{{}}{chainCode}", "}}x{chainCode}", "opera:{{x",
                "opera:{{{chainCode}}}:guard:{hotelId}", "{{x}}:guard:y"):  # fmt: skip
        with pytest.raises(TemplateError):
            check_key(Template(bad))


def test_unsafe_characters_are_each_destinations_own() -> None:
    assert "." in SUBJECT_UNSAFE and "{" not in SUBJECT_UNSAFE
    assert "{" in KEY_UNSAFE and "." not in KEY_UNSAFE
    for common in (" ", "\t", "\n", "\x00", "\x7f", "\x85", "\u2003", "\ud800"):
        assert common in SUBJECT_UNSAFE and common in KEY_UNSAFE
    assert "\u200b" in KEY_UNSAFE and "\u200b" not in SUBJECT_UNSAFE  # unprintable, not space
    assert "é" not in SUBJECT_UNSAFE and "é" not in KEY_UNSAFE
    assert 1 not in SUBJECT_UNSAFE
    value = "a.b*c>d{e}f g\th\x00i\u200bj"
    assert replace_unsafe(value, SUBJECT_UNSAFE) == "a_b_c_d{e}f_g_h_i\u200bj"
    assert replace_unsafe(value, KEY_UNSAFE) == "a.b*c>d_e_f_g_h_i_j"
    assert replace_unsafe("abcd e", UnsafeChars("bc")) == "a__d_e"  # whitespace always
    assert replace_unsafe("HOTEL1", SUBJECT_UNSAFE) == "HOTEL1"


def test_sanitise_fills_empty_values_and_hashes_long_ones() -> None:
    for unsafe in (SUBJECT_UNSAFE, KEY_UNSAFE):
        for hash_raw in (True, False):
            assert sanitise("", unsafe, hash_raw=hash_raw) == "_"
            assert sanitise(None, unsafe, hash_raw=hash_raw) == "_"
            assert sanitise("Zoë", unsafe, hash_raw=hash_raw) == "Zoë"
            long_a, long_b = "H" * 300, "H" * 299 + "I"
            a, b = (sanitise(v, unsafe, hash_raw=hash_raw) for v in (long_a, long_b))
            assert len(a) == len(b) == TOKEN_MAX_CHARS
            assert a != b and a.startswith("H" * 111 + "~")  # cut, kept apart by a hash
            assert sanitise("H" * TOKEN_MAX_CHARS, unsafe, hash_raw=hash_raw) == "H" * 128
    assert cut("x" * TOKEN_MAX_CHARS) == "x" * TOKEN_MAX_CHARS
    assert cut("\ud800" * 200) != cut("\udfff" * 200)  # a lone surrogate can be hashed


def test_the_hash_is_of_the_raw_or_of_the_sanitised_value() -> None:
    """NATS hashes the value as given, Redis the value once sanitised: two long values that
    differ only in an unsafe character stay apart on NATS and meet on Redis (as always)."""
    dotted, spaced = "a" * 200 + ".", "a" * 200 + " "
    assert sanitise(dotted, KEY_UNSAFE, hash_raw=True) != sanitise(
        spaced, KEY_UNSAFE, hash_raw=True
    )
    assert sanitise("a" * 200 + "{", KEY_UNSAFE, hash_raw=False) == sanitise(
        "a" * 200 + "}", KEY_UNSAFE, hash_raw=False
    )
    assert "." not in sanitise("." * 500, SUBJECT_UNSAFE, hash_raw=True)
