"""The event loop `run` runs the daemon on (consumer.event_loop): uvloop for the webhook sink
unless told otherwise, asyncio's for every other sink, and a daemon that behaves the same on
either (every event delivered once, a SIGTERM a clean stop)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from receiver import Receiver
from support import log_records, spawn_daemon, tail, toml_config, truth_ids, wait_exit, wait_until

from consumer.event_loop import chosen

SINKS = ("jsonl", "sqlite", "postgres", "python", "nats", "redis", "webhook")


@pytest.mark.parametrize("sink", SINKS)
def test_auto_is_uvloop_for_the_webhook_sink_alone(sink: str) -> None:
    assert chosen("auto", sink) == ("uvloop" if sink == "webhook" else "asyncio")


@pytest.mark.parametrize("sink", SINKS)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_explicit_choice_holds_for_every_sink(loop: str, sink: str) -> None:
    assert chosen(loop, sink) == loop  # type: ignore[arg-type]


def running_on(log: Path) -> str:
    (record,) = log_records(log, "opera-consumer running")
    return str(record["event_loop"])


@pytest.mark.parametrize(
    ("setting", "expected"), [(None, "uvloop"), ("asyncio", "asyncio")], ids=["auto", "asyncio"]
)
async def test_a_webhook_daemon_delivers_every_event_once_on_its_loop(
    sandbox_factory, tmp_path: Path, setting: str | None, expected: str
) -> None:
    gw = await sandbox_factory(backlog=60)
    truth = truth_ids(gw.events("DEMO"))
    log = tmp_path / "daemon.log"
    with Receiver() as rx:
        sink = f'[sink]\ntype = "webhook"\nurl = "{rx.url}/events"\n'
        config = toml_config(tmp_path, gw.url, sink=sink)
        if setting is not None:  # a top-level key: before the first table
            config.write_text(f'event_loop = "{setting}"\n' + config.read_text())
        proc = spawn_daemon(config, log)
        try:
            await wait_until(lambda: len(rx.exchanges) >= len(truth), timeout=60)
            await wait_until(lambda: "opera-consumer running" in log.read_text(), timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await wait_exit(proc)
        keys = [r.header("Idempotency-Key") for r, _ in rx.exchanges]
    assert code == 0, tail(log)
    assert sorted(keys) == sorted(truth)  # each once, none missing
    assert running_on(log) == expected


async def test_a_jsonl_daemon_runs_on_asyncio_by_default(sandbox_factory, tmp_path: Path) -> None:
    gw = await sandbox_factory(backlog=0)
    log = tmp_path / "daemon.log"
    proc = spawn_daemon(toml_config(tmp_path, gw.url), log)
    try:
        await wait_until(lambda: "opera-consumer running" in log.read_text(), timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await wait_exit(proc)
    assert code == 0, tail(log)
    assert running_on(log) == "asyncio"
