"""A local OHIP Streaming gateway emulator, for the demo, the tests and the benchmarks.

It imports nothing from the consumer: it is the independent oracle the consumer is tested
against.
"""

from .server import SandboxGateway, SandboxOptions, SandboxStats, run_sandbox

__all__ = ["SandboxGateway", "SandboxOptions", "SandboxStats", "run_sandbox"]
