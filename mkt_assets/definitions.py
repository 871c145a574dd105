"""The Dagster definitions: assets, checks, the sync job, its schedule and the resources."""

import os
from typing import Any

import dagster as dg

from mkt_assets.core.errors import ConfigurationError
from mkt_assets.orchestration.assets import (
    ASSET_PREFIX,
    GROUP_NAME,
    IO_MANAGER_KEY,
    NORMALIZED_GROUP,
    STEP_NAME,
    build_marketing_assets,
)
from mkt_assets.orchestration.io_manager import MarketingDuckDBIOManager
from mkt_assets.orchestration.resource import (
    API_KEY_ENV,
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    MarketingApiResource,
    WarehouseResource,
    check_base_url,
)
from mkt_assets.orchestration.run_retries import run_retry_tags
from mkt_assets.orchestration.schedules import FULL_JOB, INCREMENTAL_JOB, build_schedules
from mkt_assets.orchestration.settings import Settings
from mkt_assets.warehouse.connection import database_path


def build_jobs(settings: Settings | None = None) -> list[Any]:
    """Both jobs (Dagster does not export the type ``define_asset_job`` returns)."""
    # The groups hold only the resources the settings choose, and the tables those make: a
    # resource left out is not in the definitions, so neither job nor its schedule reads it.
    selection = dg.AssetSelection.groups(GROUP_NAME, NORMALIZED_GROUP)
    # One step in the run's own process: every resource is fetched in a thread of its own and
    # the DuckDB work runs in lean workers, so a step process per asset would only add Dagster's
    # start-up (a second or more each) to every run.
    settings = settings or Settings()
    chosen = settings.resource_specs
    incremental_resources = [spec.name for spec in chosen if spec.incremental]
    # As the job's tags, not run_tags alone: `dagster job launch` and every re-execution take
    # a run's tags from the former, schedules and the launchpad from the latter, which
    # defaults to them.
    full = dg.define_asset_job(
        FULL_JOB,
        selection=selection,
        description=(
            f"Read every record of the {len(chosen)} marketing resource{'s' if len(chosen) != 1 else ''} synced"
            f" ({', '.join(spec.name for spec in chosen)})"
            " and write them, with the rebuilt normalized tables, in one DuckDB transaction, marking what is gone upstream."
        ),
        executor_def=dg.in_process_executor,
        tags=run_retry_tags(settings),
    )
    newer = (
        f"Read only the records newer than the newest stored of the resources that allow it ({', '.join(incremental_resources)}), the others in full,"
        if incremental_resources
        else "Read every record (none of the resources synced can be read incrementally),"
    )
    incremental = dg.define_asset_job(
        INCREMENTAL_JOB,
        selection=selection,
        description=(
            f"{newer} and write them with the rebuilt normalized tables in one DuckDB transaction."
            + (" Sees no changes to older records of those." if incremental_resources else "")
        ),
        executor_def=dg.in_process_executor,
        tags=run_retry_tags(settings),
        config={"ops": {STEP_NAME: {"config": {"incremental": True}}}},
    )
    return [full, incremental]


def _base_url() -> str:
    try:
        return check_base_url(os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL)
    except ValueError as refused:
        # Dagster shows a load error with its traceback: this one's holds only the message.
        raise ConfigurationError(str(refused)) from None


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.from_environment()
    database = database_path(settings.duckdb_path)
    jobs = build_jobs(settings)
    # The DuckDB file, declared once: the checks read it through this resource, and the IO
    # manager writes through the same one (a resource of its own in the launchpad would let
    # the two point at different files).
    warehouse = WarehouseResource.configure_at_launch(
        database=database,
        schema_name=ASSET_PREFIX,
        memory_limit=settings.duckdb_memory_limit,
        wait_seconds=settings.duckdb_wait_seconds,
    )
    return dg.Definitions(
        assets=[build_marketing_assets(settings)],
        jobs=jobs,
        schedules=build_schedules(settings),
        # configure_at_launch: a run config that sets some settings (the launchpad, a job's
        # config) keeps these values for the others; a plain instance would reset them all,
        # the key and the base URL included, to the class defaults.
        resources={
            # The key is an EnvVar, so Dagster shows its name, never its value. Unset as the
            # definitions load, it is left out: the UI opens, and a run without it fails in one
            # line naming it (the resource reads the environment) instead of in Dagster's
            # seventy-line traceback for an unset EnvVar.
            "marketing_api": MarketingApiResource.configure_at_launch(
                base_url=_base_url(),
                **({"api_key": dg.EnvVar(API_KEY_ENV)} if os.environ.get(API_KEY_ENV) else {}),
            ),
            "warehouse": warehouse,
            IO_MANAGER_KEY: MarketingDuckDBIOManager(warehouse=warehouse, deletions=settings.deletions),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    """What Dagster loads (``dg dev``, ``dagster dev``): built when it asks, with the environment's settings."""
    return build_definitions()
