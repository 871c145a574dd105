"""Every record checked against the catalog as it is read: its key, every value of exactly the
type its column holds, and the fields the catalog does not know.

DuckDB casts leniently: a JSON ``2.5`` read as BIGINT becomes 2 (the JSON reader) or 3 (a cast
from text), ``true`` becomes 1, ``"t"`` becomes true, and a number read as VARCHAR is reprinted
through a double (``2.50`` lands as ``2.5``). So values are checked here, while they are still
what the API sent, against the official types (integers, booleans, strings, ISO 8601 date-times
with an offset): a value that would not land exactly fails the read, naming the record and the
field, and the value where it cannot be personal (an id, a flag, a date; never a text).

No Dagster, no HTTP: a pure function of the catalog and a page's parsed records.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from mkt_assets.catalog import Column, ResourceSpec

BIGINT_RANGE = range(-(1 << 63), 1 << 63)
# How much of an offending value a message quotes: enough to recognise it, never a whole page.
_QUOTED_CHARACTERS = 80
# How many field names a message lists.
_LISTED_NAMES = 20
# The exact Python type each column type takes from the JSON parser (None for any).
_PYTHON_TYPES: dict[str, type | None] = {"BIGINT": int, "BOOLEAN": bool, "VARCHAR": str, "TIMESTAMPTZ": str, "JSON": None}
_JSON_TYPE_NAMES: dict[type, str] = {
    bool: "a boolean", int: "a number", float: "a number", str: "a text", list: "a list", dict: "an object"
}

# Values of these types can be shown in a message; a text, a list or an object could be personal.
_QUOTABLE_TYPES = frozenset({"BIGINT", "BOOLEAN", "TIMESTAMPTZ"})

# Checks a page's records (and its number, for the message); returns the unknown field names.
RecordChecker = Callable[[Sequence[dict[str, Any]], int], set[str]]


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


def listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_LISTED_NAMES])
    return shown + (f" and {len(names) - _LISTED_NAMES} more" if len(names) > _LISTED_NAMES else "")


def _why_not(duckdb_type: str, value: object) -> str | None:
    """Why ``value`` (not None) would not land exactly in a column of ``duckdb_type``."""
    if duckdb_type == "BIGINT":
        if type(value) is not int:
            return "not an integer"
        return None if value in BIGINT_RANGE else "outside the 64-bit integer range"
    if duckdb_type == "BOOLEAN":
        return None if type(value) is bool else "not a boolean"
    if duckdb_type == "VARCHAR":
        return None if type(value) is str else "not a text"
    if duckdb_type == "TIMESTAMPTZ":
        if type(value) is not str:
            return "not an ISO 8601 date-time"
        return None if _is_datetime_with_offset(value) else "not an ISO 8601 date-time with an offset"
    return None  # JSON holds anything


def _is_datetime_with_offset(text: str) -> bool:
    # One rule for both ways DuckDB reads a timestamp (they disagree on names such as PST or
    # Europe/Paris, and a time without an offset would be read in the session's zone).
    try:
        return datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        return False


def record_checker(spec: ResourceSpec) -> RecordChecker:
    """A function that checks a page's records (and its number, for the message), raising
    ``RecordProblem`` on the first record that cannot land exactly, and returning the names of
    the fields the catalog does not know (``tags[].color`` for a list member's)."""
    key = spec.primary_key
    known = spec.known_fields
    # One exact type comparison per present value on the common path (millions a sync);
    # the slow path below says what is wrong.
    scalars = tuple(
        (column.api_name, _PYTHON_TYPES[column.duckdb_type], column.duckdb_type)
        for column in spec.columns
        if not column.fields and not column.member and _PYTHON_TYPES[column.duckdb_type] is not None
    )
    # Objects of which one field is kept (an enrollment's contact: its id).
    objects = tuple(column for column in spec.columns if column.member)
    lists = tuple(
        (
            column.api_name,
            column,
            frozenset(member.api_name for member in column.fields),
            tuple((member.api_name, _PYTHON_TYPES[member.duckdb_type], member.duckdb_type == "BIGINT") for member in column.fields),
        )
        for column in spec.columns
        if column.fields
    )
    columns = spec.columns

    def check(records: Sequence[dict[str, Any]], page: int) -> set[str]:
        unknown: set[str] = set()
        for position, record in enumerate(records, start=1):
            if record.get(key) is None:
                raise RecordProblem(
                    f"record {position} of page {page} has no {key!r}"
                    f" (its fields: {listed(sorted(map(str, record))) or 'none'})"
                )
            if not known.issuperset(record):
                unknown.update(record.keys() - known)
            for name, expected, duckdb_type in scalars:
                value = record.get(name)
                if value is not None and (
                    type(value) is not expected
                    or (duckdb_type == "BIGINT" and value not in BIGINT_RANGE)
                    or (duckdb_type == "TIMESTAMPTZ" and not _is_datetime_with_offset(value))
                ):
                    _explain(columns, record, position, page)
            for column in objects:
                value = record.get(column.api_name)
                if value is not None:
                    _check_object(column, value, position, page)
            for name, column, members, member_types in lists:
                value = record.get(name)
                if value is None:
                    continue
                if type(value) is not list:
                    _check_list(column, members, value, position, page, unknown)
                for member in value:
                    # The common path, inline: a member of the known fields, each of its type.
                    if type(member) is not dict or not members.issuperset(member):
                        _check_list(column, members, value, position, page, unknown)
                        break
                    for field_name, expected, ranged in member_types:
                        item = member.get(field_name)
                        if item is not None and (type(item) is not expected or (ranged and item not in BIGINT_RANGE)):
                            _check_list(column, members, value, position, page, unknown)
        return unknown

    return check


def _check_object(column: Column, value: object, position: int, page: int) -> None:
    if type(value) is not dict:
        raise _problem(position, page, column.api_name, f"column {column.name}", column, value, "not an object")
    item = value.get(column.member)
    why = None if item is None else _why_not(column.duckdb_type, item)
    if why is not None:
        label = f"{column.api_name}.{column.member}"
        raise _problem(position, page, label, f"column {column.name} {column.sql_type}", column, item, why)


def _explain(columns: Sequence[Column], record: dict[str, Any], position: int, page: int) -> None:
    for column in columns:
        value = record.get(column.api_name)
        if value is not None and not column.fields and not column.member:
            why = _why_not(column.duckdb_type, value)
            if why is not None:
                raise _problem(position, page, column.api_name, f"column {column.name} {column.sql_type}", column, value, why)


def _check_list(
    column: Column, members: frozenset[str], value: object, position: int, page: int, unknown: set[str]
) -> None:
    if type(value) is not list:
        raise _problem(position, page, column.api_name, f"column {column.name}", column, value, "not a list")
    for index, member in enumerate(value):
        if member is None:
            continue
        if type(member) is not dict:
            raise _problem(position, page, f"{column.api_name}[{index}]", f"column {column.name}", column, member, "not an object")
        if not members.issuperset(member):
            unknown.update(f"{column.api_name}[].{name}" for name in member.keys() - members)
        for field in column.fields:
            item = member.get(field.api_name)
            if item is None:
                continue
            why = _why_not(field.duckdb_type, item)
            if why is not None:
                label = f"{column.api_name}[{index}].{field.api_name}"
                raise _problem(position, page, label, f"column {column.name}, member {field.name} {field.sql_type}", field, item, why)


def _problem(position: int, page: int, label: str, where: str, column: Column, value: object, why: str) -> RecordProblem:
    # A text may be anyone's e-mail, name or phone number: it is described, never quoted.
    if column.duckdb_type in _QUOTABLE_TYPES:
        shown = quoted(value)
    else:
        shown = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
    return RecordProblem(f"record {position} of page {page}: field {label!r} ({where}) cannot hold {shown}: {why}")
