"""Asset checks that guard the synced tables.

Each check is a function of a DuckDB connection (or of numbers) returning an
``AssetCheckResult`` whose metadata says what failed and where, so it can be tested on
tables built to break it. The specs are declared here once and attached by the assets.
"""


from collections.abc import Iterator, Sequence

import dagster as dg
import duckdb

from mkt_assets.catalog import RESOURCES_BY_NAME, ResourceSpec
from mkt_assets.resource import WarehouseResource
from mkt_assets.warehouse import fully_qualified, quote_ident, table_exists

PRIMARY_KEY_CHECK = "primary_key_unique"
REQUIRED_FIELDS_CHECK = "required_fields_present"
ROW_COUNT_CHECK = "row_count_not_dropping"
CONTACT_TAGS_CHECK = "contact_tags_exist"
CONTACT_FIELDS_CHECK = "contact_field_slugs_exist"

# How many offending keys a failing check lists in its metadata.
SAMPLE_SIZE = 20
# Rows a complete sync no longer found upstream are kept, marked; checks look at the rest.
LIVE = "_deleted_at IS NULL"


def sync_check_specs(spec: ResourceSpec, asset_key: dg.AssetKey, max_drop: float) -> list[dg.AssetCheckSpec]:
    """The checks every synced asset runs in its own step, right after its merge."""
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


def _table_name(spec: ResourceSpec, schema: str) -> str:
    return f"{schema}.{spec.name}"


def primary_key_result(connection: duckdb.DuckDBPyConnection, schema: str, spec: ResourceSpec) -> dg.AssetCheckResult:
    table = fully_qualified(connection, schema, spec.name)
    key = quote_ident(spec.primary_key_column.name)
    (missing,) = connection.execute(f"SELECT count(*) FROM {table} WHERE {key} IS NULL").fetchone()  # type: ignore[misc]
    duplicated = [
        row[0]
        for row in connection.execute(
            f"SELECT {key} FROM {table} WHERE {key} IS NOT NULL GROUP BY {key} HAVING count(*) > 1"
            f" ORDER BY {key} LIMIT {SAMPLE_SIZE + 1}"
        ).fetchall()
    ]
    passed = missing == 0 and not duplicated
    problems = []
    if missing:
        problems.append(f"{missing} rows without {spec.primary_key_column.name}")
    if duplicated:
        problems.append(f"duplicated {spec.primary_key_column.name}s: {_listed(duplicated)}")
    return dg.AssetCheckResult(
        check_name=PRIMARY_KEY_CHECK,
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=None if passed else f"{_table_name(spec, schema)}: {'; '.join(problems)}",
        metadata={
            "table": _table_name(spec, schema),
            "rows_without_key": missing,
            "duplicated_keys": dg.MetadataValue.json([_plain(k) for k in duplicated[:SAMPLE_SIZE]]),
        },
    )


def required_fields_result(
    connection: duckdb.DuckDBPyConnection, schema: str, spec: ResourceSpec
) -> dg.AssetCheckResult:
    table = fully_qualified(connection, schema, spec.name)
    key = quote_ident(spec.primary_key_column.name)
    missing: dict[str, int] = {}
    samples: dict[str, list[object]] = {}
    for column in spec.columns:
        if not column.required:
            continue
        name = quote_ident(column.name)
        (count,) = connection.execute(f"SELECT count(*) FROM {table} WHERE {name} IS NULL AND {LIVE}").fetchone()  # type: ignore[misc]
        if count:
            missing[column.name] = count
            samples[column.name] = [
                _plain(row[0])
                for row in connection.execute(
                    f"SELECT {key} FROM {table} WHERE {name} IS NULL AND {LIVE} ORDER BY {key} LIMIT {SAMPLE_SIZE}"
                ).fetchall()
            ]
    passed = not missing
    return dg.AssetCheckResult(
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
            f"{spec.primary_key_column.name}s_of_rows_missing_a_field": dg.MetadataValue.json(samples),
        },
    )


def row_count_result(current: int, previous: int | None, max_drop: float, table: str) -> dg.AssetCheckResult:
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


CONTACTS = RESOURCES_BY_NAME["contacts"]
TAGS = RESOURCES_BY_NAME["tags"]
CONTACT_FIELDS = RESOURCES_BY_NAME["contact_fields"]


def contact_tags_result(connection: duckdb.DuckDBPyConnection, schema: str) -> dg.AssetCheckResult:
    """Every tag on a contact is a row of ``tags``."""
    return _references_result(
        connection,
        schema,
        check_name=CONTACT_TAGS_CHECK,
        referenced=TAGS,
        list_column="tags",
        member="id",
        referenced_key="id",
    )


def contact_field_slugs_result(connection: duckdb.DuckDBPyConnection, schema: str) -> dg.AssetCheckResult:
    """Every field slug on a contact is a row of ``contact_fields``."""
    return _references_result(
        connection,
        schema,
        check_name=CONTACT_FIELDS_CHECK,
        referenced=CONTACT_FIELDS,
        list_column="fields",
        member="slug",
        referenced_key="slug",
    )


def _references_result(
    connection: duckdb.DuckDBPyConnection,
    schema: str,
    *,
    check_name: str,
    referenced: ResourceSpec,
    list_column: str,
    member: str,
    referenced_key: str,
) -> dg.AssetCheckResult:
    for spec in (CONTACTS, referenced):
        if not table_exists(connection, schema, spec.name):
            return dg.AssetCheckResult(
                check_name=check_name,
                passed=False,
                severity=dg.AssetCheckSeverity.WARN,
                description=f"{_table_name(spec, schema)} does not exist yet: materialize it first",
            )
    contacts = fully_qualified(connection, schema, CONTACTS.name)
    target = fully_qualified(connection, schema, referenced.name)
    dangling = connection.execute(
        f"SELECT c.id, u.item.{quote_ident(member)} AS value"
        f" FROM {contacts} AS c, unnest(c.{quote_ident(list_column)}) AS u(item)"
        f" WHERE c.{LIVE} AND NOT EXISTS (SELECT 1 FROM {target} AS r"
        f" WHERE r.{quote_ident(referenced_key)} = u.item.{quote_ident(member)} AND r.{LIVE})"
        " ORDER BY c.id"
    ).fetchall()
    contact_ids = sorted({row[0] for row in dangling})
    values = sorted({row[1] for row in dangling}, key=lambda v: (v is None, str(v)))
    passed = not dangling
    return dg.AssetCheckResult(
        check_name=check_name,
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=None
        if passed
        else (
            f"{len(contact_ids)} contacts carry {member}s missing from {_table_name(referenced, schema)}:"
            f" {_listed(values)}"
        ),
        metadata={
            "references_checked_against": _table_name(referenced, schema),
            "dangling_references": len(dangling),
            "contacts_with_dangling_references": len(contact_ids),
            "contact_ids": dg.MetadataValue.json([_plain(i) for i in contact_ids[:SAMPLE_SIZE]]),
            f"missing_{member}s": dg.MetadataValue.json([_plain(v) for v in values[:SAMPLE_SIZE]]),
        },
    )


def _listed(values: Sequence[object]) -> str:
    shown = ", ".join(str(v) for v in values[:SAMPLE_SIZE])
    return shown + (" ..." if len(values) > SAMPLE_SIZE else "")


def _plain(value: object) -> object:
    return value if isinstance(value, (int, str)) or value is None else str(value)


def build_contact_reference_checks(contacts: dg.AssetKey, tags: dg.AssetKey, fields: dg.AssetKey) -> dg.AssetChecksDefinition:
    """Cross-table checks on contacts, run once contacts, tags and contact fields have landed."""

    @dg.multi_asset_check(
        name="contact_references",
        specs=[
            dg.AssetCheckSpec(
                CONTACT_TAGS_CHECK,
                asset=contacts,
                additional_deps=[tags],
                description="Every tag on a contact exists in tags.",
            ),
            dg.AssetCheckSpec(
                CONTACT_FIELDS_CHECK,
                asset=contacts,
                additional_deps=[fields],
                description="Every field slug on a contact exists in contact_fields.",
            ),
        ],
    )
    def contact_references(warehouse: WarehouseResource) -> Iterator[dg.AssetCheckResult]:
        with warehouse.connection() as connection:
            yield contact_tags_result(connection, warehouse.schema_name)
            yield contact_field_slugs_result(connection, warehouse.schema_name)

    return contact_references
