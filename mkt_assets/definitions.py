"""The Dagster definitions: assets, checks, the sync job, its schedule and the resources."""

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import dagster as dg

from mkt_assets.core.catalog import DEFAULT_BASE_URL
from mkt_assets.core.deliveries import WEBHOOK_SECRET_ENV
from mkt_assets.core.errors import API_KEY_ENV, ConfigurationError
from mkt_assets.core.setting_names import SettingNames
from mkt_assets.orchestration.assets import build_marketing_assets
from mkt_assets.orchestration.checks import ROW_COUNT_CHECK
from mkt_assets.orchestration.io_manager import MarketingDuckDBIOManager
from mkt_assets.orchestration.names import Names
from mkt_assets.orchestration.resource import MarketingApiResource, WarehouseResource
from mkt_assets.orchestration.run_retries import run_retry_tags
from mkt_assets.orchestration.schedules import build_schedules
from mkt_assets.orchestration.settings import Settings
from mkt_assets.orchestration.webhooks import build_changes_sensor, build_webhook_events_asset, webhook_events_key
from mkt_assets.source.account import BASE_URL_ENV, check_base_url
from mkt_assets.warehouse.connection import database_path
from mkt_assets.warehouse.normalized_tables import normalized_tables


def build_jobs(settings: Settings | None = None) -> list[Any]:
    """The jobs: the full and the incremental sync, and the refresh of named contacts when
    contacts are synced (Dagster does not export the type ``define_asset_job`` returns)."""
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
    if "contacts" not in settings.resources:
        return [full, incremental]
    # Only the contacts asset, the tables built from it and the checks that read no whole
    # table (the row count, and the built tables' own): a refresh costs what its contacts do.
    contacts = names.asset_key("contacts")
    following = [names.asset_key(table.name) for table in normalized_tables(chosen) if "contacts" in table.reads]
    events = webhook_events_key(names)
    refresh = dg.define_asset_job(
        names.refresh_job,
        selection=dg.AssetSelection.assets(contacts, *following).without_checks()
        | dg.AssetSelection.checks(dg.AssetCheckKey(contacts, ROW_COUNT_CHECK))
        | dg.AssetSelection.checks_for_assets(*following)
        | dg.AssetSelection.assets(events),
        description=(
            "Read the contacts the run config names, one request each (a contact answering 404 is marked"
            " deleted), and merge them with their history, updating the tables built from contacts for"
            f" them alone, in one DuckDB transaction; and land the inbox's new webhook deliveries in {events.path[-1]}"
            f" (the {names.changes_sensor} sensor launches it for the contacts they name). Run config: "
            + json.dumps(names.refresh_run_config([1, 2]))
        ),
        executor_def=dg.in_process_executor,
        tags=run_retry_tags(settings),
        # What the launchpad starts from; a run names its contacts (a sensor: RunRequest(run_config=...)).
        config=names.refresh_run_config([]),
    )
    return [full, incremental, refresh]


def _base_url(given: str | None = None, setting: str = BASE_URL_ENV, key_setting: str = API_KEY_ENV) -> str:
    try:
        if given is not None:
            return check_base_url(given, setting, key_setting)
        return check_base_url(os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL)
    except ValueError as refused:
        # Dagster shows a load error with its traceback: this one's holds only the message.
        raise ConfigurationError(str(refused)) from None


def build_definitions(
    settings: Settings | None = None,
    *,
    api_key_env: str = API_KEY_ENV,
    base_url: str | None = None,
    webhook_secret_env: str | None = WEBHOOK_SECRET_ENV,
) -> dg.Definitions:
    """One account's definitions: its key read from the environment variable ``api_key_env``,
    its base URL ``base_url`` (default: ``MKT_API_BASE_URL``, else the API's), the rest from
    ``settings`` (default: the other ``MKT_*`` variables). The changes sensor runs from the start
    when ``webhook_secret_env`` is set (the receiver's secret: see docs/webhooks.md)."""
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
        component_instance=settings.setting_names.instance,
    )
    # Webhook deliveries are acted on by a refresh of the contacts they name: with no contacts
    # synced there is none, and neither the sensor nor the table of deliveries; nor with an
    # in-memory warehouse, which has no file to keep the inbox beside.
    webhooks = "contacts" in settings.resources and database != ":memory:"
    return dg.Definitions(
        assets=[build_marketing_assets(settings), *([build_webhook_events_asset(settings)] if webhooks else [])],
        jobs=jobs,
        schedules=build_schedules(settings),
        sensors=[build_changes_sensor(settings, webhook_secret_env)] if webhooks else [],
        # configure_at_launch: a run config that sets some settings (the launchpad, a job's
        # config) keeps these values for the others; a plain instance would reset them all,
        # the key and the base URL included, to the class defaults.
        resources={
            # The key is an EnvVar, so Dagster shows its name, never its value. Unset as the
            # definitions load, it is left out: the UI opens, and a run without it fails in one
            # line naming it (the resource reads the environment) instead of in Dagster's
            # seventy-line traceback for an unset EnvVar.
            names.api: MarketingApiResource.configure_at_launch(
                base_url=_base_url(base_url, SettingNames(settings.key_prefix).base_url, api_key_env),
                api_key_env=api_key_env,
                component_instance=settings.setting_names.instance,
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
    return _defs_in(_environment_digest())


# Dagster calls ``defs`` each time it reconstructs the repository, five times in one
# `dagster job execute`, and each call loads the defs folder anew; the module-level Definitions
# of a plain project is built once. Keyed by the environment the instances read, so a process
# that changes it (a test) still gets definitions that match it.
@functools.lru_cache(maxsize=1)
def _defs_in(environment_digest: bytes) -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)


def _environment_digest() -> bytes:
    """A digest, not the variables themselves: the cache must not hold the API key."""
    digest = hashlib.blake2b(digest_size=16)
    for name, value in sorted(os.environ.items()):
        digest.update(f"{len(name)}:{name}{len(value)}:{value}".encode("utf-8", "surrogateescape"))
    return digest.digest()
