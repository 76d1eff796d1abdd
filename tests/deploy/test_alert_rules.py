"""deploy/prometheus/alerts.yaml: valid rules (promtool check rules) that fire and stay quiet
as their unit tests say (promtool test rules alerts.test.yaml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

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
