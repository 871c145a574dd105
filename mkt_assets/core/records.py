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
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from mkt_assets.core.catalog import Column, ResourceSpec

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

# Checks a page's records (and its number, for the message: 0 for a record read alone, by its
# key); returns the unknown field names.
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


# ISO 8601's extended form with an offset, as both ways DuckDB reads a TIMESTAMPTZ (its JSON
# reader and a cast from text) read it, to the same instant as Python. fromisoformat alone
# also takes basic (20240101T000000+0000) and week (2024-W01-1) forms, a lowercase t, a comma
# before the fraction and a space before the offset, which DuckDB refuses; DuckDB takes zone
# names (read differently by its two ways), and a time without an offset in the session's zone.
_DATETIME_WITH_OFFSET = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]*)?)?"
    r"(?:Z|[+-][0-9]{2}(?:(?::[0-9]{2}){1,2}|[0-9]{2})?)"
)


def _is_datetime_with_offset(text: str) -> bool:
    if _DATETIME_WITH_OFFSET.fullmatch(text) is None:
        return False
    try:
        datetime.fromisoformat(text)  # a real date and time: no February 30th, no hour 24
    except ValueError:
        return False
    return True


# A JSON escape of a UTF-16 surrogate (U+D800 to U+DFFF; JSON allows either case of hex digits).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# Its start, which a page without any is searched for: the fastest test measured (a regex
# with a literal prefix beats bytes.find, and a lowered copy of the body costs more still).
_SURROGATE_START = re.compile(rb"\\u[dD][89a-fA-F]")


def has_lone_surrogate(body: bytes) -> bool:
    """Whether the JSON ``body`` escapes half a surrogate pair alone (``"\\ud800"``).

    Python reads it into a text that is not Unicode; DuckDB refuses the whole staged page as
    malformed JSON. Most pages escape no surrogate at all, which one search tells."""
    first = _SURROGATE_START.search(body)
    if first is None:
        return False
    low_expected_at = -1
    for match in _SURROGATE_ESCAPE.finditer(body, first.start()):
        start = match.start()
        before = start
        while before and body[before - 1] == 0x5C:  # a backslash
            before -= 1
        if (start - before) % 2:
            continue  # an escaped backslash followed by the letters u, d, 8...: text
        if int(match[0][2:], 16) >= 0xDC00:
            if start != low_expected_at:
                return True
            low_expected_at = -1
            continue
        following = _SURROGATE_ESCAPE.match(body, match.end())
        if following is None or int(following[0][2:], 16) < 0xDC00:
            return True
        low_expected_at = match.end()
    return False


def lone_surrogate_problem(spec: ResourceSpec, records: Sequence[dict[str, Any]], page: int) -> RecordProblem:
    """Which field of which record holds a lone surrogate (the body has one: ``has_lone_surrogate``)."""
    by_name = {column.api_name: column for column in spec.columns}
    for position, record in enumerate(records, start=1):
        for label, where in _lone_surrogates(record, "", by_name):
            return RecordProblem(
                f"{_place(position, page)}: field {label!r} ({where}) cannot hold a text with a lone"
                " surrogate (an unpaired \\ud800-\\udfff escape), which is not Unicode: DuckDB refuses it"
            )
    return RecordProblem(
        f"{f'page {page}' if page else 'the answer'}: the body holds a text with a lone surrogate (an unpaired \\ud800-\\udfff escape) outside"
        " its records, which is not Unicode: DuckDB refuses the page"
    )


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogates(value: object, label: str, by_name: dict[str, Column]) -> Iterator[tuple[str, str]]:
    """The (label, where) of each text in ``value`` that is not Unicode, a field name included."""
    if type(value) is str:
        if not _is_unicode(value):
            yield label, _where(label, by_name)
    elif type(value) is dict:
        for name, item in value.items():
            if not _is_unicode(name):
                yield (label or "(record)") + ".<a field name>", "a field name"
                continue
            yield from _lone_surrogates(item, f"{label}.{name}" if label else name, by_name)
    elif type(value) is list:
        for index, item in enumerate(value):
            yield from _lone_surrogates(item, f"{label}[{index}]", by_name)


def _where(label: str, by_name: dict[str, Column]) -> str:
    column = by_name.get(re.split(r"[.\[]", label, maxsplit=1)[0])
    if column is None:
        return "not in the catalog, kept in _extra"
    member = re.match(r"\[[0-9]+\]\.([^.\[]*)", label[len(column.api_name) :])
    if column.fields and member is not None:
        known = next((field for field in column.fields if field.api_name == member[1]), None)
        if known is None:
            return "not in the catalog, kept in _extra"
        return f"column {column.name}, member {known.name} {known.sql_type}"
    return f"column {column.name} {column.sql_type}"


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
                    f"{_place(position, page)} has no {key!r}"
                    f" (its fields: {listed(sorted(map(str, record))) or 'none'})"
                )
            if not known.issuperset(record):
                unknown.update(record.keys() - known)
            for name, expected, duckdb_type in scalars:
                value = record.get(name)
                if value is not None and (
                    type(value) is not expected
                    or (duckdb_type == "BIGINT" and value not in BIGINT_RANGE)
                    or (duckdb_type == "TIMESTAMPTZ" and not _is_datetime_with_offset(value))  # type: ignore[arg-type]  # a str: its type was just compared
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
    return RecordProblem(f"{_place(position, page)}: field {label!r} ({where}) cannot hold {shown}: {why}")


def _place(position: int, page: int) -> str:
    """Where a record is, as a message names it: page 0 holds a record read alone, by its key."""
    return f"record {position} of page {page}" if page else "the record"
