"""The Dagster definitions: assets, checks, the sync job, its schedule and the resources."""

import functools
import os
from pathlib import Path
from typing import Any

import dagster as dg

from mkt_assets.core.errors import ConfigurationError
from mkt_assets.orchestration.assets import build_marketing_assets
from mkt_assets.orchestration.io_manager import MarketingDuckDBIOManager
from mkt_assets.orchestration.names import Names
from mkt_assets.orchestration.resource import (
    API_KEY_ENV,
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    MarketingApiResource,
    WarehouseResource,
    check_base_url,
)
from mkt_assets.orchestration.run_retries import run_retry_tags
from mkt_assets.orchestration.schedules import build_schedules
from mkt_assets.orchestration.settings import Settings
from mkt_assets.warehouse.connection import database_path


def build_jobs(settings: Settings | None = None) -> list[Any]:
    """Both jobs (Dagster does not export the type ``define_asset_job`` returns)."""
    # The groups hold only the resources the settings choose, and the tables those make: a
    # resource left out is not in the definitions, so neither job nor its schedule reads it.
    settings = settings or Settings()
    names = Names(settings.key_prefix)
    selection = dg.AssetSelection.groups(names.group, names.normalized_group)
    # One step in the run's own process: every resource is fetched in a thread of its own and
    # the DuckDB work runs in lean workers, so a step process per asset would only add Dagster's
    # start-up (a second or more each) to every run.
    chosen = settings.resource_specs
    incremental_resources = [spec.name for spec in chosen if spec.incremental]
    # As the job's tags, not run_tags alone: `dagster job launch` and every re-execution take
    # a run's tags from the former, schedules and the launchpad from the latter, which
    # defaults to them.
    full = dg.define_asset_job(
        names.full_job,
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
        names.incremental_job,
        selection=selection,
        description=(
            f"{newer} and write them with the rebuilt normalized tables in one DuckDB transaction."
            + (
                " Sees neither changes to older records of those nor their removals: the full sync does."
                if incremental_resources
                else ""
            )
        ),
        executor_def=dg.in_process_executor,
        tags=run_retry_tags(settings),
        config={"ops": {names.step: {"config": {"incremental": True}}}},
    )
    return [full, incremental]


def _base_url(given: str | None = None, setting: str = BASE_URL_ENV) -> str:
    try:
        if given is not None:
            return check_base_url(given, setting)
        return check_base_url(os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL)
    except ValueError as refused:
        # Dagster shows a load error with its traceback: this one's holds only the message.
        raise ConfigurationError(str(refused)) from None


def build_definitions(
    settings: Settings | None = None, *, api_key_env: str = API_KEY_ENV, base_url: str | None = None
) -> dg.Definitions:
    """One account's definitions: its key read from the environment variable ``api_key_env``,
    its base URL ``base_url`` (default: ``MKT_API_BASE_URL``, else the API's), the rest from
    ``settings`` (default: the other ``MKT_*`` variables)."""
    settings = settings or Settings.from_environment()
    names = Names(settings.key_prefix)
    database = database_path(settings.duckdb_path)
    jobs = build_jobs(settings)
    # The DuckDB file, declared once: the checks read it through this resource, and the IO
    # manager writes through the same one (a resource of its own in the launchpad would let
    # the two point at different files).
    warehouse = WarehouseResource.configure_at_launch(
        database=database,
        schema_name=settings.schema_name,
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
            names.api: MarketingApiResource.configure_at_launch(
                base_url=_base_url(base_url, f"{settings.key_prefix}: base_url"),
                api_key_env=api_key_env,
                **({"api_key": dg.EnvVar(api_key_env)} if os.environ.get(api_key_env) else {}),
            ),
            names.warehouse: warehouse,
            names.io_manager: MarketingDuckDBIOManager(warehouse=warehouse, deletions=settings.deletions),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    """What Dagster loads (``dg dev``, ``dagster dev``): the component instances in
    ``mkt_assets/defs`` (this project's own account, reading the environment's settings)."""
    # Dagster loads them again wherever one command needs them (six times in one `dagster job
    # execute`, 0.15 s each, a second of every run): the same environment makes the same
    # definitions, so a process builds them once per environment it sees.
    return _loaded(frozenset(os.environ.items()))


@functools.lru_cache(maxsize=1)
def _loaded(environment: frozenset[tuple[str, str]]) -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
