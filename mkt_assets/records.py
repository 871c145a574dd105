"""Every record checked against the catalog as it is read: its key, and every value of exactly
the type its column holds.

DuckDB casts leniently: a JSON ``2.5`` read as BIGINT becomes 2 (the JSON reader) or 3 (a cast
from text), ``true`` becomes 1, ``"t"`` becomes true, and a number read as VARCHAR is reprinted
through a double (``2.50`` lands as ``2.5``). So values are checked here, while they are still
what the API sent, against the official types (integers, booleans, strings): a value that would
not land exactly fails the read, naming the record, the field and the value. Timestamps are
checked for being strings; DuckDB's cast then checks their format and names a bad one.

No Dagster, no HTTP: a pure function of the catalog and a page's parsed records.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from mkt_assets.catalog import Column, ResourceSpec

BIGINT_RANGE = range(-(1 << 63), 1 << 63)
# How much of an offending value a message quotes: enough to recognise it, never a whole page.
_QUOTED_CHARACTERS = 80


class RecordProblem(Exception):
    """A record that cannot land exactly: ``str()`` says which and why, without its other values."""


def quoted(value: object) -> str:
    """A value as JSON text, cut to a length a log line can carry."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return shortened(text)


def shortened(text: str) -> str:
    return text if len(text) <= _QUOTED_CHARACTERS else text[: _QUOTED_CHARACTERS - 3] + "..."


def _why_not(duckdb_type: str, value: object) -> str | None:
    """Why ``value`` (not None) would not land exactly in a column of ``duckdb_type``."""
    if duckdb_type == "BIGINT":
        if type(value) is not int:
            return "not an integer"
        return None if value in BIGINT_RANGE else "outside the 64-bit integer range"
    if duckdb_type == "BOOLEAN":
        return None if type(value) is bool else "not a boolean"
    if duckdb_type in ("VARCHAR", "TIMESTAMPTZ"):
        return None if type(value) is str else "not a string"
    return None  # JSON holds anything


# The exact Python type each column type takes from the JSON parser (None for any).
_PYTHON_TYPES: dict[str, type | None] = {"BIGINT": int, "BOOLEAN": bool, "VARCHAR": str, "TIMESTAMPTZ": str, "JSON": None}


def record_checker(spec: ResourceSpec) -> Callable[[Sequence[dict[str, Any]], int], None]:
    """A function that checks a page's records (and its number, for the message), raising
    ``RecordProblem`` on the first record that cannot land exactly."""
    key = spec.primary_key
    # One exact type comparison per present value on the common path (millions a sync);
    # the slow path below says what is wrong.
    scalars = tuple(
        (column.api_name, _PYTHON_TYPES[column.duckdb_type], column.duckdb_type == "BIGINT")
        for column in spec.columns
        if not column.fields and _PYTHON_TYPES[column.duckdb_type] is not None
    )
    lists = tuple(column for column in spec.columns if column.fields)
    columns = spec.columns

    def check(records: Sequence[dict[str, Any]], page: int) -> None:
        for position, record in enumerate(records, start=1):
            if record.get(key) is None:
                raise RecordProblem(
                    f"record {position} of page {page} has no {key!r}"
                    f" (its fields: {', '.join(sorted(map(str, record))) or 'none'})"
                )
            for name, expected, ranged in scalars:
                value = record.get(name)
                if value is not None and (type(value) is not expected or (ranged and value not in BIGINT_RANGE)):
                    _explain(columns, record, position, page)
            for column in lists:
                value = record.get(column.api_name)
                if value is not None:
                    _check_value(column, value, position, page)

    return check


def _explain(columns: Sequence[Column], record: dict[str, Any], position: int, page: int) -> None:
    for column in columns:
        value = record.get(column.api_name)
        if value is not None:
            _check_value(column, value, position, page)


def _check_value(column: Column, value: object, position: int, page: int) -> None:
    if not column.fields:
        why = _why_not(column.duckdb_type, value)
        if why is not None:
            raise _problem(position, page, column.api_name, f"column {column.name} {column.sql_type}", value, why)
        return
    if type(value) is not list:
        raise _problem(position, page, column.api_name, f"column {column.name}", value, "not a list")
    for index, member in enumerate(value):
        if member is None:
            continue
        if type(member) is not dict:
            label = f"{column.api_name}[{index}]"
            raise _problem(position, page, label, f"column {column.name}", member, "not an object")
        for field in column.fields:
            item = member.get(field.api_name)
            if item is None:
                continue
            why = _why_not(field.duckdb_type, item)
            if why is not None:
                label = f"{column.api_name}[{index}].{field.api_name}"
                raise _problem(position, page, label, f"column {column.name}, member {field.name} {field.sql_type}", item, why)


def _problem(position: int, page: int, label: str, column: str, value: object, why: str) -> RecordProblem:
    return RecordProblem(
        f"record {position} of page {page}: field {label!r} ({column}) cannot hold {quoted(value)}: {why}"
    )
