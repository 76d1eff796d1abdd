"""The command line itself (issue #13): -V, defaults and the exit-status footer in every
help, tables that show values as they are, and a reader that goes away (`| head -1`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from support import first_line_then_close, read_table, toml_config

from consumer import __version__
from consumer.cli import _parser, main
from consumer.commands.output import CELL_LIMIT, emit

FOOTER = "exit status: 0 ok, 1 runtime failure"


def parsers(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command, command group and action, with its path of names."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_the_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main([flag])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"opera-consumer {__version__}"


def test_every_command_group_and_action_has_the_exit_status_footer() -> None:
    found = dict(parsers(_parser()))
    assert {("dlq",), ("dlq", "replay"), ("offset",), ("offset", "set"), ("sink", "adopt")} <= set(
        found
    )
    for path, parser in found.items():
        assert FOOTER in parser.format_help(), " ".join(path)


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["sandbox", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 8765)" in text and "(default: 127.0.0.1)" in text
    assert "(default: DEMO)" in text and "(default: 0.0)" in text  # 0.0 is shown too
    assert "(default: False)" not in text and "(default: None)" not in text
    with pytest.raises(SystemExit):
        main(["preflight", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: ./config.toml" in text  # said by its help, not repeated
    assert "(default: None)" not in text


def test_a_table_keeps_values_as_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue #13: CHECK OUT was shown as CHECK_OUT, "offset 104190" as offset_104190."""
    rows = [
        {"event": "CHECK OUT", "next": "offset 104190", "n": 1, "none": None, "empty": ""},
        {"event": "NEW RESERVATION", "next": "highest", "n": 22, "none": None, "empty": ""},
    ]
    emit(rows, ["event", "next", "n", "none", "empty"], as_json=False)
    out = capsys.readouterr().out
    assert read_table(out) == [
        {"event": "CHECK OUT", "next": "offset 104190", "n": "1", "none": "-", "empty": '""'},
        {"event": "NEW RESERVATION", "next": "highest", "n": "22", "none": "-", "empty": '""'},
    ]
    header, first, second = out.splitlines()
    assert header.index("next") == first.index("offset") == second.index("highest")  # aligned


def test_a_table_neutralises_hostile_values(capsys: pytest.CaptureFixture[str]) -> None:
    """Values come from the wire: a terminal escape, a newline or a bidi override must not
    reach the terminal, and a huge one is cut (--json keeps it whole)."""
    hostile = "EVIL\x1b[2J\x1b]0;owned\x07\nNEXT\u202eLINE"
    emit([{"name": hostile, "big": "x" * 10_000}], ["name", "big"], as_json=False)
    out = capsys.readouterr().out
    _, row = out.splitlines()  # the newline did not start a row
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "EVIL\\x1b[2J\\x1b]0;owned\\x07\\nNEXT\\u202eLINE" in row
    assert row.endswith("x" * CELL_LIMIT + "…")
    emit([{"name": hostile}], ["name"], as_json=True)
    assert '"EVIL\\u001b[2J' in capsys.readouterr().out  # JSON: escaped, and whole


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """Accepts connections and never answers: a gateway that hangs the WebSocket opening."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_a_reader_that_goes_away_gets_no_traceback(sandbox_factory, tmp_path: Path):
    """Issue #13: `preflight | head -1` ended in a BrokenPipeError traceback. The token comes
    from the sandbox (the first line, at once); the gateway hangs its opening for 2 s, so
    the next line is written after the reader has gone."""
    gw = await sandbox_factory()
    async with silent_server() as port:
        config = toml_config(
            tmp_path, f"http://127.0.0.1:{port}", connection={"open_timeout_s": 2.0}
        )
        text = config.read_text()
        auth = "[streams.main.auth]\n"
        assert auth in text
        config.write_text(text.replace(auth, f'{auth}token_url = "{gw.url}/oauth/v1/tokens"\n'))
        preflight = [sys.executable, "-m", "consumer", "preflight", "--config", str(config)]
        line, err, code = await asyncio.to_thread(first_line_then_close, preflight)
    assert line.startswith("PASS") and "token" in line
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert "Exception ignored" not in err, err
    assert code == 141  # 128 + SIGPIPE, as a shell reports a filter killed by it


def test_an_unexpected_error_is_one_line_and_exit_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README "Commands and exit status": 70 for an unexpected internal error (a bug). It was
    a traceback and exit 1. The line names the error, scrubbed of the registered secrets; the
    traceback goes to the log, through the redactor."""
    from log_capture import captured_logs

    from consumer import config
    from consumer.logs import REDACTOR

    secret = "internal-S3cret-0001"
    REDACTOR.add(secret)

    def broken(path: Path | None, **kwargs: object) -> None:
        raise RuntimeError(f"a bug holding {secret}\nand a second line")

    monkeypatch.setattr(config, "load_settings", broken)  # the command line imports it late
    with captured_logs() as log:
        assert main(["check-config"]) == 70
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("opera-consumer: unexpected internal error (RuntimeError: a bug")
    assert "Traceback" not in err and secret not in err
    assert "\\n" in err  # the message's newline escaped: one line
    logged = log.getvalue()
    assert "unexpected internal error" in logged and "Traceback" in logged
    assert secret not in logged


def test_an_error_that_holds_text_from_a_server_is_masked_escaped_and_bounded(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refusal (exit 78 and the like) says what is wrong in our words, but a library's or a
    server's text can be part of them: a registered secret is masked, a terminal escape
    written out, the whole bounded; the lines of a config error stay lines."""
    from consumer import config
    from consumer.errors import ConfigError
    from consumer.logs import REDACTOR

    secret = "refusal-S3cret-0002"
    REDACTOR.add(secret)

    def refused(path: Path | None, **kwargs: object) -> None:
        raise ConfigError(f"the server said \x1b[2J{secret}\nsubjects: " + "s." * 50_000)

    monkeypatch.setattr(config, "load_settings", refused)
    assert main(["check-config"]) == 78
    _, err = capsys.readouterr()
    assert secret not in err and "\x1b" not in err and "\\x1b[2J" in err
    assert err.count("\n") == 2  # its two lines, then the end of the message
    assert len(err) < 5_000


def test_an_error_repeating_a_secret_shows_no_piece_of_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A message that repeats a registered secret: cut at 8,000 characters before it was
    masked, the whole copies shrank to "***" and the copy at the cut was left as its prefix
    within the 4,000 characters shown."""
    from consumer import config
    from consumer.errors import ConfigError
    from consumer.logs import REDACTOR

    secret = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
    REDACTOR.add(secret)
    said = "the server said: " + (secret + " ") * 200
    assert (8000 - len("the server said: ")) % (len(secret) + 1) > 8  # a copy across 8,000

    def refused(path: Path | None, **kwargs: object) -> None:
        raise ConfigError(said)

    monkeypatch.setattr(config, "load_settings", refused)
    assert main(["check-config"]) == 78
    _, err = capsys.readouterr()
    assert "the server said: *** ***" in err, err
    leaked = [secret[i : i + 8] for i in range(len(secret) - 7) if secret[i : i + 8] in err]
    assert not leaked, err


@pytest.mark.parametrize("late", [KeyboardInterrupt, SystemExit])
def test_a_late_interrupt_in_the_loops_teardown_keeps_the_daemons_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, late: type[BaseException]
) -> None:
    """Once the daemon's run has returned (its signal handlers removed, Python's SIGINT handler
    back), a ^C during asyncio.run's own teardown was taken for a task's escape: exit 70 in
    place of the daemon's 78, and systemd's Restart=on-failure restarted a daemon that had
    said not to. Here the daemon chooses 78 and a task left behind raises as the loop cancels
    it, as the late ^C does."""
    from consumer.cli import _run
    from consumer.config import load_settings
    from consumer.errors import ExitCode
    from consumer.runtime import daemon

    async def run(settings: object) -> int:
        async def left_behind() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                raise late()

        asyncio.get_running_loop().create_task(left_behind())
        await asyncio.sleep(0)
        return ExitCode.CONFIG

    monkeypatch.setattr(daemon, "run", run)
    settings = load_settings(toml_config(tmp_path, "http://127.0.0.1:9"))
    assert _run(settings) == ExitCode.CONFIG
