"""The warehouse's calls as the tests make them: a merge in a transaction of its own, and the
facts and builds of one table, each opening the file itself so a lean worker can run it in one
call. The run itself does all of these inside its one transaction (``commit.commit_run``)."""

from __future__ import annotations

import duckdb

from mkt_assets.core.catalog import ResourceSpec
from mkt_assets.staging.pages import StagedBatch
from mkt_assets.warehouse.connection import WarehouseFile, streamed, transaction
from mkt_assets.warehouse.defaults import DEFAULT_MAX_DROP
from mkt_assets.warehouse.diagnostics import explain_cast_failure, preview_markdown
from mkt_assets.warehouse.merge import CAST_FAILURES, MergeResult, merge_batch
from mkt_assets.warehouse.normalized_tables import BuildResult, NormalizedTable, build_table
from mkt_assets.warehouse.table_facts import ReferenceFacts, SyncedTableFacts, all_reference_facts, synced_table_facts


def merge_staged(
    connection: duckdb.DuckDBPyConnection,
    schema: str,
    table: str,
    batch: StagedBatch,
    *,
    deletions: str = "mark",
    history: bool = True,
    max_drop: float = DEFAULT_MAX_DROP,
    confirm_mass_deletion: bool = False,
) -> MergeResult:
    """``merge_batch`` in a transaction of its own: the table is merged whole or left as it was,
    and a value DuckDB cannot type is named."""
    try:
        with transaction(connection, f"the merge into {schema}.{table}"):
            return merge_batch(
                connection,
                schema,
                table,
                batch,
                deletions=deletions,
                history=history,
                max_drop=max_drop,
                confirm_mass_deletion=confirm_mass_deletion,
            )
    except CAST_FAILURES as error:
        raise explain_cast_failure(connection, batch.spec, batch, error) from None


def merge_staged_file(
    warehouse: WarehouseFile, schema: str, table: str, batch: StagedBatch, *, deletions: str = "mark", history: bool = True
) -> tuple[MergeResult, str]:
    """Open the file, merge ``batch`` and preview the table: the whole write of a sync,
    as one call a lean worker process can make (see ``lean_process``)."""
    with warehouse.open() as connection:
        result = merge_staged(connection, schema, table, batch, deletions=deletions, history=history)
        return result, preview_markdown(connection, schema, table)


def synced_table_facts_in_file(warehouse: WarehouseFile, schema: str, spec: ResourceSpec) -> SyncedTableFacts:
    """``synced_table_facts`` as one call a lean child process can make."""
    # Counts and a GROUP BY on the key, which spills to disk past the limit: all streaming.
    with warehouse.open() as connection:
        return streamed(connection, lambda: synced_table_facts(connection, schema, spec))


def all_reference_facts_in_file(warehouse: WarehouseFile, schema: str, spec: ResourceSpec) -> dict[str, ReferenceFacts]:
    """``all_reference_facts`` as one call a lean child process can make."""
    # Anti joins and small samples: all streaming.
    with warehouse.open() as connection:
        return streamed(connection, lambda: all_reference_facts(connection, schema, spec))


def build_table_in_file(warehouse: WarehouseFile, schema: str, table: NormalizedTable) -> BuildResult:
    """Open the file and rebuild ``table``: one call a lean worker process can make.

    Every statement of a build streams (an unnest, a join to a small table, counts)."""
    with warehouse.open() as connection:
        return streamed(connection, lambda: build_table(connection, schema, table))
