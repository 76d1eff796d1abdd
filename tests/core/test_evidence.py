"""Bounded copies of wire text: masked by the log redactor before they are cut."""

from __future__ import annotations

from consumer.core.evidence import SCRUB_MARGIN, masked
from consumer.logs import Redactor

SECRET = "s3cr3t-" + "T" * 93  # 100 characters, as a token


def redactor() -> Redactor:
    r = Redactor()
    r.add(SECRET)
    return r


def test_a_secret_across_the_cut_is_masked_whole() -> None:
    text = "x" * 90 + SECRET + "y" * 50
    assert masked(text, 100, redactor().scrub) == "x" * 90 + "***" + "y" * 7
    assert masked(text.encode(), 100, redactor().scrub) == "x" * 90 + "***" + "y" * 7


def test_no_piece_of_a_secret_past_the_masked_start_moves_before_the_cut() -> None:
    """A text that repeats the secret: masked, its start shrinks to a thirtieth, and the end
    of what was masked, a secret cut in two, would come before the cut if that were all."""
    repeats = 200  # past the first SCRUB_MARGIN characters after the cut, masked to 600
    assert repeats * len(SECRET) > 300 + SCRUB_MARGIN
    text = SECRET * repeats + "tail"
    out = masked(text, 300, redactor().scrub)
    assert out == "***" * 100
    assert "s3cr" not in out and "TTTT" not in out
    assert masked(text, 10_000, redactor().scrub) == "***" * repeats + "tail"


def test_the_end_of_a_text_a_read_cut_is_never_shown() -> None:
    """``cut``: the text is the start of a longer one (a body read up to a limit): the copy of
    the secret its end cut in two, left whole by the mask, is never shown, however much the
    mask shrank what comes before it; the rest is, as far as SCRUB_MARGIN from that end."""
    read = (SECRET * 40)[:-37]  # the read cut the last copy
    assert masked(read, 300, redactor().scrub) == "***" * 39 + SECRET[:63]  # all of it kept
    assert masked(read, 300, redactor().scrub, cut=True) == ""  # its end could be a secret's
    text = SECRET * 39 + "x" * (SCRUB_MARGIN + 500) + SECRET[:63]
    assert masked(text, 300, redactor().scrub, cut=True) == "***" * 39 + "x" * 183
    assert masked("x" * 100_000, 300, redactor().scrub, cut=True) == "x" * 300
