"""The Dagster definitions: assets, checks, the sync job, its schedule and the resources."""

import os

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from mkt_assets.assets import (
    ASSET_PREFIX,
    GROUP_NAME,
    IO_MANAGER_KEY,
    asset_key,
    build_sync_assets,
    freshness_policy,
)
from mkt_assets.catalog import RESOURCES, RESOURCES_BY_NAME
from mkt_assets.checks import build_contact_reference_checks
from mkt_assets.io_manager import MarketingDuckDBIOManager
from mkt_assets.resource import (
    API_KEY_ENV,
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    MarketingApiResource,
    WarehouseResource,
    check_base_url,
)
from mkt_assets.normalized import NORMALIZED_GROUP, build_normalized_asset
from mkt_assets.normalized_tables import NORMALIZED_TABLES
from mkt_assets.schedules import build_schedules
from mkt_assets.settings import Settings
from mkt_assets.warehouse import database_path


def build_jobs() -> tuple[UnresolvedAssetJobDefinition, UnresolvedAssetJobDefinition]:
    selection = dg.AssetSelection.groups(GROUP_NAME, NORMALIZED_GROUP)
    # The steps mostly wait on the network, so all of them fetch at once even on a machine
    # with fewer cores (the default caps parallel steps at the core count).
    executor = dg.multiprocess_executor.configured({"max_concurrent": len(RESOURCES)})
    full = dg.define_asset_job(
        "marketing_sync",
        selection=selection,
        description=(
            "Read every record of the five marketing resources, merge them into DuckDB, mark"
            " what is gone upstream, and rebuild the normalized tables."
        ),
        executor_def=executor,
    )
    contacts_step = "__".join(asset_key(RESOURCES_BY_NAME["contacts"]).path)
    incremental = dg.define_asset_job(
        "marketing_incremental",
        selection=selection,
        description=(
            "Read only contacts newer than the newest stored and the four small resources in"
            " full; rebuild the normalized tables. Sees no changes to older contacts."
        ),
        executor_def=executor,
        config={"ops": {contacts_step: {"config": {"incremental": True}}}},
    )
    return full, incremental


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings.from_environment()
    database = database_path(settings.duckdb_path)
    full, incremental = build_jobs()
    return dg.Definitions(
        assets=[
            *build_sync_assets(settings),
            *(
                build_normalized_asset(table, ASSET_PREFIX, list(settings.owners), freshness_policy(settings))
                for table in NORMALIZED_TABLES
            ),
        ],
        asset_checks=[
            build_contact_reference_checks(
                asset_key(RESOURCES_BY_NAME["contacts"]),
                asset_key(RESOURCES_BY_NAME["tags"]),
                asset_key(RESOURCES_BY_NAME["contact_fields"]),
            )
        ],
        jobs=[full, incremental],
        schedules=build_schedules(full, incremental, settings),
        # configure_at_launch: a run config that sets some settings (the launchpad, a job's
        # config) keeps these values for the others; a plain instance would reset them all,
        # the key and the base URL included, to the class defaults.
        resources={
            # The key stays an EnvVar so Dagster shows its name, never its value, and the
            # definitions load (and the UI opens) with no key set.
            "marketing_api": MarketingApiResource.configure_at_launch(
                base_url=check_base_url(os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL),
                api_key=dg.EnvVar(API_KEY_ENV),
            ),
            "warehouse": WarehouseResource.configure_at_launch(
                database=database,
                schema_name=ASSET_PREFIX,
                memory_limit=settings.duckdb_memory_limit,
                wait_seconds=settings.duckdb_wait_seconds,
            ),
            IO_MANAGER_KEY: MarketingDuckDBIOManager.configure_at_launch(
                database=database,
                schema=ASSET_PREFIX,
                deletions=settings.deletions,
                memory_limit=settings.duckdb_memory_limit,
                wait_seconds=settings.duckdb_wait_seconds,
            ),
        },
    )


defs = build_definitions()
