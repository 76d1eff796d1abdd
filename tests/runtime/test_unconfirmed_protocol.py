"""The protocol details the reference marks UNCONFIRMED, made configurable: each default is what
Oracle's own tools do, and the other choice is what the sandbox, told to insist on it, accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from log_capture import captured_logs
from support import make_settings, running, wait_until

from consumer.runtime.stream import StreamState
from consumer.sandbox import SandboxOptions


async def test_the_token_goes_on_the_upgrade_only_when_asked(sandbox_factory, tmp_path: Path):
    """Reference 1.3: whether the upgrade needs `Authorization: Bearer` is unconfirmed (Oracle's
    GraphiQL tool and sample send none). upgrade_authorization = true sends each connection's
    own token: a rotated session presents the new one."""
    plain = await sandbox_factory(backlog=5)
    async with running(make_settings(tmp_path, plain.url)) as daemon:
        await wait_until(lambda: daemon.pipelines["main"].delivered >= 5)
    assert plain.stats.upgrade_tokens == [""]

    gw = await sandbox_factory(backlog=5, token_ttl_s=2.0, require_upgrade_authorization=True)
    (tmp_path / "b").mkdir()
    connection = {"upgrade_authorization": True}
    async with running(make_settings(tmp_path / "b", gw.url, connection=connection)) as daemon:
        await wait_until(lambda: len(gw.stats.subscribes) >= 2, timeout=60)  # a rotation
        runner = daemon.runners["main"]
        assert runner.stats.last_close == "token rotation"
    first, second = gw.stats.upgrade_tokens[:2]
    assert first != second and {first, second} <= set(gw.issued_tokens)
    assert "http_401" not in runner.stats.closes


async def test_the_enterprise_id_goes_in_connection_init_only_when_asked(
    sandbox_factory, tmp_path: Path
):
    """Reference 2.2: Oracle's sample adds enterpriseId to the connection_init payload, its
    GraphiQL tool does not; whether OHIP reads it is unconfirmed."""
    gw = await sandbox_factory(backlog=5)
    auth = {
        "client_id": SandboxOptions().client_id,
        "client_secret": SandboxOptions().client_secret,
        "enterprise_id": "ENT1",
    }
    async with running(make_settings(tmp_path, gw.url, auth=auth)) as daemon:
        await wait_until(lambda: daemon.pipelines["main"].delivered >= 5)
        await gw.disconnect_all(4500)
        await wait_until(lambda: gw.stats.inits >= 2)
    assert gw.stats.init_enterprise_ids == [None, None]

    connection = {"init_enterprise_id": True}
    settings = make_settings(tmp_path, gw.url, auth=auth, connection=connection)
    async with running(settings):
        await wait_until(lambda: gw.stats.inits >= 3)
    assert gw.stats.init_enterprise_ids[2:] == ["ENT1"]


async def test_the_subscription_id_is_reused_across_connections_only_when_asked(
    sandbox_factory, tmp_path: Path
):
    """Reference 2.4: the id must be unique for the stream's lifetime; Oracle's sample keeps
    one across reconnects. Default: a fresh UUID per connection; reuse_subscription_id: one
    for the stream in this process. The status queries keep ids of their own."""
    gw = await sandbox_factory(backlog=5)
    for run, reuse in enumerate((False, True)):
        # takeover_jitter_s: the random wait before each subscribe (2 s at most by default)
        connection = {
            "reuse_subscription_id": reuse,
            "status_check": "on",
            "takeover_jitter_s": 0.05,
        }
        settings = make_settings(tmp_path, gw.url, connection=connection)
        async with running(settings) as daemon:
            await wait_until(lambda: daemon.pipelines["main"].delivered >= 5)
            await gw.disconnect_all(4500)
            await wait_until(lambda run=run: len(gw.stats.subscribes) >= 2 * run + 2)
        gw.append("DEMO", 5)
    ids = gw.stats.subscription_ids
    assert len(ids) == 4 and len(set(ids[:2])) == 2 and ids[2] == ids[3] != ids[1]
    assert len(set(gw.stats.query_ids)) == 4 and not set(gw.stats.query_ids) & set(ids)


@pytest.mark.parametrize("answer", ["", "Paused"])
async def test_a_connection_status_other_than_active_or_inactive_is_no_answer(
    sandbox_factory, tmp_path: Path, answer: str
):
    """Reference 2.7: how the gateway answers the status query is inferred, not Oracle's word.
    An unexpected answer (an empty string, a value the schema does not name) closed and asked
    again for ever, as a deliberate wait that looked ready; now it is no answer: subscribe
    (a 4409 still guards)."""
    gw = await sandbox_factory(backlog=5, connection_status=answer)
    # takeover_jitter_s: the random wait before the subscribe (2 s at most by default)
    connection = {"status_check": "on", "takeover_jitter_s": 0.05}
    settings = make_settings(tmp_path, gw.url, connection=connection)
    async with running(settings) as daemon:
        await wait_until(lambda: daemon.pipelines["main"].delivered >= 5)
    assert len(gw.stats.query_ids) == 1 == len(gw.stats.subscribes)


async def test_a_gateway_silent_to_the_status_query_is_subscribed_on_the_next_connection(
    sandbox_factory, tmp_path: Path
):
    """Reference 2.7: how the status query travels is unconfirmed. A gateway that acks and
    then never answers it was never subscribed: each connection waited out the subscribe
    deadline and closed, for ever. The connection after an unanswered query subscribes without
    asking (no usable answer, as an `error` is; a 4409 still guards)."""
    gw = await sandbox_factory(backlog=5, connection_query_silent=True)
    connection = {"status_check": "on", "takeover_jitter_s": 0.0, "subscribe_deadline_s": 1.0}
    settings = make_settings(tmp_path, gw.url, connection=connection)
    async with running(settings) as daemon:
        await wait_until(lambda: daemon.pipelines["main"].delivered >= 5, timeout=30)
        assert daemon.runners["main"].stats.closes.get("subscribe_deadline") == 1
    assert len(gw.stats.query_ids) == 1 == len(gw.stats.subscribes)


async def test_a_stream_the_gateway_keeps_calling_active_is_not_ready(
    sandbox_factory, tmp_path: Path
):
    """ "Active" answer after answer: a deliberate wait (ready) at first, then, after
    status_active_limit in a row, not ready, with a warning; it keeps asking, never
    subscribing."""
    gw = await sandbox_factory(backlog=5, connection_status="Active")
    connection = {
        "status_check": "on",
        "status_poll_s": 0.05,
        "takeover_jitter_s": 0.0,
        "status_active_limit": 3,
    }
    with captured_logs() as logs:
        async with running(make_settings(tmp_path, gw.url, connection=connection)) as daemon:
            runner = daemon.runners["main"]
            await wait_until(lambda: runner.state is StreamState.LOCKOUT)
            assert runner.state.ready and "in a row" not in runner.stats.last_close
            await wait_until(lambda: runner.state is StreamState.BACKOFF)
            assert not runner.state.ready
            assert "Active on this stream, 3 times in a row" in runner.stats.last_close
            assert "3 times in a row" in runner.waiting_for()
            await wait_until(lambda: len(gw.stats.query_ids) >= 5)  # it keeps asking
    assert gw.stats.subscribes == []
    warned = [
        line
        for line in map(json.loads, logs.getvalue().splitlines())
        if "keeps saying another consumer is active" in line["event"]
    ]
    assert [w["answers"] for w in warned] == [3]
