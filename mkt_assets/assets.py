"""One software-defined asset per API resource, generated from the catalog."""

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import dagster as dg
from pydantic import Field

from mkt_assets.catalog import BOOKKEEPING_COLUMNS, RESOURCES, ResourceSpec
from mkt_assets import lean_process
from mkt_assets.chunk_typing import ChunkTyper
from mkt_assets.checks import (
    could_not_run,
    primary_key_result,
    required_fields_result,
    row_count_result,
    sync_check_specs,
)
from mkt_assets.resource import MarketingApiResource, WarehouseResource
from mkt_assets.settings import Settings
from mkt_assets.staging import PageStager, StagedBatch
from mkt_assets.table_facts import synced_table_facts_in_file
from mkt_assets.warehouse import newest_key

ASSET_PREFIX = "marketing"
GROUP_NAME = "marketing"
IO_MANAGER_KEY = "duckdb_io_manager"


def column_schema(spec: ResourceSpec) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(
                name=column.name,
                type=column.sql_type,
                description=column.description or None,
                constraints=dg.TableColumnConstraints(
                    nullable=not column.required, unique=column.api_name == spec.primary_key
                ),
            )
            for column in (*spec.columns, *BOOKKEEPING_COLUMNS)
        ]
    )


def asset_key(spec: ResourceSpec) -> dg.AssetKey:
    return dg.AssetKey([ASSET_PREFIX, spec.name])


def freshness_policy(settings: Settings) -> dg.FreshnessPolicy:
    return dg.FreshnessPolicy.time_window(fail_window=settings.freshness_fail, warn_window=settings.freshness_warn)


@dataclass
class ProgressLog:
    """Logs a long fetch's progress at a steady pace, so a user watching the run sees it move."""

    log: dg.DagsterLogManager
    resource: str
    interval: float
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)

    def tick(self, records: int, pages: int) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.started
        self.log.info(
            f"{self.resource}: {records} records in {pages} pages so far"
            f" ({records / elapsed:,.0f} records/s, {elapsed:.0f}s)"
        )


class SyncConfig(dg.Config):
    """How a sync asset reads its resource in this run."""

    incremental: bool = Field(
        default=False,
        description=(
            "Read only records newer than the newest stored one, for resources that allow it"
            " (contacts); others, and an empty table, are read in full. An incremental read"
            " never marks deletions."
        ),
    )


def _previous_row_count(context: dg.AssetExecutionContext) -> int | None:
    event = context.instance.get_latest_materialization_event(context.asset_key)
    materialization = event.asset_materialization if event else None
    value = materialization.metadata.get("dagster/row_count") if materialization else None
    return int(value.value) if value is not None else None  # type: ignore[arg-type]


def build_sync_asset(spec: ResourceSpec, settings: Settings) -> dg.AssetsDefinition:
    """The asset that reads every record of ``spec``, hands them to the DuckDB IO manager,
    then checks the table it landed in."""
    key = asset_key(spec)

    @dg.asset(
        key=key,
        group_name=GROUP_NAME,
        description=spec.description,
        kinds={"python", "duckdb"},
        owners=list(settings.owners),
        io_manager_key=IO_MANAGER_KEY,
        freshness_policy=freshness_policy(settings),
        check_specs=sync_check_specs(spec, key, settings.row_count_max_drop),
        metadata={
            "dagster/column_schema": column_schema(spec),
            "dagster/table_name": f"{ASSET_PREFIX}.{spec.name}",
            "api_path": spec.path,
            "primary_key": spec.primary_key_column.name,
        },
    )
    def sync(
        context: dg.AssetExecutionContext,
        config: SyncConfig,
        marketing_api: MarketingApiResource,
        warehouse: WarehouseResource,
    ) -> Iterator[dg.Output[StagedBatch] | dg.AssetCheckResult]:
        previous_rows = _previous_row_count(context)
        started = time.monotonic()
        progress = ProgressLog(context.log, spec.name, settings.progress_interval_seconds)
        newest = None
        if config.incremental and spec.incremental:
            with warehouse.connection(log=context.log.warning) as connection:
                newest = newest_key(connection, warehouse.schema_name, spec)
            if newest is None:
                context.log.info(f"{spec.name}: nothing stored yet, so a full read")
        # Ids only grow: in ascending order after the newest stored id come exactly the new records.
        query = {"order": "asc", "startingAfter": newest} if newest is not None else None
        read = "full" if newest is None else f"incremental, after {spec.primary_key} {newest}"
        with marketing_api.get_client(log=context.log.warning) as client, ChunkTyper(spec, warehouse.memory_limit) as typer, PageStager(
            spec,
            directory=marketing_api.staging_dir or None,
            complete=newest is None,
            chunk_pages=marketing_api.staging_chunk_pages,
            on_chunk=typer.submit,
        ) as stager:
            if stager.swept:
                more = len(stager.swept) - 10
                shown = ", ".join(map(str, stager.swept[:10])) + (f" and {more} more" if more > 0 else "")
                context.log.info(
                    f"{spec.name}: removed {len(stager.swept)} staging directories and files left by runs"
                    f" that died: {shown}"
                )
            for page in client.iter_pages(spec, query):
                stager.add(page)
                progress.tick(stager.records, stager.pages)
            batch = replace(stager.finish(), typed=typer.finish())
            stats = client.stats
        for failure in typer.failures:
            context.log.warning(f"{spec.name}: {failure}")
        fetch_seconds = time.monotonic() - started
        if batch.unknown_fields:
            context.log.warning(
                f"{spec.name}: the API sent fields the catalog does not know, kept in _extra:"
                f" {', '.join(batch.unknown_fields)}"
            )
        context.log.info(
            f"{spec.name}: fetched {batch.records} records in {batch.pages} pages"
            f" ({stats.requests} requests, {stats.retries} retries) in {fetch_seconds:.1f}s"
        )
        # The IO manager merges the batch as soon as it is yielded; the checks below read the result.
        yield dg.Output(
            batch,
            metadata={
                "dagster/column_schema": column_schema(spec),
                "read": read,
                "records_fetched": batch.records,
                "pages": batch.pages,
                "requests": stats.requests,
                "retries": stats.retries,
                "throttled_429": stats.throttled,
                "paced_seconds": round(stats.paced_seconds, 3),  # waited for the rate limit
                "fetch_seconds": round(fetch_seconds, 3),
                "unknown_fields": ", ".join(batch.unknown_fields) or "none",
                # Chunks typed to Parquet while the fetch went on; the merge parses the rest.
                "staging_chunks": len(batch.paths),
                "chunks_typed_during_fetch": len(batch.typed),
            },
        )
        # Queried in a lean child process, like the merge: the step keeps no DuckDB memory.
        # The table has changed by now: a check that cannot run fails as a check, and the
        # materialization stands.
        try:
            facts = lean_process.call(
                synced_table_facts_in_file, warehouse.file(), warehouse.schema_name, spec, log=context.log.warning
            )
        except Exception as error:  # noqa: BLE001 - reported as the checks' outcome
            context.log.error(f"{spec.name}: the checks could not run: {error}")
            yield from could_not_run(sync_check_specs(spec, key, settings.row_count_max_drop), error)
            return
        yield primary_key_result(facts.primary_key, warehouse.schema_name, spec)
        yield required_fields_result(facts.required_fields, warehouse.schema_name, spec)
        yield row_count_result(
            facts.live_rows, previous_rows, settings.row_count_max_drop, f"{ASSET_PREFIX}.{spec.name}"
        )

    return sync


def build_sync_assets(settings: Settings) -> list[dg.AssetsDefinition]:
    return [build_sync_asset(spec, settings) for spec in RESOURCES]
