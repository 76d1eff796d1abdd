"""Command line: ``opera-consumer run | check-config | status | preflight | dlq | offset | sink |
fleet | sandbox``.

Exit status: 0 success; 1 a runtime failure (e.g. the state store cannot be read, or a
preflight check failed); 2 bad
command-line usage; 70 an unexpected internal error; 78 a configuration error, or every stream
stopped on something only an operator can fix (systemd: ``RestartPreventExitStatus=78``);
130 a second SIGINT/SIGTERM cut the drain short; 141 the output's reader went away (``| head``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import early_signals
from .errors import (
    ExitCode,
    OperaConsumerError,
    SinkError,
    SinkUnusable,
    exit_code_for,
)

if TYPE_CHECKING:  # imported where used: a signal is held before they are (early_signals)
    from .config import Settings

_EPILOG = """exit status: 0 ok, 1 runtime failure or failed check, 2 usage, 70 internal error,
78 configuration error (or every stream stopped for a reason an operator must fix),
130 interrupted by a second signal, 141 the output's reader went away (e.g. | head)."""
# What a shell shows for a filter killed by SIGPIPE (128 + 13): `| head` is no failure of ours.
_EXIT_PIPE = 128 + signal.SIGPIPE


class _Help(argparse.RawDescriptionHelpFormatter):
    """The epilog as written, and every option's default where there is one to show (not
    None, not a flag's False, not one its help already states)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and "default" not in text
            and default is not None
            and default is not False
            and default is not argparse.SUPPRESS
        ):
            text += " (default: %(default)s)"
        return text


def _add(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
    """A command (or an action of a command group) with its help, the exit-status footer and
    the defaults shown."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=text, description=text, epilog=_EPILOG, formatter_class=_Help
    )
    return parser


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="opera-consumer",
        description="Consume OPERA Cloud business events from the OHIP Streaming API.",
        epilog=_EPILOG,
        formatter_class=_Help,
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--config",
            type=Path,
            default=None,
            help="TOML config file (default: ./config.toml, then /etc/opera-consumer/config.toml); "
            "OPERA_CONSUMER_* environment variables override it",
        )
        return p

    with_config(_add(sub, "run", "run the daemon until SIGTERM/SIGINT"))
    with_config(
        _add(
            sub,
            "check-config",
            "validate the configuration without connecting; print it with secrets masked and "
            "relative paths resolved against the config file's directory",
        )
    )
    status = with_config(
        _add(
            sub,
            "status",
            "per stream: checkpoint offset, its event and commit times, processed and DLQ "
            "counts; the running daemon's state, events/s, lag and time to catch up",
        )
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--watch", action="store_true", help="refresh in place until Ctrl-C (like top)"
    )
    status.add_argument(
        "--interval", type=_positive, default=2.0, help="seconds between refreshes (--watch)"
    )
    status.add_argument(
        "--count", type=_int_from(1), help="stop after this many refreshes (--watch)"
    )
    with_config(
        _add(
            sub,
            "preflight",
            "walk the pre-go-live checklist per stream (never subscribes, changes nothing); "
            "1 on a failure",
        )
    )

    _dlq_parser(sub, with_config)
    _offset_parser(sub, with_config)
    _fleet_parser(sub, with_config)
    sink = _add(sub, "sink", "the sink's own data: adopt an existing jsonl file")
    sink_cmds = sink.add_subparsers(dest="sink_command", required=True, metavar="ACTION")
    adopt = with_config(
        _add(
            sink_cmds,
            "adopt",
            "record the jsonl file's length as committed and its lines' uniqueEventIds as "
            "processed (after a new or replaced state store); plan unless --execute",
        )
    )
    adopt.add_argument("--execute", action="store_true", help="apply it (default: print it)")

    sb = _add(
        sub, "sandbox", "run a local OHIP gateway emulator on 127.0.0.1 (for demos and tests)"
    )
    sb.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free port)")
    sb.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0 only inside a container network)",
    )
    sb.add_argument("--chains", default="DEMO", help="comma-separated chain codes")
    sb.add_argument("--backlog", type=int, default=1000, help="events already waiting per chain")
    sb.add_argument("--rate", type=float, default=5.0, help="new events per second per chain")
    sb.add_argument("--seed", type=int, default=1, help="seed for the generated events")
    sb.add_argument("--token-ttl", type=float, default=3600.0, help="token lifetime, seconds")
    sb.add_argument("--ping-interval", type=float, default=15.0, help="server ping period, s")
    sb.add_argument(
        "--stale-hold",
        type=float,
        default=0.0,
        help="seconds a stream stays locked (4409) after a connection drops without complete",
    )
    sb.add_argument(
        "--resubscribe-gap",
        type=float,
        default=0.0,
        help="seconds after a subscription was completed and closed during which a new "
        "subscribe to its chain gets 4409 (OHIP's gap; 0: none)",
    )
    sb.add_argument(
        "--subscribe-deadline",
        type=float,
        default=0.0,
        help="close with 4408 a connection that has not subscribed this many seconds after "
        "connection_init (OHIP: 10; 0: never)",
    )
    sb.add_argument(
        "--rest-rate",
        type=float,
        default=0.0,
        help="REST resource requests per second before 429 (0: unlimited)",
    )
    sb.add_argument("--rest-burst", type=int, default=5, help="REST requests allowed at once")
    sb.add_argument(
        "--fast-backlog",
        action="store_true",
        help="benchmarks: events made from templates (microseconds each) and the backlog sent "
        "as WebSocket frames built once, so a client, not the sandbox, is the bottleneck",
    )
    sb.add_argument(
        "--live-timestamps",
        action="store_true",
        default=True,
        help="the default: the backlog ends at the start and new events (--rate) carry the "
        "current time (UTC, microseconds), so a consumer's lag and end-to-end latency are true",
    )
    sb.add_argument(
        "--fixed-timestamps",
        dest="live_timestamps",
        action="store_false",
        default=argparse.SUPPRESS,  # not "(default: True)": the default is --live-timestamps
        help="every event's timestamp from a clock starting on a day of 2024 (the same events "
        "at every start)",
    )
    return parser


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"{text}: a number of seconds above 0")
    return value


def _int_from(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text}: at least {low}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'x'"
    return parse


# `dlq list` shows this many unless told otherwise: a queue of 100,000 rows took 280 MB to list.
LIST_LIMIT = 1000


def _dlq_parser(sub: Any, with_config: Any) -> None:
    dlq = _add(sub, "dlq", "the dead-letter queue: list, show, replay, purge")
    cmds = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    def filters(p: argparse.ArgumentParser, *, when: str) -> argparse.ArgumentParser:
        p.add_argument("--stream", help="only this stream")
        p.add_argument("--reason", help="only this reason (malformed, sink_rejected, parked, ...)")
        if when == "since":
            p.add_argument("--since", help="only since: ISO date/time (UTC) or an age: 30m, 6h, 7d")
        else:
            p.add_argument(
                "--before", help="only older than: ISO date/time (UTC) or an age: 30m, 6h, 7d"
            )
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    listing = filters(with_config(_add(cmds, "list", "dead letters, oldest first")), when="since")
    listing.add_argument(
        "--limit",
        type=_int_from(0),
        default=LIST_LIMIT,
        help=f"at most this many (default {LIST_LIMIT}; 0: all of them)",
    )
    show = with_config(_add(cmds, "show", "one dead letter: error and raw payload"))
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true", help="machine-readable output")
    for name, verb in (
        ("replay", "re-deliver dead letters through the sink"),
        ("purge", "delete dead letters"),
    ):
        p = filters(
            with_config(_add(cmds, name, f"{verb} (IDs, or --all)")),
            when="since" if name == "replay" else "before",
        )
        p.add_argument("ids", type=int, nargs="*", metavar="ID")
        p.add_argument("--all", action="store_true", help="every dead letter the filters match")
        p.add_argument("--dry-run", action="store_true", help="show what would happen, do nothing")


def _offset_parser(sub: Any, with_config: Any) -> None:
    off = _add(
        sub, "offset", "a stream's resume position: show, set, reset (plan unless --execute)"
    )
    cmds = off.add_subparsers(dest="offset_command", required=True, metavar="ACTION")
    show = with_config(_add(cmds, "show", "checkpoints and pending resets"))
    show.add_argument("--json", action="store_true", help="machine-readable output")
    set_ = with_config(_add(cmds, "set", "resume STREAM at OFFSET (inclusive)"))
    set_.add_argument("stream")
    set_.add_argument("offset")
    reset = with_config(_add(cmds, "reset", "skip STREAM's backlog: --highest"))
    reset.add_argument("stream")
    reset.add_argument(
        "--highest", action="store_true", required=True, help="resume at the newest event"
    )
    for p in (set_, reset):
        p.add_argument("--execute", action="store_true", help="apply the plan (default: print it)")
        p.add_argument("--json", action="store_true", help="machine-readable output")


def _fleet_parser(sub: Any, with_config: Any) -> None:
    fleet = _add(
        sub,
        "fleet",
        "fleet mode ([fleet] enabled): members and stream leases; drain or forget a member",
    )
    cmds = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    status = with_config(
        _add(
            cmds,
            "status",
            "members (live, draining, gone; share, streams held) and streams (holder, "
            "lease expiry, checkpoint, lag)",
        )
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    drain = with_config(
        _add(
            cmds,
            "drain",
            "mark MEMBER draining: its share becomes 0, it hands its streams over "
            "gracefully at its next tick and the others take them (--undo: clear it)",
        )
    )
    drain.add_argument("member", help="the member's name, as `fleet status` shows it")
    drain.add_argument("--undo", action="store_true", help="clear the flag: a share again")
    forget = with_config(
        _add(
            cmds,
            "forget",
            "remove a gone member's row (its heartbeat expired) and its draining flag: a "
            "retired host or an old name; a live member is refused",
        )
    )
    forget.add_argument("member", help="the member's name, as `fleet status` shows it")


def main(argv: Sequence[str] | None = None) -> int:
    early_signals.hold()  # first: a signal while the daemon's dependencies load must not kill it
    try:
        args = _parser().parse_args(argv)
        if args.command == "dlq" and args.dlq_command == "replay":
            # Its SIGTERM/SIGHUP cancel it once its loop runs (as ^C does): what it delivered
            # is recorded however it ends. Held till then; ^C is asyncio.run's.
            early_signals.release(keep=early_signals.REPLAY_SIGNALS)
        elif args.command != "run":
            early_signals.release()  # not the daemon: a signal acts as it always has
        return _flushed(_main(args))
    finally:
        early_signals.release(deliver=False)  # the daemon took it, or ended without starting


def _flushed(code: int) -> int:
    """``code``, with what is buffered for stdout and stderr written now. The interpreter
    flushes them at exit and makes a failure exit status 120: a reader of our log gone (a dead
    journald pipe) turned a clean stop's 0 into 120, a failure to systemd. What cannot be
    written goes to /dev/null (the interpreter's own flush then succeeds)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError), open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), stream.fileno())
    return code


def _main(args: argparse.Namespace) -> int:
    try:
        return _command(args)
    except OperaConsumerError as exc:  # one line, saying what is wrong and the fix
        print(f"opera-consumer: {_said(exc)}", file=sys.stderr)
        return exit_code_for(exc)
    except BrokenPipeError:
        # The reader of our output went away (`preflight | head -1`): nothing is wrong
        # with us, so no traceback. Point stdout at /dev/null, or the interpreter's final
        # flush of what is still buffered would fail again.
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), sys.stdout.fileno())
        return _EXIT_PIPE
    except Exception as exc:  # a bug of ours: one line and EX_SOFTWARE, not a traceback
        return _internal_error(exc)


def _said(exc: Exception, limit: int = 4000) -> str:
    """An error's own words for stderr: the registered secrets masked, each line escaped (a
    server's text may hold terminal escapes), the whole bounded. Our messages carry only
    bounded pieces of what servers say; this holds whatever a library put in them."""
    from .core.evidence import masked
    from .core.printable import printable
    from .logs import REDACTOR

    text = masked(str(exc), limit + 1, REDACTOR.scrub)  # masked before the cut
    lines = text[:limit].split("\n")
    return "\n".join(printable(line, limit) for line in lines) + ("…" if len(text) > limit else "")


def _internal_error(exc: Exception) -> int:
    """One line on stderr (scrubbed of the registered secrets, escaped, bounded); the
    traceback in the log where the command logs (``run``, ``preflight``: through the redactor),
    as the daemon logs a failed task."""
    import structlog

    from .core.printable import printable
    from .logs import REDACTOR

    if structlog.is_configured():  # by logs.configure: the log takes the traceback
        structlog.get_logger(__name__).error("unexpected internal error", exc_info=exc)
    what = printable(REDACTOR.scrub(f"{type(exc).__name__}: {exc}"), 300)
    print(
        f"opera-consumer: unexpected internal error ({what}): a bug; please report it "
        "(safe to restart: the state stays consistent)",
        file=sys.stderr,
    )
    return ExitCode.SOFTWARE


def _command(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "sandbox":
        return _sandbox(args)
    import asyncio

    from .config import effective, find_config, load_settings

    delivers = _delivers(args)
    settings = load_settings(args.config, stream_secrets=_connects(args), sink_secrets=delivers)
    if delivers and command == "dlq" and settings.orchestration.enabled:
        # The replay's orchestration asks the REST API with the streams' credentials.
        from .config.loading import not_given, unset_secrets

        if unset := unset_secrets(settings):
            raise not_given(unset, "`dlq replay` with orchestration enabled")
    if command == "check-config":
        from .config.loading import not_given, unset_secrets
        from .runtime.assembly import check_sink

        check_sink(settings)  # what the sink's client library refuses, without connecting
        print(json.dumps(effective(settings), indent=2))
        for key, what, fix in settings.warnings():  # valid, but probably wrong
            print(f"warning: {key}: {what} -> {fix}", file=sys.stderr)
        found = find_config(args.config)
        source = str(found.resolve()) if found else "no config file, the environment only"
        if unset := unset_secrets(settings):  # the rest is valid: what `run` would refuse
            raise not_given(unset, f"`run` (the rest is valid; {source})")
        print(
            f"configuration OK ({source}; relative paths are resolved against "
            f"{'its directory' if found else 'the current directory'})",
            file=sys.stderr,
        )
        return ExitCode.OK
    if command == "preflight":
        return _preflight(settings)
    if command == "offset":
        from .commands import offsets

        return asyncio.run(offsets.command(settings, args))
    if command == "sink":
        from .commands.sink import adopt

        return asyncio.run(adopt(settings, execute=args.execute))
    if command == "fleet":
        from .commands import fleet

        if args.fleet_command == "drain":
            return asyncio.run(fleet.drain(settings, args.member, undo=args.undo))
        if args.fleet_command == "forget":
            return asyncio.run(fleet.forget(settings, args.member))
        return asyncio.run(fleet.status(settings, as_json=args.json))
    if command == "status":
        from .commands.status import status

        return asyncio.run(
            status(
                settings,
                as_json=args.json,
                watch=args.watch,
                interval_s=args.interval,
                count=args.count,
            )
        )
    if command == "dlq":
        from .commands import dlq  # the daemon's modules: imported only for this command

        return asyncio.run(dlq.command(settings, args))
    return _run(settings)


def _connects(args: argparse.Namespace) -> bool:
    """Whether the command needs the streams' secrets (app_key, client_secret, a password
    grant's password): only those that talk to OHIP. (A `dlq replay` needs them only when
    its orchestration asks the REST API: checked once the settings say.) The others touch
    the state store alone, and an operator's shell may not hold the secrets (systemd gives
    them to the service only)."""
    return bool(args.command in ("run", "preflight"))


def _delivers(args: argparse.Namespace) -> bool:
    """Whether the command needs the sink's secrets (a postgres sink's dsn, a webhook's token
    or password): only those that open the sink. The state store's dsn is needed by all."""
    if args.command == "dlq":
        return bool(args.dlq_command == "replay" and not args.dry_run)
    return bool(args.command in ("run", "preflight"))


def _run(settings: Settings) -> int:
    # frozenlist (aiohttp's, for its tracing signals: lists built once, never on a request's
    # path) in pure Python: its C extension is C++ and maps libstdc++, about 1 MB of the
    # daemon's resident memory for nothing (issue #12). Before anything imports aiohttp.
    os.environ.setdefault("FROZENLIST_NO_EXTENSIONS", "1")
    import asyncio

    from .event_loop import chosen, factory
    from .logs import configure
    from .runtime import daemon

    configure(settings.log.level, settings.log.format)
    finished: list[int] = []  # the daemon's own code, once its run has returned

    async def main() -> int:
        finished.append(await daemon.run(settings))
        return finished[0]

    loop = chosen(settings.event_loop, settings.sink.type)
    try:
        with asyncio.Runner(loop_factory=factory(loop)) as runner:
            return runner.run(main())
    except (SystemExit, KeyboardInterrupt) as exc:
        if finished:
            # After the daemon's run (its signal handlers gone, Python's SIGINT one back): a ^C
            # in asyncio.run's own teardown. The daemon chose its code; a 78 must stay a 78.
            return finished[0]
        # Out of some task (sys.exit() in a sink library's or a handler's own task; never the
        # daemon's: its signals are handled, a second one is os._exit): asyncio lets these end
        # the event loop, which then stopped the daemon as it could. Their code is not ours:
        # a 0 would tell systemd we stopped on request, and Restart=on-failure would not act.
        import structlog

        from .core.evidence import describe

        structlog.get_logger(__name__).error(
            "a task raised this past the daemon; the event loop ended under it",
            error=describe(exc),
            exit_code=int(ExitCode.SOFTWARE),
        )
        return ExitCode.SOFTWARE
    except SinkUnusable:
        raise  # the sink's data is not what was committed: 78, one line
    except SinkError as exc:  # e.g. the database is down at start: let the supervisor retry
        print(f"opera-consumer: cannot open the sink: {_said(exc)}", file=sys.stderr)
        return ExitCode.RUNTIME


def _preflight(settings: Settings) -> int:
    import asyncio

    from .commands import preflight
    from .logs import configure

    configure("warning", settings.log.format)  # the checklist is the output; logs only if wrong

    def show(item: preflight.Item) -> None:
        print(f"{item.level:<5} {item.stream:<12} {item.what:<18} {item.detail}", flush=True)

    ok = asyncio.run(preflight.run(settings, show))
    print("all checks passed" if ok else "some checks FAILED: see the lines above", file=sys.stderr)
    return 0 if ok else ExitCode.RUNTIME


def _sandbox(args: argparse.Namespace) -> int:
    import asyncio

    from .sandbox import SandboxOptions, run_sandbox

    options = SandboxOptions(
        host=args.host,
        port=args.port,
        chains=tuple(c.strip() for c in args.chains.split(",") if c.strip()),
        backlog=args.backlog,
        rate=args.rate,
        seed=args.seed,
        token_ttl_s=args.token_ttl,
        ping_interval_s=args.ping_interval,
        stale_hold_s=args.stale_hold,
        resubscribe_gap_s=args.resubscribe_gap,
        subscribe_deadline_s=args.subscribe_deadline,
        rest_rate=args.rest_rate,
        rest_burst=args.rest_burst,
        fast_backlog=args.fast_backlog,
        live_timestamps=args.live_timestamps,
    )
    try:
        asyncio.run(run_sandbox(options))
    except OSError as exc:
        print(f"opera-consumer sandbox: {exc}", file=sys.stderr)
        return ExitCode.RUNTIME
    return 0
