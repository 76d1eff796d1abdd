"""`make demo` is one of the README's two commands: run it (shortened) in an empty directory
and check that events flowed, survived the restart once each, and landed where it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_the_demo_shows_events_flowing_and_ends_with_no_duplicates(tmp_path: Path) -> None:
    env = {**os.environ, "DEMO_SECONDS": "4"}
    run = subprocess.run(
        [sys.executable, "-m", "consumer.demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = (tmp_path / ".demo" / "events.jsonl").read_text().splitlines()
    ids = [json.loads(line)["metadata"]["uniqueEventId"] for line in lines]
    assert ids and len(ids) == len(set(ids))
    assert f"5. done: {len(ids)} events in .demo/events.jsonl, {len(ids)} distinct, 0 dup" in (
        run.stdout
    )
