"""deploy/grafana/opera-consumer.json: rates over Grafana's $__rate_interval (never a fixed
window that a long scrape interval leaves empty) and every query filtered by $instance."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "opera-consumer.json"
# A metric name and its label matchers, for the metrics the daemon exports.
SELECTOR = re.compile(r"\b((?:opera_consumer|process|python)_[a-z_]+)(\{[^}]*\})?")


def targets() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t for p in dashboard["panels"] for t in p["targets"]]


def test_rates_use_the_rate_interval():
    exprs = [t["expr"] for t in targets()]
    assert exprs
    for expr in exprs:
        assert "[1m]" not in expr, expr
        for window in re.findall(r"\b(?:rate|irate)\([^\[]*\[([^\]]*)\]", expr):
            assert window == "$__rate_interval", expr


def test_every_query_is_filtered_by_the_instance_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["instance"]["type"] == "query"
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    for target in targets():
        selectors = SELECTOR.findall(target["expr"])
        assert selectors, target["expr"]
        for name, matchers in selectors:
            assert 'instance=~"$instance"' in matchers, (name, target["expr"])
