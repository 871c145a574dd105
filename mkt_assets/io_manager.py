"""Dagster IO manager that merges staged syncs into DuckDB.

Built on dagster-duckdb's ``DuckDBIOManager``/``DbIOManager`` (table from the asset key,
schema handling, table-name metadata), with three things replaced: the client no longer
deletes the table before writing; its "connection" is the file, which the merge opens in a
lean child process (a Dagster step holds ~130 MB already, DuckDB's merge needs up to its
memory cap more); and the type handler merges on the primary key.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import dagster as dg
from dagster._core.storage.db_io_manager import DbClient, DbIOManager, DbTypeHandler, TableSlice
from dagster_duckdb import DuckDBIOManager
from pydantic import Field, field_validator

from mkt_assets import lean_process, warehouse
from mkt_assets.staging import StagedBatch


class MergingDuckDbClient(DbClient):
    """dagster-duckdb's client deletes the table slice before each write; a merge must not."""

    @staticmethod
    def delete_table_slice(context: dg.OutputContext, table_slice: TableSlice, connection: Any) -> None:
        return None

    @staticmethod
    def ensure_schema_exists(
        context: dg.OutputContext, table_slice: TableSlice, connection: warehouse.WarehouseFile
    ) -> None:
        return None  # the merge creates the schema and the table in its own transaction

    @staticmethod
    def get_select_statement(table_slice: TableSlice) -> str:
        return f"SELECT * FROM {warehouse.qualified(table_slice.schema, table_slice.table)}"

    @staticmethod
    def get_table_name(table_slice: TableSlice) -> str:
        # The schema-qualified name a user queries, not the database file's path.
        return f"{table_slice.schema}.{table_slice.table}"

    @staticmethod
    @contextmanager
    def connect(
        context: dg.OutputContext | dg.InputContext, table_slice: TableSlice
    ) -> Iterator[warehouse.WarehouseFile]:
        config = context.resource_config
        yield warehouse.WarehouseFile(
            warehouse.database_path(config["database"]),
            config.get("memory_limit") or warehouse.DEFAULT_MEMORY_LIMIT,
            wait_seconds=config.get("wait_seconds", warehouse.DEFAULT_WAIT_SECONDS),
        )


class StagedBatchTypeHandler(DbTypeHandler[StagedBatch]):
    """Merges a ``StagedBatch`` into its table and reports what changed."""

    def __init__(self, deletions: str = "mark") -> None:
        self.deletions = deletions

    @property
    def supported_types(self) -> Sequence[type[object]]:
        return [StagedBatch]

    def handle_output(
        self,
        context: dg.OutputContext,
        table_slice: TableSlice,
        obj: StagedBatch,
        connection: warehouse.WarehouseFile,
    ) -> Mapping[str, dg.RawMetadataValue]:
        started = time.monotonic()
        try:
            result, preview = lean_process.call(
                warehouse.merge_staged_file,
                connection,
                table_slice.schema,
                table_slice.table,
                obj,
                deletions=self.deletions,
                log=context.log.warning,
            )
        finally:
            obj.discard()
        merge_seconds = time.monotonic() - started
        if result.duplicate_keys:
            context.log.warning(
                f"{table_slice.schema}.{table_slice.table}: {result.duplicate_keys} records came again"
                " under a key already read in this sync (the API listed them twice); the later copy was kept"
            )
        context.log.info(
            f"{table_slice.schema}.{table_slice.table}: {result.inserted} inserted, {result.updated} updated,"
            f" {result.unchanged} unchanged, {result.deleted} gone upstream; {result.row_count} live rows"
            f" ({merge_seconds:.1f}s)"
        )
        return {
            # Live rows: what a user counts. Rows marked deleted are in total_rows.
            "dagster/row_count": result.row_count,
            "total_rows": result.total_rows,
            "rows_inserted": result.inserted,
            "rows_updated": result.updated,
            "rows_unchanged": result.unchanged,
            "rows_deleted_upstream": result.deleted,
            "duplicate_keys": result.duplicate_keys,
            "complete_read": obj.complete,
            "merge_seconds": round(merge_seconds, 3),
            "preview": dg.MetadataValue.md(preview),
        }

    def load_input(
        self, context: dg.InputContext, table_slice: TableSlice, connection: warehouse.WarehouseFile
    ) -> StagedBatch:
        raise dg.DagsterInvariantViolationError(
            f"{table_slice.schema}.{table_slice.table} is a DuckDB table, not a Python value: depend on"
            " it with deps=[...] and read it with SQL instead of loading it as an input."
        )


class MarketingDuckDBIOManager(DuckDBIOManager):
    """Writes each marketing asset to ``<schema>.<asset name>`` with a MERGE on its primary key."""

    deletions: str = Field(
        default="mark",
        description=(
            "What a complete full sync does with rows no longer upstream: 'mark' sets"
            " _deleted_at (cleared if they come back), 'delete' removes them."
        ),
    )

    memory_limit: str = Field(
        default=warehouse.DEFAULT_MEMORY_LIMIT,
        description="Memory DuckDB may use for a merge before spilling to disk (e.g. 256MB, 2GB).",
    )
    wait_seconds: float = Field(
        default=warehouse.DEFAULT_WAIT_SECONDS,
        ge=0,
        description="Longest wait for the DuckDB file while another process holds it (env MKT_DUCKDB_WAIT_SECONDS).",
    )

    @field_validator("deletions")
    @classmethod
    def _valid_deletions(cls, value: str) -> str:
        if value not in warehouse.DELETIONS_MODES:
            raise ValueError(f"deletions must be one of {warehouse.DELETIONS_MODES}, got {value!r}")
        return value

    @staticmethod
    def type_handlers() -> Sequence[DbTypeHandler]:
        return [StagedBatchTypeHandler()]

    def create_io_manager(self, context: dg.InitResourceContext) -> DbIOManager:
        return DbIOManager(
            db_client=MergingDuckDbClient(),
            database=self.database,
            schema=self.schema_,
            type_handlers=[StagedBatchTypeHandler(self.deletions)],
            io_manager_name="MarketingDuckDBIOManager",
        )
