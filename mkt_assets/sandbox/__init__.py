"""A local fake of the systeme.io public API for tests, the demo and benchmarks.

It is independent of the rest of ``mkt_assets`` on purpose, so tests of the client are not
circular. ``mkt-assets sandbox`` (``server.main``) serves one from the command line.
"""

from .data import ACCESS_TYPES, FILTERS, LOCALES, RESOURCES, SandboxData
from .server import FAULT_KINDS, Fault, RequestRecord, SandboxServer, main

__all__ = [
    "ACCESS_TYPES", "FAULT_KINDS", "FILTERS", "LOCALES", "RESOURCES", "Fault", "RequestRecord", "SandboxData",
    "SandboxServer", "main",
]  # fmt: skip
