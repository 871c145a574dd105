"""``webhook_events``: every delivery the receiver kept, in the warehouse.

The sales events are in no list of the API, so this table is the analyst's only record of them;
for the contact events it says what changed and when, beside the contact the refresh read.
Deliveries land in the order the inbox numbered them (``seq``), from the first one the table
lacks, so a run that failed lands nothing and the next lands what it would have: the table is
the inbox's copy, however the runs went.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import duckdb

from mkt_assets.core.deliveries import Delivery
from mkt_assets.warehouse.connection import WarehouseFile, transaction
from mkt_assets.warehouse.sql_names import fully_qualified, made_table, table_exists

WEBHOOK_EVENTS_TABLE = "webhook_events"
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("seq", "BIGINT PRIMARY KEY", "The inbox's number of the delivery: the order of arrival, never reused."),
    ("received_at", "TIMESTAMPTZ NOT NULL", "When the receiver kept it."),
    ("event_type", "VARCHAR", "The event (CONTACT_TAG_ADDED, SALE_NEW, ...); null if the delivery named none."),
    ("contact_id", "BIGINT", "The contact it names; null if none could be found in it."),
    ("signature_verified", "BOOLEAN NOT NULL", "Its signature matched the webhook secret (the receiver keeps no other)."),
    ("digest", "VARCHAR NOT NULL", "SHA-256 of the raw body: the same body sent twice is one delivery."),
    ("body", "JSON NOT NULL", "The body as received (a lone UTF-16 surrogate, which DuckDB's JSON refuses, as U+FFFD)."),
)
# Deliveries read from the inbox and inserted at a time: a body may be up to 1 MB.
BATCH = 200
_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class LandedDeliveries:
    landed: int  # deliveries this run added
    rows: int  # deliveries the table holds
    without_contact: int  # of them, those naming no contact
    last_seq: int  # the newest the table holds (0: none)


# What reads the inbox: the deliveries after a seq, in order, at most ``limit``.
ReadDeliveries = Callable[[int, int], Sequence[Delivery]]


def land_deliveries(file: WarehouseFile, schema: str, read: ReadDeliveries, up_to: int | None = None) -> LandedDeliveries:
    """Add to ``schema.webhook_events`` every delivery ``read`` gives past the newest the table
    holds, up to ``up_to`` (None: as many as there are), in one transaction."""
    with file.open() as connection:
        target = fully_qualified(connection, schema, WEBHOOK_EVENTS_TABLE)
        landed = 0
        with transaction(connection, f"landing the webhook deliveries in {schema}.{WEBHOOK_EVENTS_TABLE}"):
            _ensure_table(connection, schema, target)
            after = _last_seq(connection, target)
            while up_to is None or after < up_to:
                deliveries = [d for d in read(after, BATCH) if up_to is None or d.seq <= up_to]
                if not deliveries:
                    break
                connection.executemany(
                    f"INSERT OR IGNORE INTO {target} VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (d.seq, d.received_at, d.event_type, d.contact_id, d.signature_verified, d.digest, _storable(d.body))
                        for d in deliveries
                    ],
                )
                landed += len(deliveries)
                after = deliveries[-1].seq
        return LandedDeliveries(landed, *_facts(connection, target))


def webhook_events_facts(connection: duckdb.DuckDBPyConnection, schema: str) -> LandedDeliveries:
    """The table's facts without landing anything (all zero when it does not exist yet)."""
    if not table_exists(connection, schema, WEBHOOK_EVENTS_TABLE):
        return LandedDeliveries(0, 0, 0, 0)
    return LandedDeliveries(0, *_facts(connection, fully_qualified(connection, schema, WEBHOOK_EVENTS_TABLE)))


def _ensure_table(connection: duckdb.DuckDBPyConnection, schema: str, target: str) -> None:
    connection.execute(f"CREATE SCHEMA IF NOT EXISTS {fully_qualified(connection, schema)}")
    connection.execute(f"CREATE TABLE IF NOT EXISTS {target} ({', '.join(f'{name} {kind}' for name, kind, _ in COLUMNS)})")
    made_table(connection, schema, WEBHOOK_EVENTS_TABLE)


def _last_seq(connection: duckdb.DuckDBPyConnection, target: str) -> int:
    (last,) = connection.execute(f"SELECT coalesce(max(seq), 0) FROM {target}").fetchone()  # type: ignore[misc]
    return int(last)


def _facts(connection: duckdb.DuckDBPyConnection, target: str) -> tuple[int, int, int]:
    rows, without_contact, last = connection.execute(
        f"SELECT count(*), count(*) FILTER (WHERE contact_id IS NULL), coalesce(max(seq), 0) FROM {target}"
    ).fetchone()  # type: ignore[misc]
    return int(rows), int(without_contact), int(last)


def _storable(body: str) -> str:
    """``body`` as DuckDB's JSON takes it: the receiver accepted it as a JSON object, and only a
    lone surrogate escape (valid to Python, not to DuckDB) must be mended."""
    if not _LONE_SURROGATE_ESCAPE.search(body):
        return body
    # A pair (an emoji) decodes to one character; only a lone half is left to replace.
    return _SURROGATE.sub("\ufffd", json.dumps(json.loads(body), ensure_ascii=False))
