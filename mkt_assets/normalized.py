"""The normalized tables as assets, downstream of the synced tables they read.

Their SQL is in ``normalized_tables``; each build runs in a lean child process, so a
Dagster step never holds DuckDB's working memory. No second fetch from the API.
"""

from collections.abc import Iterator

import dagster as dg

from mkt_assets import lean_process
from mkt_assets.normalized_tables import BuildResult, NormalizedTable, build_table_in_file
from mkt_assets.resource import WarehouseResource

NORMALIZED_GROUP = "marketing_normalized"


MATCHES_PARENT_CHECK = "matches_nested_lists"
NOT_NULL_CHECK = "keys_present"


def check_results(table: NormalizedTable, result: BuildResult, schema: str) -> list[dg.AssetCheckResult]:
    matches = result.row_count == result.expected_rows
    missing = {column: count for column, count in result.null_keys.items() if count}
    return [
        dg.AssetCheckResult(
            check_name=MATCHES_PARENT_CHECK,
            passed=matches,
            severity=dg.AssetCheckSeverity.ERROR,
            description=None
            if matches
            else (
                f"{schema}.{table.name} has {result.row_count} rows but the live {table.reads[0]}"
                f" carry {result.expected_rows} {table.list_column}"
            ),
            metadata={"row_count": result.row_count, "nested_list_entries": result.expected_rows},
        ),
        dg.AssetCheckResult(
            check_name=NOT_NULL_CHECK,
            passed=not missing,
            severity=dg.AssetCheckSeverity.ERROR,
            description=None
            if not missing
            else f"{schema}.{table.name}: " + "; ".join(f"{n} rows without {c}" for c, n in missing.items()),
            metadata={"null_keys": dg.MetadataValue.json(result.null_keys)},
        ),
    ]


def build_normalized_asset(
    table: NormalizedTable, schema: str, owners: list[str], freshness_policy: dg.FreshnessPolicy
) -> dg.AssetsDefinition:
    key = dg.AssetKey([schema, table.name])

    @dg.asset(
        key=key,
        deps=[dg.AssetKey([schema, parent]) for parent in table.reads],
        group_name=NORMALIZED_GROUP,
        description=table.description,
        kinds={"duckdb", "sql"},
        owners=owners,
        freshness_policy=freshness_policy,
        check_specs=[
            dg.AssetCheckSpec(
                MATCHES_PARENT_CHECK,
                asset=key,
                description=f"One row per entry of the live {table.reads[0]}' {table.list_column} lists.",
            ),
            dg.AssetCheckSpec(NOT_NULL_CHECK, asset=key, description=f"No row lacks {', '.join(table.not_null)}."),
        ],
        metadata={
            "dagster/table_name": f"{schema}.{table.name}",
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(name, column_type) for name, column_type in table.columns]
            ),
        },
    )
    def normalized(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        result = lean_process.call(
            build_table_in_file, warehouse.file(), warehouse.schema_name, table, log=context.log.warning
        )
        yield dg.MaterializeResult(
            metadata={
                "dagster/row_count": result.row_count,
                "preview": dg.MetadataValue.md(result.preview),
            }
        )
        yield from check_results(table, result, warehouse.schema_name)

    return normalized
