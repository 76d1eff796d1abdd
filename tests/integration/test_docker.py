"""The container image: built and run where a Docker engine is available (skipped elsewhere)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _engine() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _engine(), reason="no Docker engine on this machine")
@pytest.mark.timeout(900)
def test_the_image_builds_and_runs():
    tag = "opera-consumer:test"
    subprocess.run(
        ["docker", "build", "-f", "deploy/docker/Dockerfile", "-t", tag, "."],
        cwd=ROOT,
        check=True,
        timeout=900,
    )
    out = subprocess.run(
        ["docker", "run", "--rm", tag, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "exit status" in out
    user = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert user == "10001"  # not root
