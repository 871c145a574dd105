"""Asset checks that guard the synced and normalized tables.

Each check is a function of facts about a table (``table_facts``, queried in DuckDB by the
run's worker once its write has committed) returning an ``AssetCheckResult`` whose metadata
says what failed and where, so it can be tested on tables built to break it. The specs are
declared here once and attached by the assets.
"""


from collections.abc import Callable, Collection, Iterator, Sequence

import dagster as dg

from mkt_assets.core.catalog import RESOURCES_BY_NAME, Column, ResourceSpec
from mkt_assets.warehouse.history import history_table
from mkt_assets.warehouse.normalized_tables import BuildResult, NormalizedTable
from mkt_assets.warehouse.table_facts import SAMPLE_SIZE, HistoryFacts, PrimaryKeyFacts, ReferenceFacts, RequiredFieldsFacts

PRIMARY_KEY_CHECK = "primary_key_unique"
REQUIRED_FIELDS_CHECK = "required_fields_present"
ROW_COUNT_CHECK = "row_count_not_dropping"
NOT_NULL_CHECK = "keys_present"
HISTORY_CHECK = "history_is_consistent"



def sync_check_specs(spec: ResourceSpec, asset_key: dg.AssetKey, max_drop: float) -> list[dg.AssetCheckSpec]:
    """The checks every synced asset runs right after the run's write."""
    key = spec.primary_key_column.name
    required = ", ".join(c.name for c in spec.columns if c.required)
    return [
        dg.AssetCheckSpec(
            PRIMARY_KEY_CHECK,
            asset=asset_key,
            blocking=True,
            description=f"Every row has a {key} and no two rows share one.",
        ),
        dg.AssetCheckSpec(
            REQUIRED_FIELDS_CHECK,
            asset=asset_key,
            description=f"No live row lacks {required}.",
        ),
        dg.AssetCheckSpec(
            ROW_COUNT_CHECK,
            asset=asset_key,
            description=f"The live row count fell by at most {max_drop:.0%} since the previous materialization.",
        ),
    ]


def could_not_run(specs: Sequence[dg.AssetCheckSpec], reason: str) -> Iterator[dg.AssetCheckResult]:
    """Failed results for checks whose facts could not be queried (the database ran out of
    memory, was held too long): a check that cannot run has not passed.

    They fail as warnings, blocking ones included: a failed blocking check of ERROR severity
    fails its step, and the step's materialization has committed by then; the table's own
    PRIMARY KEY still guards what the blocking check would have found."""
    for spec in specs:
        yield _cannot_check(spec.asset_key, spec.name, f"the check could not run: {reason}")


def _table_name(spec: ResourceSpec, schema: str) -> str:
    return f"{schema}.{spec.name}"


def primary_key_result(facts: PrimaryKeyFacts, schema: str, spec: ResourceSpec, asset_key: dg.AssetKey | None = None) -> dg.AssetCheckResult:
    missing, duplicated = facts.rows_without_key, facts.duplicated_keys
    passed = missing == 0 and not duplicated
    problems = []
    if missing:
        problems.append(f"{missing} rows without {spec.primary_key_column.name}")
    if duplicated:
        problems.append(f"duplicated {spec.primary_key_column.name}s: {_listed(duplicated)}")
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=PRIMARY_KEY_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=None if passed else f"{_table_name(spec, schema)}: {'; '.join(problems)}",
        metadata={
            "table": _table_name(spec, schema),
            "rows_without_key": missing,
            "duplicated_keys": dg.MetadataValue.json(duplicated[:SAMPLE_SIZE]),
        },
    )


def required_fields_result(
    facts: RequiredFieldsFacts, schema: str, spec: ResourceSpec, asset_key: dg.AssetKey | None = None
) -> dg.AssetCheckResult:
    missing = facts.rows_missing_by_column
    passed = not missing
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=REQUIRED_FIELDS_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=None
        if passed
        else f"{_table_name(spec, schema)}: "
        + "; ".join(f"{count} rows without {name}" for name, count in missing.items()),
        metadata={
            "table": _table_name(spec, schema),
            "rows_missing_by_column": dg.MetadataValue.json(missing),
            f"{spec.primary_key_column.name}s_of_rows_missing_a_field": dg.MetadataValue.json(
                facts.keys_missing_by_column
            ),
        },
    )


def row_count_result(
    current: int, previous: int | None, max_drop: float, table: str, asset_key: dg.AssetKey | None = None
) -> dg.AssetCheckResult:
    """Warns when the table shrank by more than ``max_drop`` since the previous materialization."""
    floor = None if previous is None else previous * (1 - max_drop)
    passed = floor is None or current >= floor
    description = None
    if not passed and previous is not None:
        description = (
            f"{table}: {current} rows, down from {previous} at the previous materialization"
            f" ({(previous - current) / previous:.1%} fewer; at most {max_drop:.0%} expected)"
        )
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=ROW_COUNT_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=description,
        metadata={
            "table": table,
            "row_count": current,
            "previous_row_count": previous if previous is not None else "none (first materialization)",
            "max_drop_share": max_drop,
        },
    )


def reference_result(
    facts: ReferenceFacts,
    schema: str,
    spec: ResourceSpec,
    column: Column,
    member: Column | None,
    asset_key: dg.AssetKey | None = None,
) -> dg.AssetCheckResult:
    """Every reference of ``spec``'s live rows through ``column`` (or its list's ``member``)
    names a live row of the resource it refers to; a warning, not blocking."""
    field = member or column
    assert field.references is not None
    referenced = RESOURCES_BY_NAME[field.references.resource]
    check_name = field.check_name
    if facts.missing_table is not None:
        return _cannot_check(asset_key, check_name, f"{facts.missing_table} does not exist yet: materialize it first")
    passed = not facts.dangling
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=check_name,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=None
        if passed
        else (
            f"{facts.rows} {spec.name} carry {field.name}s missing from {_table_name(referenced, schema)}:"
            f" {_listed(facts.values)}"
        ),
        metadata={
            "references_checked_against": _table_name(referenced, schema),
            "dangling_references": facts.dangling,
            f"{spec.name}_with_dangling_references": facts.rows,
            f"{spec.row_name}_{spec.primary_key_column.name}s": dg.MetadataValue.json(facts.keys[:SAMPLE_SIZE]),
            f"missing_{field.name}s": dg.MetadataValue.json(facts.values[:SAMPLE_SIZE]),
        },
    )


def _cannot_check(asset_key: dg.AssetKey | None, check_name: str, why: str) -> dg.AssetCheckResult:
    """A check that cannot say (its table is not there, or its query failed): failed as a warning."""
    return dg.AssetCheckResult(
        asset_key=asset_key, check_name=check_name, passed=False, severity=dg.AssetCheckSeverity.WARN, description=why
    )


def _listed(values: Sequence[object]) -> str:
    shown = ", ".join(str(v) for v in values[:SAMPLE_SIZE])
    return shown + (" ..." if len(values) > SAMPLE_SIZE else "")


def reference_check_specs(
    spec: ResourceSpec, key_of: Callable[[ResourceSpec], dg.AssetKey], within: Collection[str] | None = None
) -> list[dg.AssetCheckSpec]:
    """One check per reference the resource makes, reading the table it refers to too; with
    ``within`` (the resources synced), none to a resource left out, whose table is not kept."""
    specs = []
    for column, member in spec.references(within):
        field = member or column
        assert field.references is not None
        referenced = RESOURCES_BY_NAME[field.references.resource]
        where = f"{column.name}[].{member.name}" if member else column.name
        specs.append(
            dg.AssetCheckSpec(
                field.check_name,
                asset=key_of(spec),
                additional_deps=[key_of(referenced)],
                description=f"Every {where} of a live row names a live row of {referenced.name}.",
            )
        )
    return specs


def history_check_spec(spec: ResourceSpec, asset_key: dg.AssetKey) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        HISTORY_CHECK,
        asset=asset_key,
        description=(
            f"In {history_table(spec.name)}, every live row has exactly one open version, no other row has"
            " one, and no two versions of a row overlap."
        ),
    )


def history_result(facts: HistoryFacts, schema: str, spec: ResourceSpec, asset_key: dg.AssetKey | None = None) -> dg.AssetCheckResult:
    table = f"{schema}.{history_table(spec.name)}"
    if facts.missing_table is not None:
        return _cannot_check(asset_key, HISTORY_CHECK, f"{facts.missing_table} does not exist")
    faults = {
        "live rows without exactly one open version": facts.live_without_one_open,
        "open versions of rows that are not live": facts.open_not_live,
        "versions overlapping the next one of their row": facts.overlapping,
    }
    passed = not any(faults.values())
    return dg.AssetCheckResult(
        asset_key=asset_key,
        check_name=HISTORY_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=None
        if passed
        else f"{table}: " + "; ".join(f"{count} {what}" for what, count in faults.items() if count)
        + f" ({spec.primary_key_column.name}s: {_listed(facts.keys)})",
        metadata={
            "table": table,
            "versions": facts.versions,
            "live_rows_without_one_open_version": facts.live_without_one_open,
            "open_versions_not_live": facts.open_not_live,
            "overlapping_versions": facts.overlapping,
            f"{spec.primary_key_column.name}s_at_fault": dg.MetadataValue.json(facts.keys[:SAMPLE_SIZE]),
        },
    )


def normalized_check_specs(table: NormalizedTable, asset_key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(table.row_check, asset=asset_key, description=table.row_check_description),
        dg.AssetCheckSpec(NOT_NULL_CHECK, asset=asset_key, description=f"No row lacks {', '.join(table.not_null)}."),
    ]


def normalized_results(
    table: NormalizedTable, result: BuildResult, schema: str, asset_key: dg.AssetKey
) -> list[dg.AssetCheckResult]:
    matches = result.row_count == result.expected_rows
    missing = {column: count for column, count in result.null_keys.items() if count}
    return [
        dg.AssetCheckResult(
            asset_key=asset_key,
            check_name=table.row_check,
            passed=matches,
            severity=dg.AssetCheckSeverity.ERROR,
            description=None
            if matches
            else (
                f"{schema}.{table.name} has {result.row_count} rows, {result.expected_rows} expected"
                f" ({table.row_check_description.rstrip('.').lower()})"
            ),
            metadata={"row_count": result.row_count, "expected_rows": result.expected_rows},
        ),
        dg.AssetCheckResult(
            asset_key=asset_key,
            check_name=NOT_NULL_CHECK,
            passed=not missing,
            severity=dg.AssetCheckSeverity.ERROR,
            description=None
            if not missing
            else f"{schema}.{table.name}: " + "; ".join(f"{n} rows without {c}" for c, n in missing.items()),
            metadata={"null_keys": dg.MetadataValue.json(result.null_keys)},
        ),
    ]
