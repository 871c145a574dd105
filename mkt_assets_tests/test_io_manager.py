"""The Dagster IO manager: merges staged batches into <schema>.<asset> and reports it."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from mkt_assets.catalog import RESOURCES_BY_NAME
from mkt_assets.client import Page
from mkt_assets.io_manager import MarketingDuckDBIOManager
from mkt_assets.staging import PageStager, StagedBatch
from mkt_assets.warehouse import connect

TAGS = RESOURCES_BY_NAME["tags"]


def tag_batch(directory: Path, names: dict[int, str]) -> StagedBatch:
    items = [{"id": i, "name": name, "createdAt": "2024-01-01T00:00:00+00:00"} for i, name in names.items()]
    with PageStager(TAGS, directory=str(directory)) as stager:
        stager.add(Page("tags", 1, "/api/tags", {}, items, False, json.dumps({"items": items, "hasMore": False}).encode()))
        return stager.finish()


def materialize_tags(database: str, batch: StagedBatch) -> dg.ExecuteInProcessResult:
    @dg.asset(key=["marketing", "tags"], io_manager_key="duckdb_io_manager")
    def tags() -> StagedBatch:
        return batch

    return dg.materialize(
        [tags], resources={"duckdb_io_manager": MarketingDuckDBIOManager(database=database, schema="marketing")}
    )


def test_materializations_merge_and_report_what_changed(tmp_path: Path) -> None:
    database = str(tmp_path / "warehouse.duckdb")
    materialize_tags(database, tag_batch(tmp_path, {1: "a", 2: "b"}))
    second = tag_batch(tmp_path, {2: "b2", 3: "c"})

    result = materialize_tags(database, second)

    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["rows_inserted"].value == 1
    assert metadata["rows_updated"].value == 1
    assert metadata["rows_unchanged"].value == 0
    assert metadata["rows_deleted_upstream"].value == 1  # tag 1 is no longer listed
    assert (metadata["dagster/row_count"].value, metadata["total_rows"].value) == (2, 3)
    assert metadata["dagster/table_name"].value == "marketing.tags"
    with connect(database) as connection:
        rows = connection.execute("SELECT id, name, _deleted_at IS NOT NULL FROM marketing.tags ORDER BY id").fetchall()
    assert rows == [(1, "a", True), (2, "b2", False), (3, "c", False)]
    assert not any(path.exists() for path in second.paths), "the staging files are removed once merged"


def test_loading_a_table_as_an_input_explains_how_to_read_it(tmp_path: Path) -> None:
    database = str(tmp_path / "warehouse.duckdb")
    batch = tag_batch(tmp_path, {1: "a"})

    @dg.asset(key=["marketing", "tags"], io_manager_key="duckdb_io_manager")
    def tags() -> StagedBatch:
        return batch

    @dg.asset(ins={"tags": dg.AssetIn(key=["marketing", "tags"])})
    def downstream(tags: StagedBatch) -> None:
        return None

    with pytest.raises(dg.DagsterInvariantViolationError, match="read it with SQL"):
        dg.materialize(
            [tags, downstream],
            resources={"duckdb_io_manager": MarketingDuckDBIOManager(database=database, schema="marketing")},
        )
