"""opera-consumer: a durable consumer daemon for the Oracle OHIP Streaming API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("opera-consumer")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
