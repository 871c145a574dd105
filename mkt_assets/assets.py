"""One software-defined asset per API resource, generated from the catalog."""

import time

import dagster as dg

from mkt_assets.catalog import BOOKKEEPING_COLUMNS, RESOURCES, ResourceSpec
from mkt_assets.resource import MarketingApiResource
from mkt_assets.staging import PageStager, StagedBatch

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


def build_sync_asset(spec: ResourceSpec) -> dg.AssetsDefinition:
    """The asset that reads every record of ``spec`` and hands them to the DuckDB IO manager."""

    @dg.asset(
        key=asset_key(spec),
        group_name=GROUP_NAME,
        description=spec.description,
        kinds={"python", "duckdb"},
        io_manager_key=IO_MANAGER_KEY,
        metadata={
            "dagster/column_schema": column_schema(spec),
            "api_path": spec.path,
            "primary_key": spec.primary_key_column.name,
        },
    )
    def sync(context: dg.AssetExecutionContext, marketing_api: MarketingApiResource) -> dg.Output[StagedBatch]:
        started = time.monotonic()
        with marketing_api.get_client() as client, PageStager(
            spec, directory=marketing_api.staging_dir or None
        ) as stager:
            for page in client.iter_pages(spec):
                stager.add(page)
            batch = stager.finish()
            stats = client.stats
        if batch.unknown_fields:
            context.log.warning(
                f"{spec.name}: the API sent fields the catalog does not know, kept in _extra:"
                f" {', '.join(batch.unknown_fields)}"
            )
        context.log.info(
            f"{spec.name}: fetched {batch.records} records in {batch.pages} pages"
            f" ({stats.requests} requests, {stats.retries} retries) in {time.monotonic() - started:.1f}s"
        )
        return dg.Output(
            batch,
            metadata={
                "records_fetched": batch.records,
                "pages": batch.pages,
                "requests": stats.requests,
                "retries": stats.retries,
                "throttled_429": stats.throttled,
                "fetch_seconds": round(time.monotonic() - started, 3),
                "unknown_fields": ", ".join(batch.unknown_fields) or "none",
            },
        )

    return sync


SYNC_ASSETS: list[dg.AssetsDefinition] = [build_sync_asset(spec) for spec in RESOURCES]
