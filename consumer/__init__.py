"""opera-consumer: a durable consumer daemon for the Oracle OHIP Streaming API."""

from functools import cache

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    """``__version__``, read from the installed metadata when first asked for: importing
    importlib.metadata and finding the distribution take a good part of the command line's
    start, before it can hold a signal (consumer/early_signals.py)."""
    if name == "__version__":
        return _version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415  # see above

    try:
        return version("opera-consumer")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"
