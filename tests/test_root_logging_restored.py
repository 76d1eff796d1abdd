"""The suite's own hygiene: a test that configures logging onto its captured stderr leaves no
handler on that stream for the tests after it (conftest's ``_root_logging``). The two tests run
in this order (pytest keeps a file's order)."""

import logging

import pytest

import consumer.logs


def test_configure_onto_the_tests_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    consumer.logs.configure("info", "json")
    logging.getLogger("first").warning("first record")
    assert "first record" in capsys.readouterr().err


def test_a_later_record_meets_no_closed_stream(capsys: pytest.CaptureFixture[str]) -> None:
    logging.getLogger("second").warning("second record")
    assert "Logging error" not in capsys.readouterr().err
