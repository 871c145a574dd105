"""A local fake of the systeme.io public API for tests, the demo and benchmarks.

It is independent of the rest of ``mkt_assets`` on purpose, so tests of the client are not
circular. ``mkt-assets sandbox`` (``server.main``) serves one from the command line.
"""

from .data import ACCESS_TYPES, FILTERS, LOCALES, RESOURCES, SandboxData
from .server import FAULT_KINDS, Fault, RequestRecord, SandboxServer, main
from .webhooks import (
    DELIVERY_FAULT_KINDS,
    EVENT_HEADER,
    EVENTS,
    SIGNATURE_HEADER,
    ChangeResult,
    DeliveryFault,
    DeliveryRecord,
    DeliverySettings,
)

__all__ = [
    "ACCESS_TYPES", "DELIVERY_FAULT_KINDS", "EVENTS", "EVENT_HEADER", "FAULT_KINDS", "FILTERS", "LOCALES", "RESOURCES",
    "SIGNATURE_HEADER", "ChangeResult", "DeliveryFault", "DeliveryRecord", "DeliverySettings", "Fault",
    "RequestRecord", "SandboxData", "SandboxServer", "main",
]  # fmt: skip
