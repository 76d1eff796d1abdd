"""deploy/docker/compose.yaml as text (no Docker engine needed): what it binds and which
secret files it reads, and that only placeholders are tracked."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from consumer.sandbox import SandboxOptions

ROOT = Path(__file__).parents[2]
DOCKER = ROOT / "deploy" / "docker"
COMPOSE = (DOCKER / "compose.yaml").read_text()


def test_a_missing_config_file_is_not_made_a_directory() -> None:
    """The short syntax `./config.toml:/etc/...:ro` makes a missing ./config.toml an empty
    directory on the host, and the consumer then fails on a directory: the long syntax with
    create_host_path: false refuses to start instead."""
    assert "${OPERA_CONFIG:-./config.toml}:/etc" not in COMPOSE
    bind = re.search(
        r"- type: bind\n\s+source: \$\{OPERA_CONFIG:-\./config\.toml\}\n"
        r"\s+target: /etc/opera-consumer/config\.toml\n\s+read_only: true\n"
        r"\s+bind:\n\s+create_host_path: false\n",
        COMPOSE,
    )
    assert bind, COMPOSE


def test_real_secrets_are_ignored_and_the_sandbox_ones_are_not() -> None:
    """deploy/docker/secrets/app_key and client_secret were tracked (the sandbox's values) and
    not ignored: a user's real values there were one `git add` from being committed."""
    files = re.findall(r"file: \$\{OPERA_SECRETS:-\./secrets\}/(\w+)", COMPOSE)
    assert sorted(files) == ["app_key", "client_secret"]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "--", *(f"deploy/docker/secrets/{f}" for f in files)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ignored.stdout.split() == [f"deploy/docker/secrets/{f}" for f in files]
    sandbox = DOCKER / "secrets" / "sandbox"
    tracked = subprocess.run(
        ["git", "ls-files", "--", "deploy/docker/secrets"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(tracked) == [
        "deploy/docker/secrets/README.md",
        "deploy/docker/secrets/sandbox/app_key",
        "deploy/docker/secrets/sandbox/client_secret",
    ]
    o = SandboxOptions()
    assert (sandbox / "app_key").read_text() == o.app_key
    assert (sandbox / "client_secret").read_text() == o.client_secret
    assert "OPERA_SECRETS=./secrets/sandbox" in COMPOSE
    assert "OPERA_SECRETS=./secrets/sandbox" in (ROOT / "README.md").read_text()
