"""When the syncs run: a daily full sync and an hourly incremental one, running as soon as
the code is deployed (no one has to switch them on in the UI)."""

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from mkt_assets.settings import Settings


def _running_schedule(
    name: str, job: UnresolvedAssetJobDefinition, cron: str, timezone: str, what: str
) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=name,
        job=job,
        cron_schedule=cron,
        execution_timezone=timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"{what} ({cron}, {timezone}).",
    )


def build_schedules(
    full: UnresolvedAssetJobDefinition, incremental: UnresolvedAssetJobDefinition, settings: Settings
) -> list[dg.ScheduleDefinition]:
    zone = settings.sync_timezone
    return [
        _running_schedule(
            "marketing_sync_daily", full, settings.sync_cron, zone,
            "Full sync: every record, so changes and deletions are seen",
        ),
        _running_schedule(
            "marketing_incremental_hourly", incremental, settings.incremental_cron, zone,
            "New contacts, and the small resources in full",
        ),
    ]  # fmt: skip
