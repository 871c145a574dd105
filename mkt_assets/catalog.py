"""The five API resources, declared once as data.

Every other module reads this table: the client (path, pagination), the staging step
(primary key, required and known fields), the IO manager (columns and types) and the
assets (descriptions, column schema). Adding a resource is one entry in ``RESOURCES``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def snake_case(api_name: str) -> str:
    """``registeredAt`` -> ``registered_at``, ``sourceURL`` -> ``source_url``."""
    return _CAMEL_BOUNDARY.sub("_", api_name).lower()


@dataclass(frozen=True)
class Column:
    """One field of an API record and the DuckDB column it lands in.

    A column with ``fields`` is a list of objects in the API and a typed
    ``STRUCT(...)[]`` in DuckDB, whose members are those fields. ``required`` fields are
    expected on every record: an asset check flags rows without them. Only a missing
    primary key fails the sync itself, since the row could not be merged.
    """

    api_name: str
    duckdb_type: str = ""
    description: str = ""
    required: bool = False
    fields: tuple[Column, ...] = ()

    @property
    def name(self) -> str:
        return snake_case(self.api_name)

    @property
    def sql_type(self) -> str:
        if not self.fields:
            return self.duckdb_type
        members = ", ".join(f'"{member.name}" {member.sql_type}' for member in self.fields)
        return f"STRUCT({members})[]"


@dataclass(frozen=True)
class ResourceSpec:
    """One listable API resource and the table that mirrors it."""

    name: str
    path: str
    primary_key: str
    description: str
    columns: tuple[Column, ...]
    paginated: bool = True
    # The field whose value of the last item is the next page's `startingAfter`.
    cursor_field: str = "id"
    # New records can be read alone: ids only grow, so `startingAfter` the newest stored id
    # in ascending order returns exactly the records created since.
    incremental: bool = False

    def __post_init__(self) -> None:
        names = [column.api_name for column in self.columns]
        if self.primary_key not in names:
            raise ValueError(f"{self.name}: primary key {self.primary_key!r} is not a column")
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate column names")

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
                    Column("slug", "VARCHAR"),
                    Column("value", "VARCHAR"),
                ),
            ),
            Column(
                "tags",
                description="Tags on the contact: id, name.",
                fields=(Column("id", "BIGINT"), Column("name", "VARCHAR")),
            ),
        ),
    ),
    ResourceSpec(
        name="tags",
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
            ),
        ),
    ),
)

RESOURCES_BY_NAME: dict[str, ResourceSpec] = {spec.name: spec for spec in RESOURCES}
