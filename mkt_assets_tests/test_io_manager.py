"""The IO manager: lands a run's tables in one transaction, reports each, and reads them back."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest

from mkt_assets.core.catalog import RESOURCES_BY_NAME, ResourceSpec
from mkt_assets.core.page import Page
from mkt_assets.orchestration.io_manager import MarketingDuckDBIOManager
from mkt_assets.orchestration.resource import WarehouseResource
from mkt_assets.plumbing import lean_process
from mkt_assets.run.sync import RunWrite, TableWrite, in_worker
from mkt_assets.staging.pages import PageStager, StagedBatch
from mkt_assets.warehouse.commit import CommitRequest, RunCommit, commit
from mkt_assets.warehouse.connection import connect

TAGS = RESOURCES_BY_NAME["tags"]
COMMUNITIES = RESOURCES_BY_NAME["communities"]


def batch_of(spec: ResourceSpec, directory: Path, items: list[dict[str, Any]]) -> StagedBatch:
    with PageStager(spec, directory=str(directory)) as stager:
        stager.add(Page(spec.name, 1, f"/api{spec.path}", {}, items, False, json.dumps({"items": items, "hasMore": False}).encode()))
        return stager.finish()


def tags(directory: Path, names: dict[int, str]) -> StagedBatch:
    return batch_of(TAGS, directory, [{"id": i, "name": n, "createdAt": "2024-01-01T00:00:00+00:00"} for i, n in names.items()])


def write_assets(write: RunWrite) -> dg.AssetsDefinition:
    specs = [dg.AssetSpec(["marketing", batch.spec.name]).with_io_manager_key("duckdb_io_manager") for batch in write.batches]

    @dg.multi_asset(specs=specs)
    def run_write():  # type: ignore[no-untyped-def]
        for batch in write.batches:
            yield dg.Output(TableWrite(write, batch.spec.name), output_name=f"marketing__{batch.spec.name}")

    return run_write


def materialize(
    database: str, *batches: StagedBatch, runner: Any = None, instance: dg.DagsterInstance | None = None
) -> dg.ExecuteInProcessResult:
    with lean_process.Worker() as worker:
        write = RunWrite(batches=batches, tables=(), runner=runner or in_worker(worker))
        return dg.materialize(
            [write_assets(write)],
            resources={"duckdb_io_manager": MarketingDuckDBIOManager(warehouse=WarehouseResource(database=database))},
            raise_on_error=False,
            instance=instance,
        )


def metadata(result: dg.ExecuteInProcessResult, name: str) -> dict[str, Any]:
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == name]
    return {key: value.value for key, value in event.materialization.metadata.items()}


def test_materializations_merge_and_report_what_changed(tmp_path: Path) -> None:
    database = str(tmp_path / "warehouse.duckdb")
    materialize(database, tags(tmp_path, {1: "a", 2: "b"}))
    second = tags(tmp_path, {2: "b2", 3: "c"})

    result = materialize(database, second)

    assert result.success
    reported = metadata(result, "tags")
    assert (reported["rows_inserted"], reported["rows_updated"], reported["rows_unchanged"]) == (1, 1, 0)
    assert reported["rows_deleted_upstream"] == 1  # tag 1 is no longer listed
    assert reported["rows_kept_newer"] == 0
    assert (reported["dagster/row_count"], reported["total_rows"]) == (2, 3)
    assert reported["dagster/table_name"] == "marketing.tags"
    with connect(database) as connection:
        rows = connection.execute("SELECT id, name, _deleted_at IS NOT NULL FROM marketing.tags ORDER BY id").fetchall()
    assert rows == [(1, "a", True), (2, "b2", False), (3, "c", False)]
    assert not any(path.exists() for path in second.paths), "the staging files are removed once merged"


@pytest.mark.slow  # a second or more: several real syncs
def test_a_run_that_began_first_but_lands_after_a_newer_complete_read_writes_nothing_and_says_so(tmp_path: Path) -> None:
    database = str(tmp_path / "warehouse.duckdb")
    materialize(database, tags(tmp_path, {1: "a", 2: "b", 3: "c"}))
    began_first = tags(tmp_path, {1: "a", 2: "b", 3: "c-as-first-read"})  # staged first: the older read
    began_later = tags(tmp_path, {1: "a", 2: "b2", 4: "d"})  # 2 renamed, 3 gone, 4 new

    assert materialize(database, began_later).success
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(database, began_first, instance=instance)

    assert result.success
    reported = metadata(result, "tags")
    assert reported["superseded_by_newer_read"] is True
    assert (reported["rows_kept_newer"], reported["rows_updated"], reported["rows_inserted"], reported["rows_deleted_upstream"]) == (0, 0, 0, 0)
    assert reported["dagster/row_count"] == 3
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert (
        f"marketing.tags: not written: a complete read of it that began at {began_later.synced_at.isoformat()},"
        f" after this sync's began ({began_first.synced_at.isoformat()}), landed first (the runs overlapped)."
        " This sync's read is older, so the table, its history and the tables built from it stay as that"
        " sync left them; nothing to do"
    ) in messages
    assert any(
        f"marketing.tags: not written, a newer complete read (begun {began_later.synced_at.isoformat()}) landed first, 3 live rows" in m
        for m in messages
    )
    with connect(database) as connection:
        rows = connection.execute("SELECT id, name, _deleted_at IS NOT NULL FROM marketing.tags ORDER BY id").fetchall()
    assert rows == [(1, "a", False), (2, "b2", False), (3, "c", True), (4, "d", False)]


@pytest.mark.slow  # a second or more: several real syncs
def test_a_run_that_began_first_but_lands_after_a_newer_partial_read_keeps_its_rows_and_says_so(tmp_path: Path) -> None:
    database = str(tmp_path / "warehouse.duckdb")
    materialize(database, tags(tmp_path, {1: "a", 2: "b", 3: "c"}))
    began_first = tags(tmp_path, {1: "a", 2: "b", 3: "c2"})  # staged first: the older read
    began_later = replace(tags(tmp_path, {2: "b2", 4: "d"}), complete=False)  # 2 renamed, 4 new

    assert materialize(database, began_later).success
    instance = dg.DagsterInstance.ephemeral()
    result = materialize(database, began_first, instance=instance)

    assert result.success
    reported = metadata(result, "tags")
    assert reported["superseded_by_newer_read"] is False
    assert (reported["rows_kept_newer"], reported["rows_updated"], reported["rows_deleted_upstream"]) == (2, 1, 0)
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert (
        "marketing.tags: 2 rows had been written or read by a sync that began after this one and landed first"
        " (the runs overlapped): they were left as that sync left them"
    ) in messages
    assert any("marketing.tags: 0 inserted, 1 updated, 1 unchanged, 0 gone upstream, 2 kept as a newer sync wrote them" in m for m in messages)
    with connect(database) as connection:
        rows = connection.execute("SELECT id, name, _deleted_at IS NOT NULL FROM marketing.tags ORDER BY id").fetchall()
    assert rows == [(1, "a", False), (2, "b2", False), (3, "c2", False), (4, "d", False)]


def test_every_table_of_a_run_lands_in_one_transaction_at_the_first_output(tmp_path: Path) -> None:
    database = str(tmp_path / "warehouse.duckdb")
    calls: list[str] = []

    def runner(request: CommitRequest, log: Any) -> RunCommit:
        calls.append(f"{len(request.batches)} tables")
        return commit(request)

    result = materialize(
        database,
        tags(tmp_path, {1: "a"}),
        batch_of(COMMUNITIES, tmp_path, [{"id": 7, "name": "Lounge", "domainName": None, "path": "x"}]),
        runner=runner,
    )

    assert result.success
    assert calls == ["2 tables"]  # once, for both tables
    assert metadata(result, "tags")["commit_seconds"] == metadata(result, "communities")["commit_seconds"]


def test_a_run_whose_write_fails_writes_no_table_and_materializes_none(tmp_path: Path) -> None:
    database = str(tmp_path / "warehouse.duckdb")
    materialize(database, tags(tmp_path, {1: "a"}))
    broken = batch_of(COMMUNITIES, tmp_path, [{"id": 7, "name": "Lounge", "domainName": None, "path": "x"}])
    broken.paths[0].write_text("not the staged pages")

    result = materialize(database, tags(tmp_path, {1: "renamed", 2: "new"}), broken)

    assert not result.success
    assert result.get_asset_materialization_events() == []
    with connect(database) as connection:
        assert connection.execute("SELECT id, name FROM marketing.tags").fetchall() == [(1, "a")]
        assert connection.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'communities'").fetchone() == (0,)


@pytest.mark.slow  # three real runs: two writes, then the downstream asset's
def test_a_downstream_asset_reads_the_live_rows_as_a_duckdb_relation(tmp_path: Path) -> None:
    database = str(tmp_path / "warehouse.duckdb")
    materialize(database, tags(tmp_path, {1: "a", 2: "b"}))
    materialize(database, tags(tmp_path, {2: "b"}))  # tag 1 is now marked deleted
    seen: list[Any] = []

    @dg.asset(ins={"tags": dg.AssetIn(key=["marketing", "tags"])})
    def tag_names(tags: duckdb.DuckDBPyRelation) -> None:
        seen.append(tags.project("id, name").order("id").fetchall())

    result = dg.materialize(
        [tag_names, *[dg.AssetSpec(["marketing", "tags"]).with_io_manager_key("duckdb_io_manager")]],
        resources={"duckdb_io_manager": MarketingDuckDBIOManager(warehouse=WarehouseResource(database=database))},
        selection=[tag_names.key],
    )

    assert result.success
    assert seen == [[(2, "b")]]


def test_a_value_that_is_not_a_run_write_is_refused_saying_so(tmp_path: Path) -> None:
    @dg.asset(key=["marketing", "tags"], io_manager_key="duckdb_io_manager")
    def tags_asset() -> list[int]:
        return [1, 2]

    with pytest.raises(dg.DagsterInvariantViolationError, match="it was handed a list"):
        dg.materialize(
            [tags_asset],
            resources={"duckdb_io_manager": MarketingDuckDBIOManager(warehouse=WarehouseResource(database=str(tmp_path / "w.duckdb")))},
        )
