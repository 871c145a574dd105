"""webhook_events: every delivery of the inbox lands once, in order, whatever the runs did; one
naming no contact is kept and counted; and the sensor batches what it finds into one refresh."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from mkt_assets.core.deliveries import WEBHOOK_SECRET_ENV, parse, webhook_secret
from mkt_assets.orchestration import webhooks
from mkt_assets.orchestration.names import Names
from mkt_assets.orchestration.webhooks import refresh_requests, webhook_events_key
from mkt_assets.run.refresh import MAX_REFRESH_KEYS
from mkt_assets.warehouse.connection import WarehouseFile
from mkt_assets.warehouse.webhook_events import land_deliveries
from mkt_assets.webhooks.inbox import MAX_READ, Inbox


def body(number: int | None, event: str = "CONTACT_TAG_ADDED", **extra: object) -> bytes:
    contact = {"contact": {"id": number, "email": f"c{number}@example.com"}} if number is not None else {}
    return json.dumps({"type": event, **contact, **extra}).encode()


def keep(inbox: Inbox, *raws: bytes) -> None:
    for raw in raws:
        inbox.add(raw, parse(raw))


def rows(database: Path) -> list[tuple[object, ...]]:
    with duckdb.connect(str(database), read_only=True) as connection:
        return connection.execute(
            "SELECT seq, event_type, contact_id, signature_verified, body->>'$.type' FROM marketing.webhook_events ORDER BY seq"
        ).fetchall()


def test_each_delivery_lands_once_in_order_and_a_later_run_lands_only_what_is_new(tmp_path: Path) -> None:
    file = WarehouseFile(str(tmp_path / "w.duckdb"))
    with Inbox(tmp_path / "w.webhooks.sqlite") as inbox:
        keep(inbox, body(1), body(2, "CONTACT_OPT_IN"), body(None, "SALE_NEW", order={"id": 9}))
        first = land_deliveries(file, "marketing", inbox.since)
        keep(inbox, body(1), body(3, "CONTACT_TAG_REMOVED"))  # the first is a duplicate: kept once
        second = land_deliveries(file, "marketing", inbox.since)
        third = land_deliveries(file, "marketing", inbox.since)

    assert (first.landed, first.rows, first.without_contact, first.last_seq) == (3, 3, 1, 3)
    assert (second.landed, second.rows, second.last_seq) == (1, 4, 4)
    assert (third.landed, third.rows) == (0, 4)
    assert rows(tmp_path / "w.duckdb") == [
        (1, "CONTACT_TAG_ADDED", 1, True, "CONTACT_TAG_ADDED"),
        (2, "CONTACT_OPT_IN", 2, True, "CONTACT_OPT_IN"),
        (3, "SALE_NEW", None, True, "SALE_NEW"),
        (4, "CONTACT_TAG_REMOVED", 3, True, "CONTACT_TAG_REMOVED"),
    ]


def test_a_landing_that_fails_lands_nothing_and_the_next_lands_it_all(tmp_path: Path) -> None:
    file = WarehouseFile(str(tmp_path / "w.duckdb"))
    with Inbox(tmp_path / "w.webhooks.sqlite") as inbox:
        keep(inbox, *(body(number) for number in range(1, 11)))
        land_deliveries(file, "marketing", inbox.since)
        keep(inbox, *(body(number) for number in range(11, 451)))  # three batches more

        def failing_on_the_second_batch(after: int, limit: int) -> list[object]:
            if after > 10:
                raise OSError("the inbox's disk went away")
            return list(inbox.since(after, limit))

        with pytest.raises(OSError, match="disk went away"):
            land_deliveries(file, "marketing", failing_on_the_second_batch)  # type: ignore[arg-type]
        assert [row[0] for row in rows(tmp_path / "w.duckdb")] == list(range(1, 11))
        landed = land_deliveries(file, "marketing", inbox.since)
    assert (landed.landed, landed.rows, landed.last_seq) == (440, 450, 450)
    assert [row[0] for row in rows(tmp_path / "w.duckdb")] == list(range(1, 451))


def test_a_body_with_a_lone_surrogate_lands_mended_not_refused(tmp_path: Path) -> None:
    # Valid JSON to the receiver (Python's parser), refused by DuckDB's: "\ud800" alone.
    raw = b'{"type": "CONTACT_OPT_IN", "contact": {"id": 5, "firstName": "A\\ud800B", "emoji": "\\ud83d\\ude00"}}'
    file = WarehouseFile(str(tmp_path / "w.duckdb"))
    with Inbox(tmp_path / "w.webhooks.sqlite") as inbox:
        keep(inbox, raw)
        land_deliveries(file, "marketing", inbox.since)
    with duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True) as connection:
        name, emoji = connection.execute(
            "SELECT body->>'$.contact.firstName', body->>'$.contact.emoji' FROM marketing.webhook_events"
        ).fetchone()  # type: ignore[misc]
    assert (name, emoji) == ("A\ufffdB", "\U0001f600")


def test_the_sensor_batches_a_burst_into_one_refresh_and_splits_only_past_a_runs_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = Names("acme")
    with Inbox(tmp_path / "i.sqlite") as inbox:
        keep(inbox, body(7), body(3), body(7, "CONTACT_OPT_IN"), body(None, "SALE_NEW"))
        burst = inbox.since(0)
        (request,) = refresh_requests(names, webhook_events_key(names), burst)
        assert request.run_config == names.refresh_run_config([3, 7])
        assert request.run_key == "acme_changes:1-4:0"

        (sales_only,) = refresh_requests(names, webhook_events_key(names), burst[3:])
        assert sales_only.asset_selection == [dg.AssetKey(["acme", "webhook_events"])]
        assert sales_only.run_config in (None, {})

        # A tick reads at most as many deliveries as a run may refresh contacts; were the bound
        # lower, the contacts would go to as many runs as it takes.
        monkeypatch.setattr(webhooks, "MAX_REFRESH_KEYS", 3)
        keep(inbox, *(body(number) for number in range(100, 107)))
        requests = refresh_requests(names, webhook_events_key(names), inbox.since(4))
    assert [request.run_config for request in requests] == [
        names.refresh_run_config([100, 101, 102]),
        names.refresh_run_config([103, 104, 105]),
        names.refresh_run_config([106]),
    ]
    assert len({request.run_key for request in requests}) == 3
    assert MAX_READ <= MAX_REFRESH_KEYS


def test_webhook_events_lands_in_the_schema_the_run_config_gives_the_warehouse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mkt_assets.definitions import build_definitions
    from mkt_assets.orchestration.settings import Settings

    monkeypatch.setenv("MKT_API_KEY", "unused-" + "k" * 24)
    database = tmp_path / "w.duckdb"
    with Inbox(tmp_path / "w.webhooks.sqlite") as inbox:
        keep(inbox, body(1), body(None, "SALE_NEW"))
    names = Names()
    defs = build_definitions(Settings(duckdb_path=str(database)))
    # What every other asset and the IO manager read: the warehouse resource's schema, set here
    # at launch, not the one the definitions were built with.
    result = defs.resolve_job_def(names.refresh_job).execute_in_process(
        asset_selection=[webhook_events_key(names)],
        run_config={"resources": {names.warehouse: {"config": {"schema_name": "elsewhere"}}}},
        instance=dg.DagsterInstance.ephemeral(),
    )

    assert result.success
    with duckdb.connect(str(database), read_only=True) as connection:
        tables = connection.execute("SELECT schema_name, table_name FROM duckdb_tables() ORDER BY 1, 2").fetchall()
        assert tables == [("elsewhere", "webhook_events")]
        assert connection.execute("SELECT count(*) FROM elsewhere.webhook_events").fetchone() == (2,)
    (materialization,) = result.get_asset_materialization_events()
    assert materialization.materialization.metadata["dagster/table_name"].value == "elsewhere.webhook_events"
    (check,) = result.get_asset_check_evaluations()
    assert check.description == "1 deliveries in elsewhere.webhook_events name no contact (kept: see contact_id IS NULL)"


@pytest.mark.slow  # real syncs and a refresh through Dagster
def test_duplicated_and_reordered_deliveries_still_leave_each_contact_as_the_api_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mkt_assets.sandbox.webhooks import DeliveryFault
    from mkt_assets.webhooks.receiver import Receiver
    from mkt_assets_tests.test_refresh import Deployment

    deployment = Deployment(tmp_path, monkeypatch)
    server, data = deployment.server, deployment.data
    secret = "s3cret-" + "x" * 24
    try:
        deployment.run("marketing_sync")
        with Inbox(tmp_path / "deployment.webhooks.sqlite") as inbox, Receiver(
            inbox, webhook_secret({WEBHOOK_SECRET_ENV: secret}), "127.0.0.1", 0
        ) as receiver:
            server.webhooks.register(receiver.url, secret)
            server.add_delivery_fault(DeliveryFault("out_of_order", event="CONTACT_TAG_ADDED", times=1))
            server.add_delivery_fault(DeliveryFault("duplicate", event="CONTACT_TAG_REMOVED", times=1))
            first, second = data.contact_ids[-1], data.contact_ids[-2]
            tag = next(t for t in data.tag_ids if t not in {x["id"] for x in data.contact(first)["tags"]})
            server.add_tag(first, tag)  # held back by the fault: delivered after the removal
            server.remove_tag(first, tag)
            server.add_tag(second, tag)
            assert server.wait_for_deliveries(30)
            deliveries = inbox.since(0)
        # The duplicate is kept once; the added tag's delivery came after its removal's.
        assert [(d.event_type, d.contact_id) for d in deliveries] == [
            ("CONTACT_TAG_REMOVED", first), ("CONTACT_TAG_ADDED", first), ("CONTACT_TAG_ADDED", second),
        ]  # fmt: skip
        assert len(server.deliveries) == 4  # the removal was sent twice
        (request,) = refresh_requests(deployment.names, webhook_events_key(deployment.names), deliveries)
        result = deployment.run(deployment.names.refresh_job, request.run_config)

        tags = dict(
            duckdb.connect(deployment.database, read_only=True)
            .execute(f"SELECT id, [t.id FOR t IN tags] FROM marketing.contacts WHERE id IN ({first}, {second})")
            .fetchall()
        )
        assert tag not in tags[first] and tag in tags[second]  # what the API holds, whatever the order
        landed = {e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()}
        assert landed["webhook_events"]["dagster/row_count"].value == 3
    finally:
        server.stop()
