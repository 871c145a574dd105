"""The marketing assets: one per API resource and one per normalized table, generated from the
catalog and materialized together by one step.

A run is one step in one process: it reads every selected resource at once (a thread each),
then hands every table to the IO manager, which lands them in a single DuckDB transaction, and
reports each table's checks. Each resource stays an asset of its own, with its checks,
freshness policy, metadata and column schema; materializing one alone reads only that one.
The stages themselves (``sync``) know nothing of Dagster: this module hands them their inputs
and turns what they return into Dagster's outputs, materializations and check results.
"""


import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from mkt_assets.core.catalog import (
    BOOKKEEPING_COLUMNS,
    RESOURCES_BY_NAME,
    ResourceSpec,
    referenced_first,
    referenced_resources,
)
from mkt_assets.core.errors import ConfigurationError, WarehouseFileError
from mkt_assets.orchestration.checks import (
    ROW_COUNT_CHECK,
    could_not_run,
    history_check_spec,
    history_result,
    normalized_check_specs,
    normalized_results,
    primary_key_result,
    reference_check_specs,
    reference_result,
    required_fields_result,
    row_count_result,
    sync_check_specs,
)
from mkt_assets.orchestration.io_manager import preview_metadata
from mkt_assets.orchestration.names import Names
from mkt_assets.orchestration.resource import MarketingApiResource, WarehouseResource
from mkt_assets.orchestration.run_retries import before_the_run, no_retry_that_cannot_mend
from mkt_assets.orchestration.settings import Settings
from mkt_assets.plumbing import lean_process
from mkt_assets.run.refresh import MAX_REFRESH_KEYS, fetch_refresh, plan_refresh, refresh_keys
from mkt_assets.run.sync import Fetched, FetchOptions, RunWrite, TableWrite, fetch_all, in_worker, plan_sync
from mkt_assets.staging.resume import ResumeOptions, read_identity
from mkt_assets.warehouse.chunk_typing import TypingQueue
from mkt_assets.warehouse.commit import Facts, RunCommit, check_before_fetch, newest_keys, run_tables
from mkt_assets.warehouse.connection import database_path
from mkt_assets.warehouse.merge import MASS_DELETION_ALLOWANCE
from mkt_assets.warehouse.normalized_tables import NormalizedTable, normalized_tables

# The default account's names (this project's own: prefix marketing).
DEFAULT_NAMES = Names()


def warehouse_pool(database: str) -> str:
    """The Dagster pool of every sync that writes ``database``: the project's dagster.yaml
    lets one run of a pool in progress at a time (``concurrency.pools``, ``granularity: run``),
    so a second sync of the same file waits QUEUED in the UI instead of reading the API while
    the first does and landing over it. Named by the file's name and a hash of its absolute
    path, so two warehouses never share a pool and the name stays one URL-safe word."""
    path = database_path(database)
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).name)
    return f"mkt_warehouse_{readable}_{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def asset_key(spec: ResourceSpec, names: Names = DEFAULT_NAMES) -> dg.AssetKey:
    return names.asset_key(spec.name)


def table_key(table: NormalizedTable, names: Names = DEFAULT_NAMES) -> dg.AssetKey:
    return names.asset_key(table.name)


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


def freshness_policy(settings: Settings) -> dg.FreshnessPolicy:
    return dg.FreshnessPolicy.time_window(fail_window=settings.freshness_fail, warn_window=settings.freshness_warn)


def synced_asset_spec(spec: ResourceSpec, settings: Settings) -> dg.AssetSpec:
    names = Names(settings.key_prefix)
    return dg.AssetSpec(
        key=asset_key(spec, names),
        # The lineage follows the catalog's references: an enrollment names a contact and a course.
        deps=[asset_key(RESOURCES_BY_NAME[name], names) for name in referenced_resources(spec, settings.resource_specs)],
        group_name=names.group,
        description=spec.description,
        kinds={"python", "duckdb"},
        owners=list(settings.owners),
        freshness_policy=freshness_policy(settings),
        metadata={
            "dagster/column_schema": column_schema(spec),
            "dagster/table_name": f"{settings.schema_name}.{spec.name}",
            "api_path": spec.path,
            "primary_key": spec.primary_key_column.name,
        },
    ).with_io_manager_key(names.io_manager)


def normalized_asset_spec(table: NormalizedTable, settings: Settings) -> dg.AssetSpec:
    names = Names(settings.key_prefix)
    return dg.AssetSpec(
        key=table_key(table, names),
        deps=[names.asset_key(parent) for parent in table.reads],
        group_name=names.normalized_group,
        description=table.description,
        kinds={"duckdb", "sql"},
        owners=list(settings.owners),
        freshness_policy=freshness_policy(settings),
        metadata={
            "dagster/table_name": f"{settings.schema_name}.{table.name}",
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(name, column_type) for name, column_type in table.columns]
            ),
        },
    ).with_io_manager_key(names.io_manager)


def check_specs(settings: Settings) -> list[dg.AssetCheckSpec]:
    chosen = settings.resource_specs
    names = Names(settings.key_prefix)

    def key_of(spec: ResourceSpec) -> dg.AssetKey:
        return asset_key(spec, names)

    return [
        *(check for spec in chosen for check in sync_check_specs(spec, key_of(spec), settings.row_count_max_drop)),
        *(check for spec in chosen for check in reference_check_specs(spec, key_of, settings.resources)),
        *(history_check_spec(spec, key_of(spec)) for spec in chosen if settings.history),
        *(check for table in normalized_tables(chosen) for check in normalized_check_specs(table, table_key(table, names))),
    ]


class SyncConfig(dg.Config):
    """How the run reads its resources."""

    incremental: bool = Field(
        default=False,
        description=(
            "Read only records newer than the newest stored one, for resources whose ids only grow"
            f" ({', '.join(spec.name for spec in RESOURCES_BY_NAME.values() if spec.incremental)});"
            " others, and an empty table, are read in full. An incremental read never marks"
            " deletions in those: the full sync does."
        ),
    )
    confirm_mass_deletion: bool = Field(
        default=False,
        description=(
            "Apply this run's deletions even where a complete read lacks more of a table's live"
            f" rows than a sync marks gone unconfirmed (the larger of {MASS_DELETION_ALLOWANCE} rows and a"
            " share of them: 10%, or what MKT_ROW_COUNT_MAX_DROP sets where the settings come from the"
            " environment; never all of them)."
            " Without it such a run fails and writes nothing, since an API answering an empty"
            " list during an outage looks the same. Set it for one run, once the rows are known"
            " to be deleted upstream."
        ),
    )
    contact_ids: list[int] | None = Field(
        default=None,
        description=(
            "Refresh these contacts alone (the <key_prefix>_refresh job): each is read by its id, one"
            f" request each (at most {MAX_REFRESH_KEYS:,} distinct ids a run), merged with its history"
            " (a contact the API answers 404 for is marked deleted), and the tables built from contacts"
            " are updated for them alone, all in one transaction. Only the contacts asset and the tables"
            " built from it may be selected; unset, a run syncs as usual."
        ),
    )


def build_marketing_assets(settings: Settings) -> dg.AssetsDefinition:
    """The step and its assets: the resources ``settings`` chooses (``MKT_RESOURCES``) and the
    normalized tables they make; a resource left out is not an asset at all, nor its checks."""
    chosen = settings.resource_specs
    all_tables = normalized_tables(chosen)
    within = frozenset(settings.resources)
    names = Names(settings.key_prefix)
    specs = [
        *(synced_asset_spec(spec, settings) for spec in chosen),
        *(normalized_asset_spec(table, settings) for table in all_tables),
    ]

    @dg.multi_asset(
        name=names.step,
        specs=specs,
        # By key, not by parameter name: each account's resources have keys of their own.
        required_resource_keys={names.api, names.warehouse},
        check_specs=check_specs(settings),
        can_subset=True,
        pool=warehouse_pool(settings.duckdb_path),
        # On the step, not the jobs: a run of the asset graph's own job is judged the same way.
        hooks={no_retry_that_cannot_mend},
    )
    def sync_marketing(
        context: dg.AssetExecutionContext,
        config: SyncConfig,
    ) -> Iterator[dg.Output[TableWrite] | dg.AssetMaterialization | dg.AssetCheckResult]:
        marketing_api: MarketingApiResource = getattr(context.resources, names.api)
        warehouse: WarehouseResource = getattr(context.resources, names.warehouse)
        before_the_run(context, settings)
        selected = context.selected_asset_keys
        # Reported after what they reference, as Dagster asks of one step's outputs.
        resources = referenced_first(spec for spec in chosen if asset_key(spec, names) in selected)
        if config.contact_ids is not None or context.job_def.name == names.refresh_job:
            yield from _refresh(context, config, settings, resources, all_tables, marketing_api, warehouse)
            return
        if resources:
            try:
                _, key_warning = marketing_api.checked_key()
            except ConfigurationError as missing:
                # At once, before anything is fetched, and without a traceback: it says what to do.
                raise dg.Failure(description=str(missing), allow_retries=False) from None
            if key_warning is not None:
                context.log.warning(key_warning)  # once here, not once per resource's client
        tables = [table for table in all_tables if table_key(table, names) in selected]
        file = warehouse.file()
        # One worker for the run's DuckDB work, started now so its start overlaps the fetch;
        # one more types staged chunks during the fetch, at the lowest priority.
        with lean_process.Worker("duckdb", preload=("mkt_assets.warehouse.commit",)) as duckdb, TypingQueue(
            warehouse.memory_limit
        ) as typing:
            incremental = [spec for spec in resources if spec.incremental] if config.incremental else []
            try:
                # Before the first request: a file the write would refuse fails in seconds. In
                # this process (tens of ms, a read-only look at the file's catalog), not the
                # worker's, whose start then overlaps the fetch instead of delaying it; the same
                # look reads where an incremental read starts.
                looked = check_before_fetch(
                    file,
                    warehouse.schema_name,
                    run_tables(resources, plan_sync(resources, tables, all_tables, {}).tables),
                    newest_of=incremental,
                )
            except WarehouseFileError as unusable:
                raise dg.Failure(description=f"{unusable}. Nothing was fetched.", allow_retries=False) from None
            newest: dict[str, int | None] = {}
            if incremental:
                # A writer held the file as it was looked at: the worker waits its turn.
                newest = looked if looked is not None else duckdb.call(newest_keys, file, warehouse.schema_name, incremental, log=context.log.warning)
                for name in [name for name, key in newest.items() if key is None]:
                    context.log.info(f"{name}: nothing stored yet, so a full read")
            plan = plan_sync(resources, tables, all_tables, newest)
            fetched = fetch_all(
                plan,
                lambda stop: marketing_api.get_client(log=context.log.warning, stop=stop),
                FetchOptions(
                    staging_dir=marketing_api.staging_dir or None,
                    chunk_pages=marketing_api.staging_chunk_pages,
                    progress_seconds=settings.progress_interval_seconds,
                    chosen=tuple(spec.name for spec in chosen),
                    settings=settings.setting_names,
                    resume=ResumeOptions(
                        read_identity(
                            base_url=marketing_api.base_url,
                            api_key=marketing_api.key(),
                            order=marketing_api.order,
                            database=file.database,
                            schema=warehouse.schema_name,
                            deletions=settings.deletions,
                        ),
                        settings.resume_window,
                        context.run.run_id,
                    ),
                ),
                typing,
                context.log.info,
            )
            _log_fetches(context, list(fetched.values()))
            previous = _previous_row_counts(context, selected)
            write = RunWrite(
                batches=tuple(fetched[spec.name].batch for spec in resources),
                tables=plan.tables,
                runner=in_worker(duckdb),
                asked=frozenset(table.name for table in tables),
                history=settings.history,
                within=within,
                max_drop=settings.row_count_max_drop,
                confirm_mass_deletion=config.confirm_mass_deletion,
                settings=settings.setting_names,
            )
            for spec in resources:
                yield dg.Output(
                    TableWrite(write, spec.name),
                    output_name=asset_key(spec, names).to_python_identifier(),
                    metadata=_fetch_metadata(fetched[spec.name]),
                )
            for table in plan.tables:
                if table_key(table, names) in selected:
                    yield dg.Output(TableWrite(write, table.name), output_name=table_key(table, names).to_python_identifier())
            commit = write.result
            assert commit is not None, "the IO manager writes the run's tables as the first output is handled"
            yield from _tables_kept_up(context, commit, plan.tables, warehouse.schema_name, names)
            facts = write.checks_facts()
            # Nothing more for the worker: it exits (its interpreter's shutdown takes tens of
            # ms) while the checks are reported, not after them.
            duckdb.finish()
            yield from _check_results(context, commit, facts, resources, plan.tables, previous, settings, warehouse.schema_name, names)

    return sync_marketing


def _tables_kept_up(
    context: dg.AssetExecutionContext, commit: RunCommit, tables: Sequence[NormalizedTable], schema: str, names: Names
) -> Iterator[dg.AssetMaterialization]:
    """What became of the tables the run wrote without being asked: a table rebuilt (or updated)
    with the tables it reads, so it never lags them, is said to be so."""
    for table in tables:
        if table.name in commit.skipped:
            context.log.info(f"{schema}.{table.name} not rebuilt: {commit.skipped[table.name]}")
        elif table_key(table, names) not in context.selected_asset_keys:
            build = commit.written[table.name].build
            assert build is not None
            if build.rebuilt or build.updated_in_place:
                yield _rebuilt_materialization(table, commit, schema, names)


def _refresh(
    context: dg.AssetExecutionContext,
    config: SyncConfig,
    settings: Settings,
    resources: Sequence[ResourceSpec],
    all_tables: Sequence[NormalizedTable],
    marketing_api: MarketingApiResource,
    warehouse: WarehouseResource,
) -> Iterator[dg.Output[TableWrite] | dg.AssetMaterialization | dg.AssetCheckResult]:
    """The step as a refresh of the contacts ``config.contact_ids`` names (see ``run.refresh``)."""
    names = Names(settings.key_prefix)
    setting = f"{names.step}'s config contact_ids"
    if config.contact_ids is None:
        raise dg.Failure(
            description=(
                f"{names.refresh_job} refreshes the contacts its run config names, and this run names none:"
                f" launch it with {json.dumps(names.refresh_run_config([1, 2]))} (your contacts' ids)"
            ),
            allow_retries=False,
        )
    contacts = RESOURCES_BY_NAME["contacts"]
    others = [spec.name for spec in resources if spec is not contacts]
    if others or contacts not in resources or config.incremental:
        wrong = (
            f"it also selects {', '.join(others)}" if others
            else "it does not select the contacts asset" if contacts not in resources
            else "it is also incremental"
        )  # fmt: skip
        raise dg.Failure(
            description=(
                f"A run given contact_ids refreshes those contacts alone, and {wrong}: launch {names.refresh_job}"
                f" (the contacts asset and the tables built from it), or leave contact_ids out to sync as usual."
            ),
            allow_retries=False,
        )
    try:
        keys = refresh_keys(config.contact_ids, setting)
    except ConfigurationError as refused:
        raise dg.Failure(description=str(refused), allow_retries=False) from None
    if not keys:
        raise dg.Failure(
            description=f"{setting} is empty: name the contacts to refresh, as {json.dumps(names.refresh_run_config([1, 2]))}",
            allow_retries=False,
        )
    try:
        _, key_warning = marketing_api.checked_key()
    except ConfigurationError as missing:
        raise dg.Failure(description=str(missing), allow_retries=False) from None
    if key_warning is not None:
        context.log.warning(key_warning)
    plan = plan_refresh(contacts, keys, all_tables)
    selected = context.selected_asset_keys
    file = warehouse.file()
    with lean_process.Worker("duckdb", preload=("mkt_assets.warehouse.commit",)) as duckdb:
        try:
            check_before_fetch(file, warehouse.schema_name, run_tables([contacts], plan.tables))
        except WarehouseFileError as unusable:
            raise dg.Failure(description=f"{unusable}. Nothing was fetched.", allow_retries=False) from None
        fetched = fetch_refresh(
            plan,
            lambda stop: marketing_api.get_client(log=context.log.warning, stop=stop),
            marketing_api.staging_dir or None,
            settings.progress_interval_seconds,
            context.log.info,
        )
        batch, stats = fetched.batch, fetched.stats
        context.log.info(
            f"fetched {contacts.name} {fetched.read} ({stats.requests} requests, {stats.retries} retries, {fetched.seconds:.1f}s)"
        )
        if batch.unknown_fields:
            context.log.warning(f"{contacts.name}: the API sent fields the catalog does not know, kept in _extra: {', '.join(batch.unknown_fields)}")
        contacts_key = asset_key(contacts, names)
        # Every check but the row count reads the whole table: the facts are gathered only when
        # one of them was asked for (the refresh job asks for none).
        whole_table_checks = any(
            check.asset_key == contacts_key and check.name != ROW_COUNT_CHECK for check in context.selected_asset_check_keys
        )
        previous = _previous_row_counts(context, selected)
        write = RunWrite(
            batches=(batch,),
            tables=plan.tables,
            runner=in_worker(duckdb),
            asked=frozenset(table.name for table in plan.tables if table_key(table, names) in selected),
            history=settings.history,
            within=frozenset(settings.resources),
            refresh=fetched.refresh,
            facts=whole_table_checks,
        )
        yield dg.Output(
            TableWrite(write, contacts.name),
            output_name=contacts_key.to_python_identifier(),
            metadata={
                "dagster/column_schema": column_schema(contacts),
                "read": fetched.read,
                "records_fetched": batch.records,
                "ids_asked": len(fetched.keys),
                "gone_upstream_404": len(fetched.gone),
                "requests": stats.requests,
                "retries": stats.retries,
                "throttled_429": stats.throttled,
                "paced_seconds": round(stats.paced_seconds, 3),
                "fetch_seconds": round(fetched.seconds, 3),
                "unknown_fields": ", ".join(batch.unknown_fields) or "none",
            },
        )
        for table in plan.tables:
            if table_key(table, names) in selected:
                yield dg.Output(TableWrite(write, table.name), output_name=table_key(table, names).to_python_identifier())
        commit = write.result
        assert commit is not None, "the IO manager writes the run's tables as the first output is handled"
        yield from _tables_kept_up(context, commit, plan.tables, warehouse.schema_name, names)
        yield from _check_results(context, commit, write.checks_facts(), [contacts], plan.tables, previous, settings, warehouse.schema_name, names)


def _log_fetches(context: dg.AssetExecutionContext, fetches: Sequence[Fetched]) -> None:
    """What the fetches met, in as few lines as the run's log can take: each line is an event
    the instance stores, and a run with many costs seconds."""
    for done in fetches:
        name, batch = done.spec.name, done.batch
        if done.swept:
            context.log.info(
                f"{name}: removed {len(done.swept)} staging directories and files left by runs that died:"
                f" {', '.join(str(path) for path in done.swept)}"
            )
        for failure in done.typing_failures:
            context.log.warning(f"{name}: {failure}")
        if batch.unknown_fields:
            context.log.warning(
                f"{name}: the API sent fields the catalog does not know, kept in _extra: {', '.join(batch.unknown_fields)}"
            )
    if fetches:
        context.log.info(
            "fetched "
            + "; ".join(
                f"{done.spec.name}: {done.batch.records} records in {done.batch.pages} pages"
                f" ({done.stats.requests} requests, {done.stats.retries} retries, {done.seconds:.1f}s)"
                for done in fetches
            )
        )


def _fetch_metadata(done: Fetched) -> dict[str, Any]:
    batch, stats = done.batch, done.stats
    return {
        "dagster/column_schema": column_schema(done.spec),
        "read": done.read,
        "records_fetched": batch.records,
        "pages": batch.pages,
        "requests": stats.requests,
        "retries": stats.retries,
        "throttled_429": stats.throttled,
        "paced_seconds": round(stats.paced_seconds, 3),  # waited for the rate limit
        "fetch_seconds": round(done.seconds, 3),
        "unknown_fields": ", ".join(batch.unknown_fields) or "none",
        # Chunks typed to Parquet while the fetch went on; the merge parses the rest.
        "staging_chunks": len(batch.paths),
        "chunks_typed_during_fetch": len(batch.typed),
        # Pages a failed run had read that this one continued from, instead of reading them again.
        "pages_resumed": done.pages_resumed,
        "resumed_from_run": done.resumed_from_run or "none",
    }


def _rebuilt_materialization(table: NormalizedTable, commit: RunCommit, schema: str, names: Names) -> dg.AssetMaterialization:
    build = commit.written[table.name].build
    assert build is not None
    done = f"Updated for the refreshed {table.reads[0]} alone" if build.updated_in_place else "Rebuilt"
    return dg.AssetMaterialization(
        asset_key=table_key(table, names),
        description=f"{done} in the same transaction as {', '.join(table.reads)}, so it never lags them.",
        metadata={
            "dagster/row_count": build.row_count,
            "dagster/table_name": f"{schema}.{table.name}",
            "preview": preview_metadata(build.preview),
            **({"rows_removed": build.rows_removed, "rows_added": build.rows_added} if build.updated_in_place else {}),
        },
    )


def _previous_row_counts(context: dg.AssetExecutionContext, keys: Iterable[dg.AssetKey]) -> dict[dg.AssetKey, int | None]:
    """Each asset's row count at its last materialization (None: never materialized), in one
    query of the instance rather than one per asset."""
    counts: dict[dg.AssetKey, int | None] = dict.fromkeys(keys)
    for record in context.instance.get_asset_records(list(counts)):
        event = record.asset_entry.last_materialization
        materialization = event.asset_materialization if event else None
        value = materialization.metadata.get("dagster/row_count") if materialization else None
        counts[record.asset_entry.asset_key] = int(value.value) if value is not None else None
    return counts


def _check_results(
    context: dg.AssetExecutionContext,
    commit: RunCommit,
    facts: Facts,
    resources: Sequence[ResourceSpec],
    tables: Sequence[NormalizedTable],
    previous: dict[dg.AssetKey, int | None],
    settings: Settings,
    schema: str,
    names: Names,
) -> Iterator[dg.AssetCheckResult]:
    """Every selected check's result, from the facts queried once the write committed."""
    wanted = context.selected_asset_check_keys
    specs_by_key = {spec.key: spec for spec in context.assets_def.check_specs}
    if facts.error is not None:
        # The tables have changed: checks that cannot run fail as checks (see could_not_run).
        context.log.error(f"the checks could not run: {facts.error}")
        synced = {asset_key(spec, names) for spec in resources}
        yield from could_not_run([specs_by_key[key] for key in wanted if key.asset_key in synced], facts.error)
    else:
        for spec in resources:
            key, table_facts = asset_key(spec, names), facts.synced.get(spec.name)
            results = []
            if table_facts is not None:
                results += [
                    primary_key_result(table_facts.primary_key, schema, spec, key),
                    required_fields_result(table_facts.required_fields, schema, spec, key),
                ]
                for column, member in spec.references(settings.resources):
                    check = (member or column).check_name
                    results.append(reference_result(facts.references[spec.name][check], schema, spec, column, member, key))
            if spec.name in facts.history:
                results.append(history_result(facts.history[spec.name], schema, spec, key))
            # Without the facts (a refresh that asked for no check needing them), the merge's own
            # count of the live rows, which is the same.
            merge = commit.written[spec.name].merge
            assert table_facts is not None or merge is not None
            live = table_facts.live_rows if table_facts is not None else merge.row_count  # type: ignore[union-attr]
            results.append(row_count_result(live, previous.get(key), settings.row_count_max_drop, f"{schema}.{spec.name}", key))
            yield from (result for result in results if dg.AssetCheckKey(key, result.check_name or "") in wanted)
    for table in tables:
        key, written = table_key(table, names), commit.written.get(table.name)
        if key in context.selected_asset_keys and written is not None and written.build is not None:
            yield from normalized_results(table, written.build, schema, key)
