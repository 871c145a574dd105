"""The IO manager: how the marketing tables reach DuckDB, and how downstream code reads them.

``handle_output`` lands a run's tables: the first table of a run that it is handed writes
every table of that run (the merges of the synced resources and the rebuilds of the normalized
tables) in one transaction, in the run's DuckDB worker (see ``sync.RunWrite`` and ``commit``),
and each table then reports what changed in it. ``load_input`` hands an asset downstream of a
marketing table a DuckDB relation over its live rows.
"""

# No `from __future__ import annotations` here: Dagster reads the field `warehouse: WarehouseResource`
# as a nested resource only from the class itself, not from a string annotation (with one, the
# definitions fail to load: "Input should be a valid dictionary or instance of WarehouseResource").
from typing import Any

import dagster as dg
import duckdb
from pydantic import Field, field_validator

from mkt_assets.core.errors import MassDeletionError
from mkt_assets.orchestration.names import Names
from mkt_assets.orchestration.resource import WarehouseResource
from mkt_assets.run.sync import TableWrite
from mkt_assets.warehouse.commit import RunCommit
from mkt_assets.warehouse.connection import read_only
from mkt_assets.warehouse.history import history_table
from mkt_assets.warehouse.merge import DELETIONS_MODES
from mkt_assets.warehouse.sql_names import fully_qualified


class MarketingDuckDBIOManager(dg.ConfigurableIOManager):
    """Writes each marketing asset to its table, schema.asset_name, all of a run's in one transaction."""

    # The definitions' `warehouse` resource itself, so the file and schema are configured once:
    # run config for `warehouse` reaches the write too.
    warehouse: WarehouseResource
    deletions: str = Field(
        default="mark",
        description=(
            "What a complete full sync does with rows no longer upstream: 'mark' sets"
            " _deleted_at (cleared if they come back), 'delete' removes them."
        ),
    )

    @field_validator("deletions")
    @classmethod
    def _valid_deletions(cls, value: str) -> str:
        if value not in DELETIONS_MODES:
            raise ValueError(f"deletions must be one of {DELETIONS_MODES}, got {value!r}")
        return value

    @staticmethod
    def _names(context: dg.OutputContext) -> Names:
        """The account's names, from its asset keys (``<key_prefix>/<table>``)."""
        return Names(context.asset_key.path[0])

    def handle_output(self, context: dg.OutputContext, obj: TableWrite) -> None:
        if not isinstance(obj, TableWrite):
            raise dg.DagsterInvariantViolationError(
                f"{'/'.join(context.asset_key.path)}: this IO manager writes the marketing assets' tables;"
                f" it was handed a {type(obj).__name__}"
            )
        first = obj.write.result is None
        try:
            commit = obj.write.commit(self.warehouse.file(), self.warehouse.schema_name, self.deletions, log=context.log.warning)
        except MassDeletionError as refused:
            # What to do, in one message without a traceback; a retry would meet the same answer.
            said = refused.describe(obj.write.settings)
            raise dg.Failure(description=f"{said}\n{self._names(context).how_to_confirm_mass_deletion()}", allow_retries=False) from None
        if first:
            context.log.info(_summary(commit, self.warehouse.schema_name, obj.write.history))
        written = commit.written[obj.table]
        name = f"{self.warehouse.schema_name}.{obj.table}"
        metadata: dict[str, Any] = {
            "dagster/table_name": name,
            "commit_seconds": round(commit.seconds, 3),  # the run's whole transaction, every table
        }
        if written.merge is not None:
            merge = written.merge
            if merge.duplicate_keys:
                context.log.warning(
                    f"{name}: {merge.duplicate_keys} records came again under a key already read in this sync"
                    " (the API listed them twice); the later copy was kept"
                )
            batch = next(batch for batch in obj.write.batches if batch.spec.name == obj.table)
            if merge.newer_kept:
                context.log.warning(
                    f"{name}: {merge.newer_kept} rows had been written or read by a sync that began after this one"
                    " and landed first (the runs overlapped): they were left as that sync left them"
                )
            if merge.superseded_by is not None:
                context.log.warning(
                    f"{name}: not written: a complete read of it that began at {merge.superseded_by.isoformat()},"
                    f" after this sync's began ({batch.synced_at.isoformat()}), landed first (the runs overlapped)."
                    " This sync's read is older, so the table, its history and the tables built from it"
                    " stay as that sync left them; nothing to do"
                )
            metadata.update(
                {
                    # Live rows: what a user counts. Rows marked deleted are in total_rows.
                    "dagster/row_count": merge.row_count,
                    "total_rows": merge.total_rows,
                    "rows_inserted": merge.inserted,
                    "rows_updated": merge.updated,
                    "rows_unchanged": merge.unchanged,
                    "rows_deleted_upstream": merge.deleted,
                    "duplicate_keys": merge.duplicate_keys,
                    # Rows a sync that began later had written: left as it wrote them.
                    "rows_kept_newer": merge.newer_kept,
                    # A complete read that began later landed first: this read was not applied.
                    "superseded_by_newer_read": merge.superseded_by is not None,
                    "complete_read": batch.complete,
                    "merge_seconds": round(written.seconds, 3),
                }
            )
            if obj.write.history:
                metadata.update(
                    {
                        # Where every version of the rows is kept (see mkt_assets.warehouse.history).
                        "history_table": f"{self.warehouse.schema_name}.{history_table(obj.table)}",
                        "versions_opened": merge.versions_opened,
                        "versions_closed": merge.versions_closed,
                    }
                )
        if written.build is not None:
            metadata.update(
                {
                    "dagster/row_count": written.build.row_count,
                    # False: nothing it reads changed, so it was kept as it was (or a refresh
                    # updated it in place, for the rows it refreshed alone).
                    "rebuilt": written.build.rebuilt,
                    "build_seconds": round(written.seconds, 3),
                }
            )
            if written.build.updated_in_place:
                metadata.update(
                    {"updated_in_place": True, "rows_removed": written.build.rows_removed, "rows_added": written.build.rows_added}
                )
        metadata["preview"] = preview_metadata(written.preview)
        context.add_output_metadata(metadata)

    def load_input(self, context: dg.InputContext) -> duckdb.DuckDBPyRelation:
        """The table's live rows, as a relation on a read-only connection that lives as long as
        the relation (while it does, writers of the file wait for it)."""
        table = context.asset_key.path[-1]
        connection = read_only(self.warehouse.file(), log=context.log.warning)
        name = fully_qualified(connection, self.warehouse.schema_name, table)
        columns = {row[0] for row in connection.execute(f"DESCRIBE {name}").fetchall()}
        live = " WHERE _deleted_at IS NULL" if "_deleted_at" in columns else ""
        return connection.sql(f"SELECT * FROM {name}{live}")


def preview_metadata(preview: str) -> dg.MetadataValue:
    """A table's first rows, or why a table of people (or of what names them) shows none."""
    if preview:
        return dg.MetadataValue.md(preview)
    return dg.MetadataValue.text("none: its rows are contacts' personal data, kept out of Dagster's storage and UI")


def _summary(commit: RunCommit, schema: str, history: bool) -> str:
    """The run's write in one line of the run's log (each line is an event the instance stores)."""
    parts = []
    for name, written in commit.written.items():
        if written.merge is not None:
            merge = written.merge
            if merge.superseded_by is not None:
                parts.append(
                    f"{schema}.{name}: not written, a newer complete read (begun {merge.superseded_by.isoformat()})"
                    f" landed first, {merge.row_count} live rows"
                )
                continue
            versions = f", versions {merge.versions_opened} opened and {merge.versions_closed} closed" if history else ""
            kept = f", {merge.newer_kept} kept as a newer sync wrote them" if merge.newer_kept else ""
            parts.append(
                f"{schema}.{name}: {merge.inserted} inserted, {merge.updated} updated, {merge.unchanged} unchanged,"
                f" {merge.deleted} gone upstream{kept}, {merge.row_count} live rows{versions}"
            )
        elif written.build is not None:
            build = written.build
            if build.updated_in_place:
                done = f"updated in place for the refreshed rows ({build.rows_removed} removed, {build.rows_added} added)"
            else:
                done = "rebuilt" if build.rebuilt else "kept, since nothing it reads changed"
            parts.append(f"{schema}.{name}: {done}, {build.row_count} rows")
    return f"wrote {len(parts)} tables in one transaction ({commit.seconds:.1f}s): " + "; ".join(parts)
