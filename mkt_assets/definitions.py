"""The Dagster definitions: assets, the job that syncs them, and their resources."""

from __future__ import annotations

import os

import dagster as dg

from mkt_assets.assets import ASSET_PREFIX, GROUP_NAME, IO_MANAGER_KEY, SYNC_ASSETS
from mkt_assets.io_manager import MarketingDuckDBIOManager
from mkt_assets.resource import API_KEY_ENV, BASE_URL_ENV, DEFAULT_BASE_URL, MarketingApiResource
from mkt_assets.warehouse import database_path

DUCKDB_PATH_ENV = "MKT_DUCKDB_PATH"
# Not data/marketing.duckdb: DuckDB names a file's catalog after it, and a catalog named
# like the schema makes every `marketing.<table>` a user types ambiguous.
DEFAULT_DUCKDB_PATH = "data/mkt_assets.duckdb"

marketing_sync = dg.define_asset_job(
    "marketing_sync",
    selection=dg.AssetSelection.groups(GROUP_NAME),
    description="Read every record of the five marketing resources and merge them into DuckDB.",
    # The steps mostly wait on the network, so all of them fetch at once even on a machine
    # with fewer cores (the default caps parallel steps at the core count).
    executor_def=dg.multiprocess_executor.configured({"max_concurrent": len(SYNC_ASSETS)}),
)


def build_definitions() -> dg.Definitions:
    return dg.Definitions(
        assets=SYNC_ASSETS,
        jobs=[marketing_sync],
        resources={
            # The key stays an EnvVar so Dagster shows its name, never its value, and the
            # definitions load (and the UI opens) with no key set.
            "marketing_api": MarketingApiResource(
                base_url=os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL,
                api_key=dg.EnvVar(API_KEY_ENV),
            ),
            IO_MANAGER_KEY: MarketingDuckDBIOManager(
                database=database_path(os.environ.get(DUCKDB_PATH_ENV) or DEFAULT_DUCKDB_PATH),
                schema=ASSET_PREFIX,
            ),
        },
    )


defs = build_definitions()
