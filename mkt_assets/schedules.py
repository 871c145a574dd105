"""When the syncs run: a daily full sync, running as soon as the code is deployed."""

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from mkt_assets.settings import Settings


def build_sync_schedule(job: UnresolvedAssetJobDefinition, settings: Settings) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=f"{job.name}_daily",
        job=job,
        cron_schedule=settings.sync_cron,
        execution_timezone=settings.sync_timezone,
        # A deployment schedules the sync without anyone switching it on in the UI.
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Full sync of the marketing resources ({settings.sync_cron}, {settings.sync_timezone}).",
    )
