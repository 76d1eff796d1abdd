"""The container image: built and run where a Docker engine is available.

Skipped, saying why, where there is no engine, where its daemon does not answer, or where the
base image or packages cannot be fetched (a registry or network problem, not ours). A build
that fails for any other reason is a failure: that is our Dockerfile. What the Dockerfile and
its build context promise without an engine (a pinned base, the context's allowlist, the
version label) is checked everywhere.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
TAG = "opera-consumer:test"

# Build output saying that something could not be fetched from outside: the base image from
# its registry, Debian packages (apt), Python packages (pip). Matched case-insensitively.
OUTSIDE_THE_REPO = (
    "pull access denied",
    "failed to resolve",
    "tls handshake",
    "dial tcp",
    "no such host",
    "i/o timeout",
    "failed to fetch",
    "toomanyrequests",  # the registry's pull rate limit
    "temporary failure resolving",  # apt without DNS
    "temporary failure in name resolution",
    "failed to establish a new connection",  # pip without a network
    "network is unreachable",
    "connection reset by peer",
    "connection refused",
    "context deadline exceeded",
    "could not resolve host",
    "proxyconnect",
    "service unavailable",
)


def outside_the_repo(output: str) -> str | None:
    """The first line of a failed build's output that blames the network or a registry, if
    any (then the failure says nothing about our Dockerfile)."""
    for line in output.splitlines():
        low = line.lower()
        if any(marker in low for marker in OUTSIDE_THE_REPO):
            return line.strip()[:300]
    return None


def why_no_engine() -> str | None:
    """Why no image can be built here (None: a Docker daemon answers)."""
    if shutil.which("docker") is None:
        return "no docker CLI on this machine"
    try:
        probe = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "the Docker daemon did not answer within 60 s"
    if probe.returncode != 0:
        said = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the Docker daemon is not reachable: {said}"
    return None


def text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def base_image() -> str:
    """The base image both stages are built on (``ARG BASE=`` in the Dockerfile)."""
    found = re.search(r"^ARG BASE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert found, "the Dockerfile names its base in ARG BASE"
    return found.group(1)


def pull_base() -> None:
    """Fetch the base image first: an engine that cannot have it (no network, no registry,
    a mirror without it) skips with what the pull said, before our build is judged."""
    base = base_image()
    try:
        done = subprocess.run(
            ["docker", "pull", "--quiet", base],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"the base image {base} could not be pulled in 600 s")
    if done.returncode != 0:
        said = ((done.stderr + done.stdout).strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"the base image {base} cannot be had here: {said[:300]}")


def build() -> None:
    """``docker build``; skips when the failure is the network's or a registry's."""
    args = ["docker", "build", "-f", "deploy/docker/Dockerfile", "-t", TAG, "."]
    try:
        done = subprocess.run(
            args, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
        )
    except subprocess.TimeoutExpired as exc:
        output = text(exc.stdout) + text(exc.stderr)
        if reason := outside_the_repo(output):
            pytest.skip(f"the build timed out fetching from outside: {reason}")
        pytest.fail(f"docker build did not finish in 900 s:\n{output[-4000:]}")
    if done.returncode != 0:
        output = done.stdout + done.stderr
        if reason := outside_the_repo(output):
            pytest.skip(f"the base image or packages could not be fetched: {reason}")
        pytest.fail(f"docker build failed (exit {done.returncode}):\n{output[-4000:]}")


def run(*args: str) -> str:
    done = subprocess.run(
        ["docker", "run", "--rm", *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# Run in the image: every extra is there, no installer is.
IMAGE_PROBE = """
import importlib.util, asyncpg, aiohttp, consumer.cli
print([m for m in ("pip", "setuptools", "wheel") if importlib.util.find_spec(m)])
"""


@pytest.mark.timeout(1500)
def test_the_image_builds_and_runs():
    """Issue #9 item 12: an engine that cannot fetch the base image skips with the reason;
    only a failure of our own build fails."""
    if reason := why_no_engine():
        pytest.skip(reason)
    pull_base()
    build()
    assert "exit status" in run(TAG, "--help")
    assert run("--entrypoint", "id", TAG, "-u").strip() == "10001"  # not root
    assert run("--entrypoint", "python", TAG, "-c", IMAGE_PROBE).strip() == "[]"
    inspect = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", TAG],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    labels = json.loads(inspect.stdout)
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.version"] == project_version()


def project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def test_the_base_is_pinned_by_digest_in_both_stages():
    """The venv built in the first stage runs on the second's interpreter: one base, pinned."""
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?@sha256:[0-9a-f]{64}", base_image())
    froms = re.findall(r"^FROM (\S+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert froms == ["${BASE}", "${BASE}"]


def test_the_version_label_is_the_projects():
    found = re.search(r"^ARG VERSION=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert found and found.group(1) == project_version()


def test_the_build_context_is_what_the_dockerfile_copies():
    """.dockerignore is an allowlist (a checkout's .venv, .git, tests and secrets stay out of
    the context): everything the Dockerfile copies from the context must be on it."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M):
        copied.update(sources.split())
    assert copied == allowed
    assert all((ROOT / path).exists() for path in copied)


@pytest.mark.parametrize(
    "output",
    [
        "ERROR: pull access denied for python, repository does not exist or may require "
        "'docker login'",
        "ERROR: failed to solve: python:3.11-slim-bookworm: failed to resolve source metadata "
        "for docker.io/library/python:3.11-slim-bookworm: failed to do request: Head "
        '"https://registry-1.docker.io/v2/library/python/manifests/3.11-slim-bookworm": dial '
        "tcp: lookup registry-1.docker.io on 127.0.0.53:53: no such host",
        'Get "https://registry-1.docker.io/v2/": net/http: TLS handshake timeout',
        "Err:1 http://deb.debian.org/debian bookworm InRelease\n  Temporary failure resolving "
        "'deb.debian.org'\nE: Failed to fetch http://deb.debian.org/debian/dists/bookworm",
        "WARNING: Retrying (Retry(total=4)) after connection broken by 'NewConnectionError(': "
        "Failed to establish a new connection: [Errno 101] Network is unreachable')'",
        "toomanyrequests: You have reached your pull rate limit.",
    ],
)
def test_network_and_registry_failures_are_recognised(output: str):
    """Issue #9 item 12: these build failures skip the image test (not our Dockerfile)."""
    assert outside_the_repo("Step 1/14 : FROM python:3.11-slim-bookworm\n" + output)


@pytest.mark.parametrize(
    "output",
    [
        "COPY failed: file not found in build context or excluded by .dockerignore: stat "
        "consumer: file does not exist",
        "ERROR: failed to solve: failed to compute cache key: failed to calculate checksum of "
        'ref: "/consumerx": not found',
        "Dockerfile:9\nERROR: unknown instruction: RUNN",
        "ERROR: Could not find a version that satisfies the requirement consumer-x\n"
        "The command '/bin/sh -c pip install .' returned a non-zero code: 1",
        'ERROR: failed to solve: process "/bin/sh -c groupadd -g 10001 app" did not complete '
        "successfully: exit code: 9",
    ],
)
def test_our_own_build_errors_are_not_excused(output: str):
    """Issue #9 item 12: a broken Dockerfile still fails the image test."""
    assert outside_the_repo(output) is None
