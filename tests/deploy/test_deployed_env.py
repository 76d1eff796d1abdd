"""The daemon the tests, the demo and the benchmarks start runs in the environment the
systemd unit and the image give it: their measurements are of the daemon as deployed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from consumer.sandbox.launcher import DEPLOYED_ENV

ROOT = Path(__file__).resolve().parents[2]


def _unit_env() -> dict[str, str]:
    text = (ROOT / "deploy/systemd/opera-consumer.service").read_text()
    pairs = [p for line in re.findall(r"^Environment=(.*)$", text, re.M) for p in shlex.split(line)]
    return dict(p.split("=", 1) for p in pairs)


def _image_env() -> dict[str, str]:
    text = (ROOT / "deploy/docker/Dockerfile").read_text().replace("\\\n", " ")
    pairs = [p for line in re.findall(r"^ENV (.*)$", text, re.M) for p in shlex.split(line)]
    return dict(p.split("=", 1) for p in pairs)


def test_the_launcher_gives_the_daemon_the_units_and_the_images_environment() -> None:
    unit, image = _unit_env(), _image_env()
    for key, value in DEPLOYED_ENV.items():
        assert unit.get(key) == value, f"the unit's {key}"
        assert image.get(key) == value, f"the image's {key}"
    # -OO is the launcher's own flag: the same as the unit's and the image's PYTHONOPTIMIZE.
    assert unit["PYTHONOPTIMIZE"] == image["PYTHONOPTIMIZE"] == "2"
    # Whatever else both set for the allocator or the interpreter's memory, the launcher too.
    shared = {k for k in unit.keys() & image.keys() if k.startswith(("MALLOC_", "PYTHONMALLOC"))}
    assert shared <= DEPLOYED_ENV.keys()
