"""The optional dependencies (the package's extras) that configured features need.

``pip install opera-consumer`` leaves out asyncpg (the ``postgres`` extra: the PostgreSQL state
store, sink and fleets). The settings check here that what the configuration uses is
installed, so a missing extra is a configuration error naming the key and the fix (exit 78, at
``check-config`` already), not an ImportError when the daemon first reaches the feature.
``find_spec`` only looks the module up: nothing is imported.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import Settings

# extra -> the module it installs
MODULES = {"postgres": "asyncpg"}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _uses(settings: Settings) -> list[tuple[str, str, str, str]]:
    """(key, what it is set to, the extra it needs, the way without it) for each configured
    optional feature."""
    uses = []
    if settings.state.backend == "postgres":
        uses.append(("state.backend", 'backend = "postgres"', "postgres", 'backend = "sqlite"'))
    if settings.sink.type == "postgres":
        uses.append(("sink.type", 'type = "postgres"', "postgres", "another sink type"))
    return uses


def missing_extras(settings: Settings) -> list[tuple[str, str, str]]:
    """(key, problem, fix) for each configured feature whose extra is not installed."""
    problems = []
    for key, setting, extra, otherwise in _uses(settings):
        module = MODULES[extra]
        if not installed(module):
            problems.append(
                (
                    key,
                    f"{setting} needs the Python package {module}, which is not installed",
                    f"pip install 'opera-consumer[{extra}]' into the daemon's environment "
                    f"(the container image has every extra), or use {otherwise}",
                )
            )
    return problems
