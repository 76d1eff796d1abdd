"""The python sink: whatever a user's handler does (raises a BaseException, sys.exit(), a
TaskGroup's exception group, a CancelledError of its own, forgets an await, hangs) is a retry or
a dead letter of its event, never a dead worker or the daemon's end (contract: the daemon's exit
status is the daemon's)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator
from pathlib import Path
from typing import Any

import pysink
import pytest
from bus_events import event
from operator_support import PYSINK, dead_letters, processed_ids
from support import (
    log_records,
    make_settings,
    running,
    spawn_daemon,
    tail,
    toml_config,
    truth_ids,
    wait_exit,
    wait_until,
)

from consumer.config import PythonSinkSettings
from consumer.errors import ExitCode, PermanentSinkError, TransientSinkError
from consumer.sinks import python as python_sink
from consumer.sinks.python import PythonSink

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")


class Boom(BaseException):
    """A library's own BaseException (an abort signal of its own)."""


class Busy(Exception):
    """Named in transient_exceptions below."""


class Flagged(Exception):
    transient = True


def sink(**settings: Any) -> PythonSink:
    return PythonSink(PythonSinkSettings(**{**PYSINK, **settings}))


def raising(make: Callable[[], BaseException]) -> Callable[[], Awaitable[None]]:
    async def then() -> None:
        raise make()

    return then


async def outcome(coro: Coroutine[Any, Any, None]) -> BaseException | None:
    """What the write raised, awaited in this task (a SystemExit caught here, not in the loop)."""
    try:
        await coro
    except BaseException as exc:
        return exc
    return None


# --- the sink alone ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda: SystemExit(0), "SystemExit: 0"),
        (lambda: SystemExit("fatal: giving up"), "SystemExit: fatal: giving up"),
        (lambda: Boom("handler gave up"), "Boom: handler gave up"),
        (GeneratorExit, "GeneratorExit: "),
    ],
)
async def test_a_handlers_base_exception_is_its_events_permanent_failure(
    make: Callable[[], BaseException], said: str
) -> None:
    """sys.exit() or a BaseException of a library's own went through write() (which caught
    Exception only): out of the worker task, it ended the daemon (or the event loop itself).
    A GeneratorExit the handler raised went through as if the worker's coroutine were being
    closed: the worker died, the daemon stopped (70), each restart replayed the event into it."""
    ev = event(1)
    pysink.ON_EVENT[ev.unique_event_id] = raising(make)
    got = await outcome(sink().write("main", [ev]))
    assert isinstance(got, PermanentSinkError), repr(got)
    assert got.unique_event_id == ev.unique_event_id
    assert str(got) == said


async def test_closing_the_coroutine_of_a_write_still_closes_it() -> None:
    """The GeneratorExit that close() throws into a suspended write (its task collected, the
    loop going away) goes through: caught, the coroutine would refuse to close."""
    ev = event(1)
    pysink.ON_EVENT[ev.unique_event_id] = asyncio.Event().wait  # suspended until closed
    task = asyncio.create_task(sink().write("main", [ev]))
    await wait_until(lambda: pysink.CALLS[0] == 1, timeout=5)
    task.get_coro().close()  # from another task, as a finalizer would: raises if refused
    task.cancel()
    await asyncio.wait([task], timeout=5)
    assert task.done()


async def test_a_handlers_keyboard_interrupt_goes_through() -> None:
    """Under `dlq replay` a second ^C arrives as KeyboardInterrupt and must stop it; in the
    daemon (SIGINT is its signal) the pipeline dead-letters the event (the daemon test below)."""
    ev = event(1)
    pysink.ON_EVENT[ev.unique_event_id] = raising(KeyboardInterrupt)
    assert isinstance(await outcome(sink().write("main", [ev])), KeyboardInterrupt)


async def _refused() -> None:
    raise ConnectionRefusedError("downstream refused")


async def _fan_out(*children: Callable[[], Awaitable[None]]) -> None:
    async with asyncio.TaskGroup() as tg:  # the usual way to fan out in 3.11
        for child in children:
            tg.create_task(child())


async def test_a_taskgroup_whose_every_failure_is_transient_is_transient() -> None:
    """ExceptionGroup([ConnectionRefusedError]) was permanent: the event dead-lettered for a
    downstream that was merely down. Every leaf counts, nested groups too, by the sink's own
    rules (transient_exceptions, a `transient` attribute)."""
    s = sink(transient_exceptions=["test_python_sink_errors.Busy"])
    ev = event(1)
    pysink.ON_EVENT[ev.unique_event_id] = lambda: _fan_out(_refused, _refused)
    got = await outcome(s.write("main", [ev]))
    assert isinstance(got, TransientSinkError), repr(got)
    assert "ConnectionRefusedError: downstream refused" in str(got)

    pysink.ON_EVENT[ev.unique_event_id] = raising(
        lambda: ExceptionGroup(
            "nested",
            [
                Busy("b"),
                pysink.Busy("retry_after 0.01"),  # its retry_after: clamped to the minimum
                ExceptionGroup(
                    "inner",
                    [Flagged("f"), TimeoutError(), TransientSinkError("x", retry_after=7.0)],
                ),
            ],
        )
    )
    got = await outcome(s.write("main", [ev]))
    assert isinstance(got, TransientSinkError), repr(got)
    assert got.retry_after == 7.0  # the longest any of them asked for


async def test_a_taskgroup_with_one_permanent_failure_is_permanent() -> None:
    ev = event(1)

    async def bad() -> None:
        raise ValueError("no such room type")

    pysink.ON_EVENT[ev.unique_event_id] = lambda: _fan_out(_refused, bad)
    got = await outcome(sink().write("main", [ev]))
    assert isinstance(got, PermanentSinkError), repr(got)
    assert got.unique_event_id == ev.unique_event_id
    assert "ValueError: no such room type" in str(got)


async def test_an_awaitable_the_handler_returns_is_awaited() -> None:
    """`return other(stream, events)`, its await forgotten: the batch counted as delivered
    though nothing ran (only a RuntimeWarning said so)."""
    s = sink(target="pysink:forgetful")
    ok, bad = event(1), event(2)
    pysink.REJECT_IDS.add(bad.unique_event_id)
    assert await outcome(s.write("main", [ok])) is None
    assert pysink.delivered_ids() == [ok.unique_event_id]
    got = await outcome(s.write("main", [bad]))
    assert isinstance(got, PermanentSinkError) and got.unique_event_id == bad.unique_event_id


class Itself:
    """Awaits to itself without suspending, as a redis.asyncio.Redis client (initialize() a
    no-op once done) or an asyncpg pool does; gives up after many awaits (the sink looped on
    it for ever, the event loop frozen: this test would never end)."""

    def __init__(self) -> None:
        self.awaited = 0

    def __await__(self) -> Generator[Any, None, Itself]:
        self.awaited += 1
        if self.awaited > 1000:
            raise RuntimeError("awaited for ever")
        return self
        yield  # a generator: awaiting it runs the above, never suspending


class Chain:
    """Awaits to another awaitable, for ever."""

    awaited = 0

    def __await__(self) -> Generator[Any, None, Chain]:
        Chain.awaited += 1
        if Chain.awaited > 1000:
            raise RuntimeError("awaited for ever")
        return Chain()
        yield


@pytest.mark.parametrize("make", [Itself, Chain], ids=["itself", "a-chain"])
async def test_an_awaitable_that_awaits_to_itself_is_the_handlers_error(make: type) -> None:
    """`while inspect.isawaitable(result): result = await result` never ended for an object
    awaiting to itself (say, `return self.redis`): without suspending, it froze the event
    loop: timeout_s could not fire, SIGTERM was not handled, every stream stopped."""
    ev = event(1)
    returned = pysink.RETURNS[0] = make()
    got = await outcome(sink(target="pysink:returning").write("main", [ev]))
    assert isinstance(got, PermanentSinkError), repr(got)
    assert got.unique_event_id == ev.unique_event_id
    assert f"the handler returned an object of type {make.__name__}, an awaitable" in str(got)
    awaits = returned.awaited if isinstance(returned, Itself) else Chain.awaited
    assert 1 <= awaits <= python_sink.AWAITS


async def test_a_handlers_own_cancelled_error_is_transient() -> None:
    """A CancelledError the handler raised while nobody cancels the worker (a future its own
    client cancelled) is a transient failure, retried with the sink's backoff."""
    ev = event(1)
    pysink.ON_EVENT[ev.unique_event_id] = raising(asyncio.CancelledError)
    task = asyncio.create_task(sink().write("main", [ev]))
    await asyncio.wait([task], timeout=5)
    assert task.done() and not task.cancelled(), "the handler's CancelledError went through"
    got = task.exception()
    assert isinstance(got, TransientSinkError), repr(got)
    assert "CancelledError" in str(got)


async def test_a_stop_still_cancels_the_handler_at_once() -> None:
    pysink.STUCK_STREAMS.add("main")
    task = asyncio.create_task(sink().write("main", [event(1)]))
    await wait_until(lambda: pysink.CALLS[0] == 1, timeout=5)
    task.cancel()
    await asyncio.wait([task], timeout=5)
    assert task.cancelled()


async def test_a_handler_that_does_not_return_in_time_is_retried() -> None:
    """sink.timeout_s: a handler hung on a dead connection held its worker, then the reader,
    for ever. Cancelled and transient, whatever the handler makes of its cancellation."""
    ev = event(1)
    hung = asyncio.Event()

    async def swallows() -> None:
        try:
            await hung.wait()
        except asyncio.CancelledError:
            raise ValueError("interrupted") from None  # not the event's fault all the same

    for then in (hung.wait, swallows):
        pysink.ON_EVENT[ev.unique_event_id] = then
        started = time.monotonic()
        got = await outcome(sink(timeout_s=0.2).write("main", [ev]))
        assert isinstance(got, TransientSinkError), repr(got)
        assert "did not return within 0.2 s" in str(got)
        assert time.monotonic() - started < 5
    assert PythonSinkSettings(**PYSINK).timeout_s == 300.0


# --- in the daemon ----------------------------------------------------------------------------


async def test_a_handlers_cancelled_error_backs_off_and_the_stop_is_prompt(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """The event is retried with [pipeline]'s backoff (not dead-lettered: not its fault), and
    a stop meanwhile ends the retries once the drain's deadline has passed, as in an outage."""
    gw = await sandbox_factory(backlog=20)
    truth = truth_ids(gw.events("DEMO"))
    culprit = truth[5]
    tries: list[float] = []

    async def cancelled() -> None:
        tries.append(time.monotonic())
        raise asyncio.CancelledError

    pysink.ON_EVENT[culprit] = cancelled
    retry = {"sink_retry_initial_s": 0.2, "sink_retry_max_s": 0.4, "drain_timeout_s": 0.5}
    settings = make_settings(tmp_path, gw.url, sink=PYSINK, pipeline=retry)
    async with running(settings) as daemon:
        await wait_until(lambda: len(tries) >= 4, timeout=30)
        assert not daemon._stop.is_set()
        stopping = time.monotonic()
    stopped = time.monotonic() - stopping
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert min(gaps) >= 0.15, f"retried without backoff: {gaps}"
    assert stopped < 5
    assert culprit not in pysink.delivered_ids()
    assert await dead_letters(tmp_path / "state.db") == []
    assert culprit not in processed_ids(tmp_path / "state.db")


HANDLER = """
import asyncio
import sys
from pathlib import Path

OUT = Path(__file__).with_name("delivered.txt")
CULPRITS = {culprits!r}
KEEP = set()


class Boom(BaseException):
    pass


async def _exit():
    sys.exit(0)


async def handle(stream, events):
    for ev in events:
        what = CULPRITS.get(ev.unique_event_id)
        if what == "exit":
            sys.exit(0)  # a library's "fatal" path, or a careless script
        if what == "interrupt":
            raise KeyboardInterrupt
        if what == "boom":
            raise Boom("handler gave up")
        if what == "generator-exit":  # e.g. a generator's .throw(GeneratorExit) gone through
            raise GeneratorExit
        if what == "client":  # `return self.redis`: awaiting it gives it back, synchronously
            import redis.asyncio

            return redis.asyncio.Redis(host="127.0.0.1", port=9)  # never connects
        if what == "exit-elsewhere":  # in a task of the handler's own: not the sink's call
            KEEP.add(asyncio.get_running_loop().create_task(_exit()))
    with OUT.open("a") as f:
        f.writelines(ev.unique_event_id + "\\n" for ev in events)
"""


def spawn(tmp_path: Path, url: str, culprits: dict[str, str]) -> tuple[Any, Path]:
    (tmp_path / "exitsink.py").write_text(HANDLER.format(culprits=culprits))
    config = toml_config(
        tmp_path,
        url,
        "[pipeline]\ndrain_timeout_s = 2.0\nsink_retry_initial_s = 0.05\nsink_retry_max_s = 0.2",
        sink='[sink]\ntype = "python"\ntarget = "exitsink:handle"',
    )
    log = tmp_path / "daemon.log"
    return spawn_daemon(config, log), log


def delivered(tmp_path: Path) -> list[str]:
    out = tmp_path / "delivered.txt"
    return out.read_text().split() if out.exists() else []


def dead(tmp_path: Path) -> dict[str, str]:
    try:
        with sqlite3.connect(tmp_path / "state.db", timeout=10) as db:
            return dict(db.execute("SELECT unique_event_id, reason FROM dead_letters"))
    except sqlite3.OperationalError:  # not created yet
        return {}


@pytest.mark.skipif(sys.platform == "win32", reason="signals")
async def test_sys_exit_in_a_handler_dead_letters_its_event_and_the_daemon_runs_on(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """sys.exit(0) in a handler ended the event loop: the process exited 0 (the README's
    "stopped on request": systemd's Restart=on-failure left it down) after logging 70, with
    the event in no DLQ, and each restart replayed it into the same exit. A BaseException of
    the handler's own stopped the daemon (70), the same again at each restart."""
    gw = await sandbox_factory(backlog=40)
    truth = truth_ids(gw.events("DEMO"))
    culprits = {truth[5]: "exit", truth[12]: "interrupt", truth[20]: "boom"}
    proc, log = spawn(tmp_path, gw.url, culprits)
    try:
        await wait_until(
            lambda: (
                proc.poll() is not None
                or (len(delivered(tmp_path)) >= len(truth) - 3 and len(dead(tmp_path)) == 3)
            ),
            timeout=60,
        )
        alive = proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.terminate()
        code = await wait_exit(proc)
    assert alive, f"the daemon ended by itself ({code}):\n{tail(log)}"
    assert code == ExitCode.OK  # SIGTERM: drained, stopped on request
    assert dead(tmp_path) == {
        truth[5]: "sink_rejected",
        truth[12]: "unprocessable",  # not the python sink's to name: the pipeline's
        truth[20]: "sink_rejected",
    }
    assert sorted(delivered(tmp_path)) == sorted(set(truth) - set(culprits))
    errors = {r["unique_event_id"]: r["error"] for r in log_records(log, "event dead-lettered")}
    assert errors[truth[5]] == "SystemExit: 0"
    assert errors[truth[12]].startswith("KeyboardInterrupt")
    assert errors[truth[20]] == "Boom: handler gave up"


@pytest.mark.skipif(sys.platform == "win32", reason="signals")
async def test_a_handlers_generator_exit_or_self_awaiting_return_dead_letters_its_event(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """A GeneratorExit the handler raised was taken for the worker's coroutine being closed:
    the worker died, the daemon stopped (70), every restart replayed the event into the same
    stop. A redis client returned (awaiting it gives it back, without suspending) froze the
    event loop: no stream moved, SIGTERM went unanswered, only kill -9 ended it."""
    gw = await sandbox_factory(backlog=30)
    truth = truth_ids(gw.events("DEMO"))
    culprits = {truth[5]: "generator-exit", truth[12]: "client"}
    proc, log = spawn(tmp_path, gw.url, culprits)
    try:
        with contextlib.suppress(TimeoutError):  # frozen: said below
            await wait_until(
                lambda: (
                    proc.poll() is not None
                    or (len(delivered(tmp_path)) >= len(truth) - 2 and len(dead(tmp_path)) == 2)
                ),
                timeout=60,
            )
        alive = proc.poll() is None
        proc.terminate()
        try:
            code: int | None = await wait_exit(proc, 15)
        except TimeoutError:
            code = None
    finally:
        if proc.poll() is None:
            proc.kill()
            await wait_exit(proc)
    assert alive, f"the daemon ended by itself:\n{tail(log)}"
    assert code == ExitCode.OK, f"SIGTERM unanswered ({code}):\n{tail(log)}"
    assert dead(tmp_path) == {truth[5]: "sink_rejected", truth[12]: "sink_rejected"}
    assert sorted(delivered(tmp_path)) == sorted(set(truth) - set(culprits))
    errors = {r["unique_event_id"]: r["error"] for r in log_records(log, "event dead-lettered")}
    assert errors[truth[5]] == "GeneratorExit: "
    assert errors[truth[12]].startswith(
        "the handler returned an object of type Redis, an awaitable that awaits to itself"
    )


@pytest.mark.skipif(sys.platform == "win32", reason="signals")
async def test_a_system_exit_out_of_any_task_is_never_a_clean_exit(
    sandbox_factory: Any, tmp_path: Path
) -> None:
    """No sink's call this time: a task the handler started calls sys.exit(0). asyncio lets it
    end the event loop, and the process exited with its 0 while no drain was asked for:
    systemd takes 0 for "stopped on request". It is an internal error (70), said last."""
    gw = await sandbox_factory(backlog=20)
    truth = truth_ids(gw.events("DEMO"))
    proc, log = spawn(tmp_path, gw.url, {truth[3]: "exit-elsewhere"})
    try:
        code = await wait_exit(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == ExitCode.SOFTWARE, tail(log)
    (last,) = log_records(log, "a task raised this past the daemon; the event loop ended under it")
    assert last["exit_code"] == ExitCode.SOFTWARE and last["error"] == "SystemExit: 0"
