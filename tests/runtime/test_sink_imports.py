"""A daemon imports the modules of its own sink only (#12: memory): the jsonl sink, the
default, comes with the daemon; every other sink's module is imported when configured."""

from __future__ import annotations

import subprocess
import sys


def test_the_daemon_imports_no_sink_but_jsonl() -> None:
    code = (
        "import sys, consumer.runtime.daemon\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('consumer.sinks'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["consumer.sinks", "consumer.sinks.base", "consumer.sinks.jsonl"]
