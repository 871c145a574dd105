"""The record checks agree with the warehouse: a date-time or a text they let through is one
DuckDB reads (both ways it reads them) to the same value, and what DuckDB would refuse fails
as the page is read, naming the resource, the request, the record and the field."""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import duckdb
import pytest
import responses

from mkt_assets.core.catalog import RESOURCES_BY_NAME
from mkt_assets.core.errors import ApiResponseError
from mkt_assets.core.records import _is_datetime_with_offset, has_lone_surrogate
from mkt_assets.source.client import MarketingApiClient

BASE = "https://api.example.test/api"
CONTACTS = RESOURCES_BY_NAME["contacts"]

# The pieces of a date-time text; the first of each pair says whether it is ISO 8601's
# extended form (what the API documents), the second the text.
DATES = [(True, "2024-01-01"), (True, "0001-01-01"), (True, "9999-12-31"), (True, "2024-02-29"), (True, "2023-02-29"),
         (False, "20240101"), (False, "2024-W01-1"), (False, "2024-001"), (False, "24-01-01"), (False, "2024-1-1"),
         (False, "2024/01/01"), (False, "10000-01-01"), (False, "-2024-01-01"), (False, "２０２４-01-01")]  # fmt: skip
SEPARATORS = [(True, "T"), (True, " "), (False, "t"), (False, "  ")]
TIMES = [(True, "00:00:00"), (True, "23:59:59"), (True, "12:30"), (True, "00:00:00.5"), (True, "00:00:00.123456"),
         (True, "00:00:00.1234567"), (True, "00:00:00."), (True, "24:00:00"), (True, "23:59:60"), (False, "000000"),
         (False, "00"), (False, "00:00:00,5"), (False, "0:0:0"), (False, "00:00.5")]  # fmt: skip
OFFSETS = [(True, "Z"), (True, "+00:00"), (True, "-00:00"), (True, "+05:30"), (True, "+0530"), (True, "+05"),
           (True, "-12:00"), (True, "+05:30:15"), (False, "+053015"), (True, "+16:00"), (True, "+24:00"),
           (False, ""), (False, "z"), (False, " +00:00"), (False, "+05:30:15.5"), (False, "+1"), (False, "+100"),
           (False, "+05:3015"), (False, "UTC"), (False, " UTC"), (False, " Europe/Paris"), (False, " PST"),
           (False, "ZZ"), (False, "+00:00 "), (False, "+00:00\x00"), (False, "+00:00\n")]  # fmt: skip
OTHERS = ["infinity", "-infinity", "epoch", "", " 2024-01-01T00:00:00+00:00", "2024-01-01T00:00:00+00:00 BC"]


def forms() -> list[tuple[bool, str]]:
    """Every time with every offset, and every date with every separator (a product of all
    four would be twenty thousand texts, each read by DuckDB on its own)."""
    date, separator = DATES[0], SEPARATORS[0]
    time, offset = TIMES[0], OFFSETS[1]
    combined = [*itertools.product([date], [separator], TIMES, OFFSETS), *itertools.product(DATES, SEPARATORS, [time], [offset])]
    return [(all(iso for iso, _ in parts), "".join(text for _, text in parts)) for parts in combined] + [
        (False, text) for text in OTHERS
    ]


def duckdb_instants(texts: list[str], directory: Path) -> tuple[list[int | None], list[int | None]]:
    """Each text as DuckDB reads it into a TIMESTAMPTZ (epoch microseconds, None if refused),
    by a cast from text (the raw merge path) and by its JSON reader (the typed path)."""
    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'America/New_York'")  # a time without an offset shows
    cast = []
    for text in texts:
        try:
            cast.append(connection.execute("SELECT epoch_us(CAST(? AS TIMESTAMPTZ))", [text]).fetchone()[0])
        except duckdb.Error:
            cast.append(None)
    read: list[int | None] = []
    for index, text in enumerate(texts):
        if cast[index] is None:
            read.append(None)  # the check must refuse it anyway: the raw path could not read it
            continue
        path = directory / f"{index}.ndjson"
        path.write_text(json.dumps({"t": text}) + "\n")
        try:
            read.append(
                connection.execute(
                    "SELECT epoch_us(t) FROM read_json(?, format = 'newline_delimited', columns = {'t': 'TIMESTAMPTZ'})",
                    [str(path)],
                ).fetchone()[0]
            )
        except duckdb.Error:
            read.append(None)
    return cast, read


def python_instant(text: str) -> int:
    return (datetime.fromisoformat(text) - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)


def test_a_date_time_passes_the_check_exactly_when_duckdb_reads_it_both_ways_to_the_same_instant(tmp_path: Path) -> None:
    every = forms()
    cast, read = duckdb_instants([text for _, text in every], tmp_path)

    wrong = []
    for (iso, text), by_cast, by_reader in zip(every, cast, read, strict=True):
        accepted = _is_datetime_with_offset(text)
        duckdb_agrees = by_cast is not None and by_cast == by_reader
        if accepted and not (duckdb_agrees and python_instant(text) == by_cast):
            wrong.append(f"{text!r}: passes the check, but DuckDB reads it as {by_cast} (cast) and {by_reader} (reader)")
        # Every ISO extended form with an offset DuckDB reads, the check lets through (a few,
        # such as hour 24 and offset +24:00, DuckDB reads and Python does not: refused at read).
        if iso and duckdb_agrees and not accepted and not _python_refuses(text):
            wrong.append(f"{text!r}: refused by the check, though DuckDB reads it")
    assert wrong == [], "\n".join(wrong)
    assert sum(_is_datetime_with_offset(text) for _, text in every) > 50


def _python_refuses(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize(
    "text", ["20240101T000000+0000", "2024-W01-1T00:00:00+00:00", "2024-01-01t00:00:00Z", "2024-01-01T00:00:00,5+00:00",
             "2024-01-01T00:00:00 +00:00", "2024-01-01T00+00:00", "2024-01-01T00:00:00+00:00\x00"],
)  # fmt: skip
@responses.activate
def test_forms_python_reads_and_duckdb_does_not_fail_as_the_page_is_read(text: str) -> None:
    items = [{"id": 1, "email": "a@example.com", "registeredAt": "2024-01-01T00:00:00+00:00"},
             {"id": 2, "email": "b@example.com", "registeredAt": text}]  # fmt: skip
    responses.get(f"{BASE}/contacts", json={"items": items, "hasMore": False})

    with MarketingApiClient(BASE, "k", order="asc") as client, pytest.raises(ApiResponseError) as caught:
        list(client.iter_pages(CONTACTS))

    assert str(caught.value) == (
        "contacts: GET /api/contacts?limit=100&order=asc: record 2 of page 1: field 'registeredAt'"
        f" (column registered_at TIMESTAMPTZ) cannot hold {json.dumps(text)}: not an ISO 8601 date-time with an offset"
    )


# ------------------------------------------------------------------------ lone surrogates


@pytest.mark.parametrize(
    ("body", "lone"),
    [
        (rb'{"a": "plain"}', False),
        (rb'{"a": "caf\u00e9"}', False),
        (rb'{"a": "\ud83d\ude00"}', False),  # a pair: one emoji
        (rb'{"a": "\uD83D\uDE00\ud83d\ude01"}', False),
        (rb'{"a": "\\ud800"}', False),  # an escaped backslash, then text
        (rb'{"a": "\ud800"}', True),
        (rb'{"a": "\uDFFF"}', True),
        (rb'{"a": "x\ude00"}', True),  # a low half alone
        (rb'{"a": "\ud83d\ud83d\ude00"}', True),  # a high half followed by a pair
        (rb'{"a": "\ud83dx"}', True),
        (rb'{"a": "\\\ud800"}', True),  # an escaped backslash, then the escape
        (rb'{"a": "\ud83d\u0041"}', True),
    ],
)
def test_a_lone_surrogate_escape_is_told_from_a_pair_and_from_text(body: bytes, lone: bool) -> None:
    assert has_lone_surrogate(body) is lone
    # What DuckDB's reader thinks of the same text, for the record.
    connection = duckdb.connect()
    try:
        connection.execute("SELECT json(?)", [body.decode()]).fetchone()
        duckdb_refuses = False
    except duckdb.Error:
        duckdb_refuses = True
    assert duckdb_refuses is lone


def contact(**fields: Any) -> dict[str, Any]:
    return {"id": 2, "email": "b@example.com", **fields}


LONE = "\ud800"


@pytest.mark.parametrize(
    ("record", "said"),
    [
        (contact(email="b" + LONE + "@example.com"), "field 'email' (column email VARCHAR)"),
        (contact(tags=[{"id": 1, "name": "ok"}, {"id": 7, "name": "t" + LONE}]), "field 'tags[1].name' (column tags, member name VARCHAR)"),
        (contact(fields=[{"slug": "city", "value": LONE + "x"}]), "field 'fields[0].value' (column fields, member value VARCHAR)"),
        (contact(score={"deep": ["a", LONE]}), "field 'score.deep[1]' (not in the catalog, kept in _extra)"),
        (contact(tags=[{"id": 7, "name": "t", "color": LONE}]), "field 'tags[0].color' (not in the catalog, kept in _extra)"),
        (contact(**{"odd" + LONE: 1}), "field '(record).<a field name>' (a field name)"),
    ],
)  # fmt: skip
@responses.activate
def test_a_text_with_a_lone_surrogate_fails_as_the_page_is_read_never_quoted(record: dict[str, Any], said: str) -> None:
    items = [{"id": 1, "email": "a@example.com", "tags": [{"id": 1, "name": "\U0001f600"}]}, record]
    # json.dumps escapes every non-ASCII character, the emoji as a pair, the lone half alone.
    responses.get(f"{BASE}/contacts", body=json.dumps({"items": items, "hasMore": False}), content_type="application/json")

    with MarketingApiClient(BASE, "k", order="asc") as client, pytest.raises(ApiResponseError) as caught:
        list(client.iter_pages(CONTACTS))

    message = str(caught.value)
    assert message == (
        f"contacts: GET /api/contacts?limit=100&order=asc: record 2 of page 1: {said} cannot hold a text with a lone"
        " surrogate (an unpaired \\ud800-\\udfff escape), which is not Unicode: DuckDB refuses it"
    )
    message.encode("utf-8")  # a message that is itself Unicode, so any log can carry it
    assert "example.com" not in message


@responses.activate
def test_a_lone_surrogate_outside_the_records_fails_the_page() -> None:
    body = json.dumps({"items": [{"id": 1, "email": "a@example.com"}], "hasMore": False, "note": LONE})
    responses.get(f"{BASE}/contacts", body=body, content_type="application/json")

    with MarketingApiClient(BASE, "k", order="asc") as client, pytest.raises(ApiResponseError, match="outside its records"):
        list(client.iter_pages(CONTACTS))


@responses.activate
def test_escaped_pairs_and_escaped_backslashes_pass() -> None:
    items = [{"id": 1, "email": "a@example.com", "tags": [{"id": 1, "name": "\U0001f600 \\ud800"}]}]
    responses.get(f"{BASE}/contacts", body=json.dumps({"items": items, "hasMore": False}), content_type="application/json")

    with MarketingApiClient(BASE, "k", order="asc") as client:
        (page,) = list(client.iter_pages(CONTACTS))

    assert page.items == items
