"""A big OHIP event the daemon took under a raised max_frame_bytes and dead-lettered replays:
`dlq replay` decodes the payload under the stream's frame limit, whose budget of values follows it
(with no limit it had the minimum budget, 2**19 marks, and skipped the event: lost for good)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pysink
import pytest
from operator_support import PYSINK, cli, dead_letters, uid, write_config
from support import running, wait_until

from consumer.config import load_settings
from consumer.core.protocol import MIN_MARKS_BUDGET

pytestmark = pytest.mark.usefixtures("fresh_pysink", "contained_logging")

LIMIT = 32 * 1024 * 1024


def _big_event(template: dict) -> dict:
    ev = copy.deepcopy(template)
    ev["metadata"]["uniqueEventId"] = "big-" + ev["metadata"]["uniqueEventId"]
    # A reservation's change log: 40,000 detail elements of OHIP's eight fields (~6 MB).
    ev["detail"] = [
        {
            "elementName": "Rate Amount",
            "elementType": "FIELD",
            "elementSequence": i,
            "elementRole": "Detail",
            "newValue": f"{100 + i % 50}.00",
            "oldValue": f"{90 + i % 50}.00",
            "scopeFrom": "2025-06-01",
            "scopeTo": "2025-06-02",
        }
        for i in range(40_000)
    ]
    return ev


async def test_a_big_event_taken_by_the_daemon_is_replayable(
    sandbox_factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    gw = await sandbox_factory(backlog=3)
    truth = gw.events("DEMO")
    big = _big_event(truth[-1])
    text = json.dumps(big, separators=(",", ":"))
    marks = sum(text.count(c) for c in ",:[{")
    assert len(text) < 16 * 1024 * 1024 and marks > MIN_MARKS_BUDGET  # under 32 MiB / 32
    assert marks < LIMIT // 32
    gw.inject_event("DEMO", text)
    pysink.REJECT_IDS.add(uid(big))  # the sink refuses it once (a 422, a full disk...)
    config = write_config(tmp_path, gw.url, sink=PYSINK)
    body = config.read_text().replace(
        "[streams.main.connection]\n",
        f"[streams.main.connection]\nmax_frame_bytes = {LIMIT}\n",
    )
    config.write_text(body)
    settings = load_settings(config)
    assert settings.streams["main"].connection.max_frame_bytes == LIMIT
    async with running(settings) as daemon:
        p = daemon.pipelines["main"]
        await wait_until(lambda: p.dead_lettered >= 1 and p.delivered >= len(truth), timeout=30)
    rows = await dead_letters(settings.state.path)
    assert [(r.unique_event_id, r.reason) for r in rows] == [(uid(big), "sink_rejected")]

    pysink.REJECT_IDS.clear()  # fixed: the operator replays it
    code, out, _ = await cli(capsys, "dlq", "replay", "--all", "--json", "--config", str(config))
    assert code == 0
    outcomes = [(o["unique_event_id"], o["result"], str(o)[:400]) for o in json.loads(out)]
    assert [o[:2] for o in outcomes] == [(uid(big), "delivered")], outcomes
