"""When the syncs run: a daily full sync and an hourly incremental one, running as soon as
the code is deployed (no one has to switch them on in the UI)."""

import dagster as dg

from mkt_assets.orchestration.settings import Settings

FULL_JOB = "marketing_sync"
INCREMENTAL_JOB = "marketing_incremental"


def _running_schedule(name: str, job_name: str, cron: str, timezone: str, what: str) -> dg.ScheduleDefinition:
    return dg.ScheduleDefinition(
        name=name,
        job_name=job_name,
        cron_schedule=cron,
        execution_timezone=timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"{what} ({cron}, {timezone}).",
    )


def build_schedules(settings: Settings) -> list[dg.ScheduleDefinition]:
    """Both schedules; they run the jobs, which read only the resources ``settings`` chooses."""
    zone = settings.sync_timezone
    newer = [spec.name for spec in settings.resource_specs if spec.incremental]
    return [
        _running_schedule(
            "marketing_sync_daily", FULL_JOB, settings.sync_cron, zone,
            "Full sync: every record, so changes and deletions are seen",
        ),
        _running_schedule(
            "marketing_incremental_hourly", INCREMENTAL_JOB, settings.incremental_cron, zone,
            f"New {', '.join(newer)}, and the other resources in full" if newer
            else "Every record: none of the resources synced can be read incrementally",
        ),
    ]  # fmt: skip
