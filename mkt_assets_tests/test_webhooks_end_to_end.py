"""Webhooks end to end, on the real stack: the simulator sends signed deliveries to the receiver,
the daemon's changes sensor reads the inbox and launches the refresh, and the change is in the
warehouse (contacts, contact_tags, contact_profiles, contacts_history, webhook_events) with one
API request per changed contact. Then the daily full sync heals what a lost delivery missed."""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path

import dagster as dg
import pytest

from mkt_assets.core.deliveries import WEBHOOK_SECRET_ENV, webhook_secret
from mkt_assets.sandbox import SandboxData, SandboxServer
from mkt_assets.sandbox.webhooks import DeliveryFault
from mkt_assets.warehouse.connection import connect
from mkt_assets.webhooks.inbox import Inbox, default_inbox_path
from mkt_assets.webhooks.receiver import Receiver
from mkt_assets_tests.daemon import Daemon, project_settings

API_KEY = "e2e-" + secrets.token_hex(12)
LANDING_SECONDS = 180.0


def query(database: Path, sql: str) -> list[tuple[object, ...]]:
    """``sql`` on the warehouse, queued behind a writer as every reader of the project is."""
    with connect(str(database), read_only=True, wait_seconds=60) as connection:
        return connection.execute(sql).fetchall()


def tag_ids(database: Path, contact: int) -> set[int]:
    return {row[0] for row in query(database, f"SELECT tag_id FROM marketing.contact_tags WHERE contact_id = {contact}")}  # type: ignore[misc]


def contact_reads(server: SandboxServer) -> list[str]:
    return [record.path for record in server.requests if record.path.startswith("/api/contacts/")]


def succeeded(instance: dg.DagsterInstance, job: str) -> list[dg.DagsterRun]:
    return [run for run in instance.get_runs(dg.RunsFilter(job_name=job)) if run.status == dg.DagsterRunStatus.SUCCESS]


@pytest.mark.slow
def test_a_tag_change_made_upstream_lands_through_the_receiver_the_sensor_and_the_refresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = SandboxData(seed=26, contacts=300)
    database = tmp_path / "warehouse.duckdb"
    secret = secrets.token_hex(32)
    with SandboxServer(account, api_key=API_KEY) as server:
        environment = {**project_settings(server, API_KEY, database), WEBHOOK_SECRET_ENV: secret}
        daemon = Daemon(tmp_path, monkeypatch, environment)
        with daemon, Inbox(default_inbox_path(str(database))) as inbox, Receiver(
            inbox, webhook_secret(environment), "127.0.0.1", 0
        ) as receiver:
            server.webhooks.register(receiver.url, secret)
            first = str(uuid.uuid4())
            daemon.launch("marketing_sync", first)
            daemon.wait_for("the first sync", lambda: daemon.ended(first))
            assert daemon.status(first) == dg.DagsterRunStatus.SUCCESS

            contact = account.contact_ids[-1]
            had = {tag["id"] for tag in account.contact(contact)["tags"]}
            added = next(tag for tag in account.tag_ids if tag not in had)
            other = account.contact_ids[0]
            removed = next(iter({tag["id"] for tag in account.contact(other)["tags"]}), None)
            server.reset_log()
            server.add_tag(contact, added)
            if removed is not None:
                server.remove_tag(other, removed)
            server.new_sale(contact)

            daemon.wait_for(
                "the added tag in contact_tags",
                lambda: added in tag_ids(database, contact) and (removed is None or removed not in tag_ids(database, other)),
                LANDING_SECONDS,
            )
            daemon.wait_for(
                "the refresh run to end", lambda: bool(succeeded(daemon.instance, "marketing_refresh")), LANDING_SECONDS
            )

            contact_row = query(database, f"SELECT [t.id FOR t IN tags] FROM marketing.contacts WHERE id = {contact}")
            assert added in contact_row[0][0]  # type: ignore[operator]
            profile = query(database, f"SELECT tag_ids FROM marketing.contact_profiles WHERE contact_id = {contact}")
            assert added in profile[0][0]  # type: ignore[operator]
            versions = query(database, f"SELECT count(*) FROM marketing.contacts_history WHERE id = {contact}")
            assert versions[0][0] == 2  # the first sync's version, closed, and the refreshed one
            events = query(
                database, "SELECT event_type, contact_id, signature_verified FROM marketing.webhook_events ORDER BY seq"
            )
            assert ("CONTACT_TAG_ADDED", contact, True) in events and ("SALE_NEW", contact, True) in events
            # One read per changed contact: the deliveries name which; the API says what they hold.
            changed = {contact} | ({other} if removed is not None else set())
            assert sorted(contact_reads(server)) == sorted(f"/api/contacts/{number}" for number in changed)

            # A delivery lost on the way: the refresh never hears of it; the daily sync heals it.
            server.add_delivery_fault(DeliveryFault("lost", times=1))
            lost_contact = account.contact_ids[1]
            lost_tag = next(tag for tag in account.tag_ids if tag not in {t["id"] for t in account.contact(lost_contact)["tags"]})
            server.add_tag(lost_contact, lost_tag)
            assert server.wait_for_deliveries(30)
            assert lost_tag not in tag_ids(database, lost_contact)
            daily = str(uuid.uuid4())
            daemon.launch("marketing_sync", daily)
            daemon.wait_for("the daily sync", lambda: daemon.ended(daily))
            assert daemon.status(daily) == dg.DagsterRunStatus.SUCCESS
            assert lost_tag in tag_ids(database, lost_contact)

