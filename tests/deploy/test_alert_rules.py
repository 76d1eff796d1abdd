"""deploy/prometheus/alerts.yaml: valid rules (promtool check rules) that fire and stay quiet
as their unit tests say (promtool test rules alerts.test.yaml)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import DownSink, make_settings, running, wait_until

RULES = Path(__file__).parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (apt-get install prometheus; make promtool)"
)


def promtool(*args: str) -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args], cwd=RULES, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_the_alert_rules_are_valid():
    promtool("check", "rules", "alerts.yaml")


@needs_promtool
def test_the_alert_rules_pass_their_unit_tests():
    promtool("test", "rules", "alerts.test.yaml")


def test_every_alert_has_a_unit_test():
    """A firing and a quiet case each (promtool only runs the tests that exist)."""
    rules = (RULES / "alerts.yaml").read_text()
    tests = (RULES / "alerts.test.yaml").read_text()
    alerts = [line.split(":", 1)[1].strip() for line in rules.splitlines() if "- alert:" in line]
    assert alerts
    for alert in alerts:
        cases = tests.split(f"alertname: {alert}\n")[1:]
        firing = [c for c in cases if c.lstrip().startswith("exp_alerts:\n")]
        quiet = [c for c in cases if c.lstrip().startswith("exp_alerts: []")]
        assert firing and quiet, alert


@needs_promtool
async def test_checkpoint_stuck_fires_on_what_a_daemon_with_its_sink_down_exports(
    sandbox_factory, tmp_path: Path
):
    """A sink down from the start: events wait and no commit moves the checkpoint. What the
    daemon exports for the stream then, held for 20 minutes, must fire the alert (it had no
    checkpoint series to fire on)."""
    gw = await sandbox_factory(backlog=20)
    pipeline = {"sink_retry_max_s": 0.2, "drain_timeout_s": 0.5}
    settings = make_settings(tmp_path, gw.url, pipeline=pipeline)
    async with running(settings, sink=DownSink(tmp_path / "events.jsonl")) as daemon:
        assert daemon.metrics_server is not None
        await wait_until(lambda: daemon.pipelines["main"].in_flight > 0)
        async with httpx.AsyncClient() as http:
            url = f"http://127.0.0.1:{daemon.metrics_server.port}/metrics"
            text = (await http.get(url)).text
        at = time.time()
    lines, moved = [], 0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("stream") != "main":
                continue
            value = round(s.value)
            if s.name.endswith("_timestamp_seconds"):  # Unix times: the scrape at promtool's 0
                value = round(s.value - at)
                if s.name == "opera_consumer_checkpoint_timestamp_seconds":
                    moved = value
            labels = {**s.labels, "instance": "opera-1:9464", "job": "opera-consumer"}
            shown = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            lines.append(f"      - series: '{s.name}{{{shown}}}'\n        values: '{value}x20'\n")
    age = 20 * 60 - moved
    test = tmp_path / "stuck.test.yaml"
    test.write_text(
        f"rule_files: ['{RULES / 'alerts.yaml'}']\nevaluation_interval: 1m\ntests:\n"
        "  - interval: 1m\n    input_series:\n"
        + "".join(lines)
        + f"""    alert_rule_test:
      - eval_time: 20m
        alertname: OperaConsumerCheckpointStuck
        exp_alerts:
          - exp_labels:
              severity: critical
              instance: opera-1:9464
              job: opera-consumer
              stream: main
            exp_annotations:
              summary: "opera-consumer stream main: checkpoint not moving"
              description: >-
                Stream main on opera-1:9464 has events waiting and its checkpoint last moved
                {age // 60}m {age % 60}s ago: nothing it reads is made durable. Check the sink
                and the state store in the daemon's log.
"""
    )
    promtool("test", "rules", str(test))
