"""When the syncs run: a daily full sync and an hourly incremental one, running as soon as
the code is deployed (no one has to switch them on in the UI)."""

import dagster as dg

from mkt_assets.orchestration.names import Names
from mkt_assets.orchestration.settings import Settings


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
    names = Names(settings.key_prefix)
    newer = [spec.name for spec in settings.resource_specs if spec.incremental]
    return [
        _running_schedule(
            names.daily_schedule, names.full_job, settings.sync_cron, zone,
            "Full sync: every record, so changes and deletions are seen",
        ),
        _running_schedule(
            names.hourly_schedule, names.incremental_job, settings.incremental_cron, zone,
            f"New {', '.join(newer)}, and the other resources in full" if newer
            else "Every record: none of the resources synced can be read incrementally",
        ),
    ]  # fmt: skip
