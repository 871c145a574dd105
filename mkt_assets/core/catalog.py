"""The API's resources, declared once as data: their shapes, keys, cursors and relations.

Every other module reads this table: the client (path, pagination, the types every value
is checked against), the warehouse (columns and types), the assets (descriptions, column
schema, lineage), the checks (required fields; one reference check per reference) and the
normalized tables (one per list column declared with a ``NestedTable``). Adding a resource,
a reference or a link table is one entry here.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

# Where the API answers unless a setting says otherwise.
DEFAULT_BASE_URL = "https://api.systeme.io/api"

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def snake_case(api_name: str) -> str:
    """``registeredAt`` -> ``registered_at``, ``sourceURL`` -> ``source_url``."""
    return _CAMEL_BOUNDARY.sub("_", api_name).lower()


@dataclass(frozen=True)
class Reference:
    """The column (or list member field) holds the key of a row of another resource.

    Generated from it: a reference check (warning, not blocking) that names the rows whose
    reference finds no live row there, and an edge in the lineage."""

    resource: str
    # The check's name; by default ``<column>s_exist`` (contact_id: contact_ids_exist).
    check: str = ""


@dataclass(frozen=True)
class NestedTable:
    """A list column unnested into a normalized table: one row per member of a live row.

    Its columns: the parent's key (``<row_name>_<key>``), then the members' fields named
    ``<prefix><field>`` in ``layout`` order (``position``, the 1-based place in the list, may
    be one of them). A member field that references another resource takes that row's
    current values for the fields both have (a tag's current name, say)."""

    name: str
    description: str
    prefix: str = ""
    # Member fields by API name, and "position"; empty: the members' fields in their order.
    layout: tuple[str, ...] = ()


@dataclass(frozen=True)
class Column:
    """One field of an API record and the DuckDB column it lands in.

    A column with ``fields`` is a list of objects in the API and a typed
    ``STRUCT(...)[]`` in DuckDB, whose members are those fields. A column with ``member``
    is an object in the API of which the table keeps one field (an enrollment's ``contact``
    object: its ``id``, as ``contact_id``): the rest is a copy of a row that lives in its
    own table. ``required`` fields are expected on every record: an asset check flags rows
    without them. Only a missing primary key fails the sync itself, since the row could not
    be merged.
    """

    api_name: str
    duckdb_type: str = ""
    description: str = ""
    required: bool = False
    fields: tuple[Column, ...] = ()
    member: str = ""
    references: Reference | None = None
    table: NestedTable | None = None

    @property
    def name(self) -> str:
        return snake_case(self.api_name) + (f"_{snake_case(self.member)}" if self.member else "")

    @property
    def sql_type(self) -> str:
        if not self.fields:
            return self.duckdb_type
        members = ", ".join(f'"{member.name}" {member.sql_type}' for member in self.fields)
        return f"STRUCT({members})[]"

    @property
    def check_name(self) -> str:
        assert self.references is not None
        return self.references.check or f"{self.name}s_exist"


@dataclass(frozen=True)
class ResourceSpec:
    """One listable API resource and the table that mirrors it."""

    name: str
    # What one row is called ("contact"): ``contact_id`` where another table names one.
    row_name: str
    path: str
    primary_key: str
    description: str
    columns: tuple[Column, ...]
    paginated: bool = True
    # The field whose value of the last item is the next page's `startingAfter`.
    cursor_field: str = "id"
    # Ids only grow (a new record gets an id above every earlier one), so the incremental job
    # reads only the records after the newest stored id, in ascending order: exactly those
    # created since. Changes to older records and removals wait for the daily full sync.
    incremental: bool = False

    def __post_init__(self) -> None:
        names = [column.api_name for column in self.columns]
        if self.primary_key not in names:
            raise ValueError(f"{self.name}: primary key {self.primary_key!r} is not a column")
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate column names")

    @property
    def key_name(self) -> str:
        """How another table names this one's key: ``contact_id``, ``course_id``."""
        return f"{self.row_name}_{self.primary_key_column.name}"

    def references(self, within: Collection[str] | None = None) -> list[tuple[Column, Column | None]]:
        """Every reference this resource makes: (column, None) for a column that references,
        (list column, member field) for a list member field that does; with ``within``, only
        those to these resources (the ones a deployment syncs)."""
        found: list[tuple[Column, Column | None]] = []
        for column in self.columns:
            if column.references is not None:
                found.append((column, None))
            found.extend((column, member) for member in column.fields if member.references is not None)
        return [
            (column, member)
            for column, member in found
            if within is None or (member or column).references.resource in within  # type: ignore[union-attr]
        ]

    @property
    def primary_key_column(self) -> Column:
        return self.column(self.primary_key)

    @property
    def known_fields(self) -> frozenset[str]:
        return frozenset(column.api_name for column in self.columns)

    def column(self, api_name: str) -> Column:
        for column in self.columns:
            if column.api_name == api_name:
                return column
        raise KeyError(f"{self.name} has no column {api_name!r}")


# Columns every table carries besides the API's own fields.
EXTRA_COLUMN = Column("_extra", "JSON", "Fields the API sent that the catalog does not know, as JSON.")
SYNCED_AT_COLUMN = Column(
    "_synced_at", "TIMESTAMPTZ", "When this row's current values were written by a sync."
)
DELETED_AT_COLUMN = Column(
    "_deleted_at",
    "TIMESTAMPTZ",
    "When a complete full sync no longer found this row upstream; NULL while it exists.",
)
BOOKKEEPING_COLUMNS = (EXTRA_COLUMN, SYNCED_AT_COLUMN, DELETED_AT_COLUMN)

_ID = Column("id", "BIGINT", "Identifier assigned by the platform.", required=True)

RESOURCES: tuple[ResourceSpec, ...] = (
    ResourceSpec(
        name="communities",
        row_name="community",
        path="/community/communities",
        primary_key="id",
        description="Communities of the account (GET /api/community/communities).",
        columns=(
            _ID,
            Column("name", "VARCHAR", "Community name.", required=True),
            Column("domainName", "VARCHAR", "Domain the community is served on."),
            Column("path", "VARCHAR", "Path of the community on its domain."),
        ),
    ),
    ResourceSpec(
        name="contacts",
        row_name="contact",
        path="/contacts",
        primary_key="id",
        description=(
            "Contacts of the account with their custom field values and tags "
            "(GET /api/contacts). The API has no updatedAt: changes are seen by a full read."
        ),
        incremental=True,
        columns=(
            _ID,
            Column("email", "VARCHAR", "Email address.", required=True),
            Column("registeredAt", "TIMESTAMPTZ", "When the contact registered.", required=True),
            Column("locale", "VARCHAR", "Language code (the platform's own: jp, dk, ua, ...)."),
            Column("sourceURL", "VARCHAR", "Page the contact signed up on, if known."),
            Column("unsubscribed", "BOOLEAN", "Unsubscribed from emails."),
            Column("bounced", "BOOLEAN", "Emails to this contact bounce."),
            Column("needsConfirmation", "BOOLEAN", "Double opt-in not yet confirmed."),
            Column(
                "fields",
                description="Custom field values: field_name, slug, value.",
                fields=(
                    Column("fieldName", "VARCHAR"),
                    Column("slug", "VARCHAR", references=Reference("contact_fields", check="contact_field_slugs_exist")),
                    Column("value", "VARCHAR"),
                ),
                table=NestedTable(
                    "contact_field_values",
                    "One row per custom field value on a live contact, with the field's current name.",
                    layout=("slug", "fieldName", "value"),
                ),
            ),
            Column(
                "tags",
                description="Tags on the contact: id, name.",
                fields=(Column("id", "BIGINT", references=Reference("tags", check="contact_tags_exist")), Column("name", "VARCHAR")),
                table=NestedTable(
                    "contact_tags", "One row per tag on a live contact, with the tag's current name.", prefix="tag_"
                ),
            ),
        ),
    ),
    ResourceSpec(
        name="tags",
        row_name="tag",
        path="/tags",
        primary_key="id",
        description="Tags that can be put on contacts (GET /api/tags).",
        columns=(
            _ID,
            Column("name", "VARCHAR", "Tag name.", required=True),
            Column("createdAt", "TIMESTAMPTZ", "When the tag was created."),
        ),
    ),
    ResourceSpec(
        name="contact_fields",
        row_name="contact_field",
        path="/contact_fields",
        primary_key="slug",
        description=(
            "Custom contact fields defined on the account (GET /api/contact_fields). "
            "They have no id: the slug identifies them."
        ),
        columns=(
            Column("slug", "VARCHAR", "Identifier of the field.", required=True),
            Column("fieldName", "VARCHAR", "Display name of the field.", required=True),
        ),
        # One request with no parameters returns every field.
        paginated=False,
        cursor_field="slug",
    ),
    ResourceSpec(
        name="course_resources",
        row_name="course",
        path="/school/courses",
        primary_key="id",
        description="Courses of the account's school with their modules (GET /api/school/courses).",
        columns=(
            _ID,
            Column("locale", "VARCHAR", "Language of the course."),
            Column("domainName", "VARCHAR", "Domain the course is served on, if any."),
            Column("path", "VARCHAR", "Path of the course on its domain."),
            Column("active", "BOOLEAN", "Open to students."),
            Column("name", "VARCHAR", "Course name.", required=True),
            Column(
                "modules",
                description="Modules of the course in order: id (may be null), name.",
                fields=(Column("id", "BIGINT"), Column("name", "VARCHAR")),
                table=NestedTable(
                    "course_modules",
                    "One row per module of a live course, in course order (module ids may be null).",
                    prefix="module_",
                    layout=("id", "position", "name"),
                ),
            ),
        ),
    ),
    ResourceSpec(
        name="memberships",
        row_name="membership",
        path="/community/memberships",
        primary_key="id",
        description="Contacts' memberships of the account's communities (GET /api/community/memberships).",
        incremental=True,
        columns=(
            _ID,
            Column(
                "community", "BIGINT", "The community (its other fields are in communities).", required=True,
                member="id", references=Reference("communities"),
            ),
            Column(
                "contact", "BIGINT", "The member (its other fields are in contacts).", required=True,
                member="id", references=Reference("contacts"),
            ),
        ),  # fmt: skip
    ),
    ResourceSpec(
        name="enrollments",
        row_name="enrollment",
        path="/school/enrollments",
        primary_key="id",
        description="Contacts' enrollments in the account's courses (GET /api/school/enrollments).",
        incremental=True,
        columns=(
            _ID,
            Column(
                "contact", "BIGINT", "The student (their other fields are in contacts).", required=True,
                member="id", references=Reference("contacts"),
            ),
            Column(
                "course", "BIGINT", "The course (its other fields are in course_resources).", required=True,
                member="id", references=Reference("course_resources"),
            ),
            Column("accessType", "VARCHAR", "How much of the course the student may see: full_access, partial_access, dripping_content."),
            Column("active", "BOOLEAN", "The enrollment is in force."),
        ),  # fmt: skip
    ),
)

RESOURCES_BY_NAME: dict[str, ResourceSpec] = {spec.name: spec for spec in RESOURCES}


# The resource whose records are people. A record naming one (a membership, an enrollment) is
# about that person too: no such row is quoted outside the database, where whoever reads
# Dagster's storage or its UI would read it (a table's preview in its materialization).
PEOPLE = "contacts"


def holds_personal_data(spec: ResourceSpec) -> bool:
    """Whether ``spec``'s records are people, or name one."""
    return spec.name == PEOPLE or PEOPLE in referenced_resources(spec)


def referenced_resources(spec: ResourceSpec, catalog: Sequence[ResourceSpec] = RESOURCES) -> list[str]:
    """The other resources of ``catalog`` that ``spec`` names, each once, in its order."""
    named = {(member or column).references.resource for column, member in spec.references()}  # type: ignore[union-attr]
    return [other.name for other in catalog if other.name in named and other is not spec]


def referenced_first(specs: Iterable[ResourceSpec], catalog: Sequence[ResourceSpec] = RESOURCES) -> list[ResourceSpec]:
    """``specs`` with each after the resources it references, even through others, and otherwise
    in the catalog's order: the order in which lineage lets one step report them."""
    wanted = {spec.name for spec in specs}
    pending = list(catalog)
    placed: list[ResourceSpec] = []
    while pending:
        done = {spec.name for spec in placed}
        ready = next((spec for spec in pending if set(referenced_resources(spec, catalog)) <= done), None)
        if ready is None:
            raise ValueError(f"the references of {', '.join(spec.name for spec in pending)} go round in a circle")
        pending.remove(ready)
        placed.append(ready)
    return [spec for spec in placed if spec.name in wanted]


def _check_references() -> None:
    """Every reference names a resource of the catalog, and no chain of them comes back on itself."""
    for spec in RESOURCES:
        for column, member in spec.references():
            reference = (member or column).references
            assert reference is not None
            if reference.resource not in RESOURCES_BY_NAME:
                raise ValueError(f"{spec.name}.{column.api_name} references {reference.resource!r}, not in the catalog")
    referenced_first(RESOURCES)


_check_references()
