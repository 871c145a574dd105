"""Changes within a minute: the ``<key_prefix>_changes`` sensor and the ``webhook_events`` asset.

The receiver (``mkt-assets webhooks serve``) keeps each signed delivery in the warehouse's inbox
(``webhooks.inbox``) before it answers. The sensor reads the deliveries past its cursor and
launches ``<key_prefix>_refresh`` for the contacts they name, all of one tick in one run (a
burst batches): the refresh reads each contact from the API, which stays the truth, since a
delivery is only a hint. Every refresh run also lands the inbox's new deliveries in
``webhook_events``; deliveries naming no contact (a sale without one) launch that asset alone.
"""

# No `from __future__ import annotations`: Dagster checks the context annotation as an object.
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import dagster as dg

from mkt_assets.core.deliveries import Delivery
from mkt_assets.orchestration.assets import warehouse_pool
from mkt_assets.orchestration.names import Names
from mkt_assets.orchestration.resource import WarehouseResource
from mkt_assets.orchestration.settings import Settings
from mkt_assets.run.refresh import MAX_REFRESH_KEYS
from mkt_assets.warehouse.connection import database_path
from mkt_assets.warehouse.webhook_events import COLUMNS, WEBHOOK_EVENTS_TABLE, LandedDeliveries, land_deliveries
from mkt_assets.webhooks.inbox import MAX_READ, Inbox, default_inbox_path

NAMES_A_CONTACT_CHECK = "every_delivery_names_a_contact"
# How often the daemon asks the sensor: with the run's start, a change lands well within a
# minute. Each tick that finds nothing costs one indexed read of the inbox.
SENSOR_INTERVAL_SECONDS = 15


def inbox_path(settings: Settings) -> Path:
    return default_inbox_path(database_path(settings.duckdb_path))


def webhook_events_key(names: Names) -> dg.AssetKey:
    return names.asset_key(WEBHOOK_EVENTS_TABLE)


def build_webhook_events_asset(settings: Settings) -> dg.AssetsDefinition:
    names = Names(settings.key_prefix)
    key = webhook_events_key(names)
    inbox = inbox_path(settings)

    @dg.asset(
        key=key,
        group_name=names.webhooks_group,
        description=(
            f"Every webhook delivery the receiver kept (mkt-assets webhooks serve, inbox {inbox.name}), in the"
            " order of arrival: the only record of the sales events, and what changed for the contact events."
        ),
        kinds={"duckdb"},
        owners=list(settings.owners),
        required_resource_keys={names.warehouse},
        pool=warehouse_pool(settings.duckdb_path),
        metadata={
            # Where it lands unless a run's config moves the warehouse's schema, as for every asset.
            "dagster/table_name": f"{settings.schema_name}.{WEBHOOK_EVENTS_TABLE}",
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(name, kind.split()[0], description=about) for name, kind, about in COLUMNS]
            ),
        },
        check_specs=[
            dg.AssetCheckSpec(
                NAMES_A_CONTACT_CHECK,
                asset=key,
                description="Each delivery names a contact; one that does not is kept and counted here, never dropped.",
            )
        ],
    )
    def webhook_events(context: dg.AssetExecutionContext) -> Iterator[dg.MaterializeResult]:
        warehouse: WarehouseResource = getattr(context.resources, names.warehouse)
        # The run's schema, as the IO manager and every other asset read it: run config may set it.
        schema = warehouse.schema_name
        if inbox.exists():
            with Inbox(inbox) as deliveries:
                landed = land_deliveries(warehouse.file(), schema, deliveries.since)
        else:
            context.log.info(f"no webhook inbox at {inbox} yet: the receiver has kept nothing")
            landed = land_deliveries(warehouse.file(), schema, lambda after, limit: ())
        yield dg.MaterializeResult(
            metadata={
                "dagster/table_name": f"{schema}.{WEBHOOK_EVENTS_TABLE}",
                "dagster/row_count": landed.rows,
                "landed": landed.landed,
                "last_seq": landed.last_seq,
                "without_contact": landed.without_contact,
            },
            check_results=[_names_a_contact(landed, schema)],
        )

    return webhook_events


def _names_a_contact(landed: LandedDeliveries, schema: str) -> dg.AssetCheckResult:
    count = landed.without_contact
    return dg.AssetCheckResult(
        check_name=NAMES_A_CONTACT_CHECK,
        passed=count == 0,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"every delivery in {schema}.{WEBHOOK_EVENTS_TABLE} names a contact"
            if count == 0
            else f"{count} deliveries in {schema}.{WEBHOOK_EVENTS_TABLE} name no contact (kept: see contact_id IS NULL)"
        ),
        metadata={"without_contact": count},
    )


def build_changes_sensor(settings: Settings, webhook_secret_env: str | None) -> dg.SensorDefinition:
    """Running from the start when the webhook secret's variable is set as the definitions
    load (the receiver can then keep deliveries); switched on in the UI otherwise."""
    names = Names(settings.key_prefix)
    inbox = inbox_path(settings)
    events_key = webhook_events_key(names)
    running = bool(webhook_secret_env and os.environ.get(webhook_secret_env, "").strip())

    @dg.sensor(
        name=names.changes_sensor,
        job_name=names.refresh_job,
        minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED,
        description=(
            f"Refreshes the contacts that webhook deliveries name ({names.refresh_job}), reading the inbox"
            f" {inbox} past its cursor; a burst lands in one run."
        ),
    )
    def changes(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        after = int(context.cursor or 0)
        if not inbox.exists():
            return dg.SkipReason(f"no webhook inbox at {inbox}: start the receiver (mkt-assets webhooks serve)")
        with Inbox(inbox) as kept:
            deliveries = kept.since(after, MAX_READ)
        if not deliveries:
            return dg.SkipReason(f"no delivery after #{after}")
        return dg.SensorResult(
            run_requests=refresh_requests(names, events_key, deliveries), cursor=str(deliveries[-1].seq)
        )

    return changes


def refresh_requests(names: Names, events_key: dg.AssetKey, deliveries: Sequence[Delivery]) -> list[dg.RunRequest]:
    """One run for the contacts ``deliveries`` name (more only past a run's bound), keyed by the
    deliveries' range so a tick evaluated twice launches nothing twice."""
    first, last = deliveries[0].seq, deliveries[-1].seq
    contact_ids = sorted({delivery.contact_id for delivery in deliveries if delivery.contact_id is not None})
    if not contact_ids:
        return [dg.RunRequest(run_key=f"{names.changes_sensor}:{first}-{last}", asset_selection=[events_key])]
    return [
        dg.RunRequest(
            run_key=f"{names.changes_sensor}:{first}-{last}:{start // MAX_REFRESH_KEYS}",
            run_config=names.refresh_run_config(contact_ids[start : start + MAX_REFRESH_KEYS]),
            tags={"mkt_assets/deliveries": f"{first}-{last}"},
        )
        for start in range(0, len(contact_ids), MAX_REFRESH_KEYS)
    ]
